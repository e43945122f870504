"""The fused step's own barrier (cpu_decode.cpp ``TeamBarrier``): with every wait a futex sleep and more
threads than cores, a step gives what one thread gives, bit for bit."""

from __future__ import annotations

import subprocess

import pytest
import torch
from _deps import CXX, missing

import rwkv_zoo
from rwkv_zoo.backends.cpu import fused as cpu_fused
from rwkv_zoo.backends.cpu import kernels
from rwkv_zoo.inference import prepare_inference
from rwkv_zoo.state import RWKVState


@pytest.fixture(scope="module")
def sleeping_lib(tmp_path_factory):
    """The decode library built with no spinning: a thread that waits at a barrier always sleeps."""
    if kernels._static_reason() is not None:
        missing(kernels._static_reason(), CXX)
    cxx, isa = kernels._compiler(), kernels.select_isa()[0]
    out = tmp_path_factory.mktemp("barrier") / "cpu_decode_sleep.so"
    # -O1: a third of -O3's compile time; the test compares this build with itself (1 thread and 4)
    flags = [f for f in kernels.build_flags("cpu_decode", isa) if f != "-O3"]
    for cmd in ([cxx, *flags, "-O1", "-DRZ_SPIN_MAX=0", "-c", "-o", f"{out}.o",
                 str(kernels.CSRC / "cpu_decode.cpp")], [cxx, *kernels.LINK_FLAGS, "-o", str(out), f"{out}.o"]):
        subprocess.run(cmd, check=True, capture_output=True)
    import ctypes

    lib = ctypes.CDLL(str(out))
    ref = kernels.load_decode()[0]
    lib.rz_decode.argtypes, lib.rz_decode.restype = ref.rz_decode.argtypes, None
    return lib


@pytest.mark.parametrize("version", ["v4", "v6", "v7"])
def test_sleeping_barrier_with_more_threads_than_cores_gives_the_same_step(sleeping_lib, version):
    kw = {} if version == "v4" else {"head_size": 16}
    base = rwkv_zoo.randomize_(rwkv_zoo.build(version, n_layer=2, n_embd=64, vocab_size=256, **kw), seed=3).eval()
    prompts = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()

    def run(model, lib, nt):
        torch.set_num_threads(nt)
        kinds, why = cpu_fused._kinds(model)
        assert not why, why
        step = cpu_fused.FusedDecode(model, kinds, lib)
        outs = []
        with torch.no_grad():
            logits, layers = step(model.emb(prompts[:, :5]), model.zero_state(2, wkv=False), True, 5)  # prefill
            outs.append(logits)
            state = RWKVState(layers, model.identity)
            for t in range(3):  # decode
                logits, layers = step(model.emb(prompts[:, 5:6] + t), state, False, 1)
                outs.append(logits)
                state = RWKVState(layers, model.identity)
        return outs + [t for ls in state.layers for t in ls.tensors()]

    try:
        for weights in ("fp32", "int8"):  # int8: the prepared-activation loop too
            model = prepare_inference(base, weights)
            want = run(model, sleeping_lib, 1)  # one thread: no barrier at all
            got = run(model, sleeping_lib, 4)
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (version, weights)
    finally:
        torch.set_num_threads(threads)
