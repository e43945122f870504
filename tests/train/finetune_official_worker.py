"""Run in a subprocess by test_finetune_state.py: BlinkDL's ``rwkv`` package (0.8.32) on the file that
``rwkv-zoo export`` wrote for a state-tuned run, against ``rwkv_zoo.load`` of the same file.

The package's v5/v6 class reads the merged ``blocks.N.att.time_state`` keys itself (transposing them
into its [H, K, V] state); its x070 (v7) class ignores them, so it is handed the tuned state as its
start, in the file's [H, V, K] layout, which is its own. A subprocess because the package changes
torch's global settings when imported; it picks v7 with ``RWKV_V7_ON`` at import time, so its module
is imported once without (v5, v6) and loaded a second time, under another name, with it (v7): one
process for the three. Prints one ``RESULT`` JSON line per file.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
os.environ.setdefault("RWKV_JIT_ON", "0")

from official_compat_worker import compare


def _package_class(v7: bool):
    import importlib.util

    import rwkv.model

    if not v7:
        return rwkv.model.RWKV
    os.environ["RWKV_V7_ON"] = "1"
    spec = importlib.util.spec_from_file_location("rwkv_model_v7", rwkv.model.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RWKV


def main(version: str, path: str) -> None:
    import rwkv_zoo

    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a busy CPU

    official = _package_class(version == "v7")(model=path[: -len(".pth")], strategy="cpu fp32")
    ours = rwkv_zoo.load(path)
    assert ours.initial_state is not None, "the exported file carries no time_state"
    start = None
    if version == "v7":
        tuned = torch.load(path, weights_only=True)
        start = official.generate_zero_state()
        for i in range(ours.config.n_layer):
            start[i * 3 + 1] = tuned[f"blocks.{i}.att.time_state"].float().contiguous()
    result = compare(official, ours, ours.config.vocab_size, prompt_len=24, decode_steps=4, official_state=start)
    print(f"RESULT {version} " + json.dumps(result))


if __name__ == "__main__":
    os.environ.pop("RWKV_V7_ON", None)
    for item in sorted(sys.argv[1:]):  # v7 last: its import changes the package's module-level choices
        v, p = item.split("=", 1)
        main(v, p)
