"""Versions registered from outside, through the documented API only, get everything the built-ins get.

Three kinds: the PLUGINS.md "Write a version" example as written (a new time-mix class on an existing
op), a subclass of a built-in time-mix that changes the maths (it must never run its parent's fused
step), and a version on a new op that the same plugin registers (tests/plugins/test_write_an_op.py).
Each one decodes token by token equal to its parallel forward on the default path (no gradients),
generates, saves and loads as itself, joins a per-layer hybrid and says in ``explain`` what runs it.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.testing import registered_plugin

PLUGINS_MD = Path(__file__).resolve().parents[2] / "PLUGINS.md"


def _code_block(section: str) -> str:
    text = PLUGINS_MD.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block in the {section!r} section of PLUGINS.md"
    return max(blocks, key=len)


def _module(name: str, code: str, monkeypatch) -> types.ModuleType:
    """Run ``code`` as the module ``name`` (registered in sys.modules, as an imported plugin would be)."""
    mod = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, mod)
    exec(compile(code, f"<PLUGINS.md:{name}>", "exec"), mod.__dict__)
    return mod


def _halved_v6() -> types.ModuleType:
    """A plugin module: v6 whose time-mix output is halved (a subclass that changes the maths)."""
    from rwkv_zoo.registry import SizePreset, VersionSpec
    from rwkv_zoo.versions import v6

    class HalvedTimeMix(v6.V6TimeMix):
        def forward(self, x, shift, wkv, ctx):
            out, shift, wkv = super().forward(x, shift, wkv, ctx)
            return out / 2, shift, wkv

    class HalvedBlock(v6.V6Block):
        time_mix_cls = HalvedTimeMix

    mod = types.ModuleType("halved_v6")
    mod.SPEC = VersionSpec("v6half", "v6 with a halved time-mix", v6.V6Config, block_cls=HalvedBlock,
                           sizes=(v6.SPEC.preset("tiny"),), param_groups=v6.param_groups, wkv_op="wkv6")

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_versions(register):
        register(mod.SPEC)

    mod.rwkv_zoo_register_versions = rwkv_zoo_register_versions
    assert isinstance(mod.SPEC.sizes[0], SizePreset)
    return mod


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _check_outside_version(name: str, tmp_path: Path, *, official_file: bool) -> None:
    model = rwkv_zoo.randomize_(rwkv_zoo.build(f"{name}-tiny"), seed=3).eval()
    assert model.version == name
    V = model.config.vocab_size
    toks = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, full_state = model(toks)
        state, steps = None, []
        for t in range(toks.shape[1]):  # the default decode path, token by token
            logits, state = model(toks[:, t : t + 1], state)
            steps.append(logits)
    assert _rel(torch.cat(steps, 1), full) < 1e-5
    assert all(_rel(a, b) < 1e-5 for a, b in zip(state.layers[-1].tensors(), full_state.layers[-1].tensors(),
                                                 strict=True) if b.norm() > 0)
    # explain names what runs the body: the modules, because no fused step implements this version
    execution = rwkv_zoo.explain(model, toks[:, :1]).execution
    assert execution.startswith("the modules"), execution
    assert "not one the C++ step implements" in execution or "which has no fused step" in execution, execution
    # generate
    out = rwkv_zoo.generate(model, toks[0].tolist(), max_new_tokens=4, temperature=0)
    assert len(out.tokens) == 4 and all(0 <= t < V for t in out.tokens)
    # saved and loaded as itself
    files = [tmp_path / f"{name}.safetensors"] + ([tmp_path / f"{name}.pth"] if official_file else [])
    for path in files:
        rwkv_zoo.save(model, path)
        back = rwkv_zoo.load(path)
        assert back.version == name and type(back.blocks[0].att) is type(model.blocks[0].att), path
        with torch.no_grad():
            again, _ = back(toks)
        assert _rel(again, full) < 1e-6, path
    # joins a per-layer hybrid with a built-in version; the hybrid decodes like its parallel forward too
    hybrid = rwkv_zoo.randomize_(rwkv_zoo.build("v6", size="tiny", layers=f"{name},v6"), seed=4).eval()
    assert type(hybrid.blocks[0].att) is type(model.blocks[0].att)
    with torch.no_grad():
        hfull, _ = hybrid(toks)
        state, steps = None, []
        for t in range(toks.shape[1]):
            logits, state = hybrid(toks[:, t : t + 1], state)
            steps.append(logits)
    assert _rel(torch.cat(steps, 1), hfull) < 1e-5


def test_the_plugins_md_example_runs_as_written(tmp_path, monkeypatch):
    mod = _module("mini_version", _code_block("Write a version"), monkeypatch)
    with registered_plugin(mod, "mini"):
        assert "mini" in rwkv_zoo.list_versions() and "mini-tiny" in rwkv_zoo.list_models()
        _check_outside_version("mini", tmp_path, official_file=True)
        # initialised by its own init_weights (build fills parameters with NaN first: none may be left)
        fresh = rwkv_zoo.build("mini-tiny")
        assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert "mini" not in rwkv_zoo.list_versions()


def test_a_subclass_that_changes_the_maths_decodes_with_its_own(tmp_path):
    with registered_plugin(_halved_v6(), "halved"):
        _check_outside_version("v6half", tmp_path, official_file=False)
        # its output really differs from v6's: the decode path did not fall back to the parent's maths
        plain = rwkv_zoo.randomize_(rwkv_zoo.build("v6-tiny"), seed=3).eval()
        half = rwkv_zoo.randomize_(rwkv_zoo.build("v6half-tiny"), seed=3).eval()
        tok = torch.tensor([[5]])
        with torch.no_grad():
            assert _rel(half(tok)[0], plain(tok)[0]) > 1e-3


def test_unknown_component_in_a_hybrid_names_the_versions():
    with pytest.raises(ValueError, match="not a version with blocks; use one of .*v7"):
        rwkv_zoo.build("v7", size="tiny", layers="nope,v7")


_DECAYSUM_VERSION = '''
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from rwkv_zoo.model import Block, RWKVConfig, token_shift
from rwkv_zoo.registry import SizePreset, VersionSpec
from rwkv_zoo.versions.v4 import V4ChannelMix


@dataclass
class DsumConfig(RWKVConfig):
    version: ClassVar[str] = "dsum"
    has_heads: ClassVar[bool] = False


class DsumTimeMix(nn.Module):
    wkv_op = "decaysum"

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        self.kernel_heads, self.kernel_head_size = 1, C
        self.time_mix = nn.Parameter(torch.full((1, 1, C), 0.5))
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def zero_wkv(self, batch_size, device):
        return torch.zeros(batch_size, self.time_decay.shape[0], device=device)

    def forward(self, x, shift, wkv, ctx):
        xx, new_shift = token_shift(x, shift)
        xm = torch.lerp(xx, x, self.time_mix)
        w = -torch.exp(self.time_decay.float())
        y, wkv = rwkv_zoo.ops.call("decaysum", w, self.key(xm), self.value(xm), state=wkv, mode=ctx.mode,
                                   backend=ctx.backend)
        return self.output(torch.sigmoid(self.receptance(xm)) * y), new_shift, wkv

    @torch.no_grad()
    def init_weights(self):
        self.time_mix.fill_(0.5)
        self.time_decay.fill_(0.0)
        for lin in (self.key, self.value, self.receptance, self.output):
            nn.init.orthogonal_(lin.weight, 0.5)


class DsumBlock(Block):
    time_mix_cls = DsumTimeMix
    channel_mix_cls = V4ChannelMix


DSUM = VersionSpec("dsum", "a version on the decaysum op", DsumConfig, block_cls=DsumBlock,
                   sizes=(SizePreset("tiny", 2, 64, 256, released=False),), wkv_op="decaysum")


@rwkv_zoo.hookimpl
def rwkv_zoo_register_versions(register):
    register(DSUM)
'''


def test_a_version_on_a_new_op_from_the_same_plugin(tmp_path, monkeypatch):
    """One plugin module registers an op (PLUGINS.md 'Write an op', as written), a backend kernel for it
    and a version whose time-mix calls it."""
    code = _code_block("Write an op").split("\n```", 1)[0]
    mod = _module("decaysum_plugin", code + _DECAYSUM_VERSION, monkeypatch)
    with registered_plugin(mod, "decaysum-plugin"):
        assert "decaysum" in rwkv_zoo.list_ops() and "dsum" in rwkv_zoo.list_versions()
        _check_outside_version("dsum", tmp_path, official_file=False)
        model = rwkv_zoo.build("dsum-tiny")
        text = str(rwkv_zoo.explain(model, (1, 100)))
        assert "decaysum [chunk]" in text and "-> mysum" in text, text
