"""Logits agree with BlinkDL's ``rwkv`` package (0.8.32) on random weights in the official layout.

Both load the same file, written by ``rwkv_zoo.save``; v5/v6/v7 also with official ``time_state`` keys
(the package's x070 class ignores those keys, so it is given the tuned state as its initial state).

The package is the ground truth for official checkpoints (SPEC.md §10). The 40-token prompt runs three
ways: the default inference path (the cpu backend's fused step), the modules with per-layer kernels,
and with gradients on (the training path: the chunked kernels of a backend with a backward); then 8
decode steps with the state carried.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _deps import require

require("rwkv")  # BlinkDL's package, the oracle: in the test extra

WORKER = Path(__file__).with_name("official_compat_worker.py")
TOL = 1e-5  # PERF.md: whole model vs the package, fp32


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for group in ("v4,v5,v6", "v7"):
        env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
        env.pop("RWKV_V7_ON", None)
        proc = subprocess.run(
            [sys.executable, str(WORKER), group, str(tmp_path_factory.mktemp("ckpt"))],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                _, version, payload = line.split(" ", 2)
                out[version] = json.loads(payload)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("case", ["v4/plain", "v5/plain", "v6/plain", "v7/plain", "v5/time_state", "v6/time_state",
                                  "v7/time_state"])
def test_logits_match_official_package(case, results):
    """The prompt through the fused step, the modules and the training path, then 8 decode steps."""
    result = results[case]
    assert result["prompt"] <= TOL, result
    assert result["prompt_modules"] <= TOL, result
    assert result["prompt_train"] <= TOL, result
    assert len(result["decode"]) == 8
    assert max(result["decode"]) <= TOL, result
