"""Run in a subprocess by test_v7a.py: compare a v7a (DeepEmbed) file in rwkv_zoo and in BlinkDL's ``rwkv``.

``python deepembed_compat_worker.py FILE.pth VOCAB`` loads FILE (official layout, written by the test)
with ``rwkv_zoo.load`` and with the package (strategy ``cpu fp32``) and prints one ``RESULT`` line with
the relative logit errors of a prompt and of 8 decode steps with the state carried
(``official_compat_worker.compare``). A subprocess because the package reads ``RWKV_V7_ON`` and
``RWKV_DE_VERSION`` when it is imported: DeepEmbed is a different set of module-level functions there.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_DE_VERSION"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


def main(path: str, vocab: int) -> None:
    from official_compat_worker import compare
    from rwkv.model import RWKV as OfficialRWKV

    import rwkv_zoo

    official = OfficialRWKV(model=path[: -len(".pth")], strategy="cpu fp32")
    ours = rwkv_zoo.load(path)
    result = compare(official, ours, vocab)
    print("RESULT " + json.dumps({"version": ours.version, **result}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
