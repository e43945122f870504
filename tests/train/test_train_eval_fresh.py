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



def test_a_users_fused_adamw_step_reaches_the_cached_inference_step():
    """The same for a plain training loop: torch's fused AdamW, then inference, in one process."""
    import torch

    import rwkv_zoo

    model = rwkv_zoo.build("v7", n_layer=2, n_embd=32, head_size=16, vocab_size=64)
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        model(x)  # builds and caches the fused step (where the cpu backend has one)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(x)[0].float().square().mean().backward()
    opt.step()
    with torch.no_grad():
        cached = model(x)[0]
        model.fused_step = False
        direct = model(x)[0]
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)
