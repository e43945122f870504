"""An evaluation after more training sees the new weights.

The trainer's fused CPU AdamW updates parameters without bumping their version counters, and a
fused whole-model inference step (rwkv_zoo.fused) is cached per weight version: a second
``evaluate()`` ran the weights of the first one until the trainer dropped the cache after each step.
"""

from rwkv_zoo.train.trainer import TrainConfig, Trainer


def test_second_evaluation_uses_the_trained_weights():
    cfg = TrainConfig(model="v7", model_options={"n_layer": 2, "n_embd": 32, "head_size": 16},
                      data={"task": "mqar", "num_pairs": 4, "seq_len": 16}, steps=20, batch_size=8, lr=1e-2,
                      progress=False, eval_batches=1, eval_batch_size=8, threads=1)
    t = Trainer(cfg)
    t.train_step()
    t.evaluate()  # builds (and caches) the fused step from these weights
    for _ in range(3):
        t.train_step()
    cached = t.evaluate()
    t.module.fused_step = False  # the modules, layer by layer: always the current weights
    direct = t.evaluate()
    assert abs(cached["loss"] - direct["loss"]) < 1e-4 * max(1.0, abs(direct["loss"]))
    # and the weights did move between the evaluations (else the test proves nothing)
    assert t.evals[0]["loss"] != direct["loss"]

