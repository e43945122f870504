"""A plugin whose kernel breaks the op contract never corrupts a model run: the op front-ends check
each kernel's ``y`` and final state (shape, dtype) and raise a ``BackendError`` naming the backend and
its plugin, with the way out. (A plugin that fails at import is covered in test_plugins.py.)"""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.backends.reference.chunk import wkv4_chunk, wkv6_chunk, wkv7_chunk
from rwkv_zoo.testing import registered_plugin


def _greedy(kernels):
    class Greedy:  # priority 100: picked for every call it claims
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(rwkv_zoo.Backend("greedy", kernels, priority=100))

    return registered_plugin(Greedy(), "greedy-plugin")


def _wkv6_short_y(*a):
    y, s = wkv6_chunk(*a)
    return y[:, :-1], s


def _wkv6_transposed_y(*a):
    y, s = wkv6_chunk(*a)
    return y.transpose(1, 2), s


def _wkv6_state_bf16(*a):
    y, s = wkv6_chunk(*a)
    return y, s.bfloat16()


def _wkv6_y_only(*a):
    return wkv6_chunk(*a)[0]


def _wkv7_value_first_state(*a):
    y, s = wkv7_chunk(*a)
    return y, s[..., :-1]


def _wkv4_two_state_tensors(*a):
    y, (num, den, _) = wkv4_chunk(*a)
    return y, (num, den)


@pytest.mark.parametrize(
    ("op", "fn", "expected"),
    [
        ("wkv6", _wkv6_short_y, "y has shape [1, 23, "),
        ("wkv6", _wkv6_transposed_y, "16], expected [1, 24, "),
        ("wkv6", _wkv6_state_bf16, "final state is bfloat16, expected float32"),
        ("wkv6", _wkv6_y_only, "not a pair (y, final_state)"),
        ("wkv7", _wkv7_value_first_state, "final state has shape [1, "),
        ("wkv4", _wkv4_two_state_tensors, "final state must be a tuple of 3 tensors"),
    ],
    ids=["short-y", "transposed-y", "bf16-state", "no-state", "bad-state-shape", "wkv4-state"],
)
def test_a_kernel_breaking_the_contract_is_named_and_its_result_never_used(op, fn, expected):
    version = {"wkv4": "v4", "wkv6": "v6", "wkv7": "v7"}[op]
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 24))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref, _ = model(tokens)
        with _greedy([rwkv_zoo.Kernel(op, "chunk", fn)]):
            assert "-> greedy (priority" in str(rwkv_zoo.explain(model, tokens))
            with pytest.raises(rwkv_zoo.BackendError) as err:
                model(tokens)
            msg = str(err.value)
            assert f"backend 'greedy' (plugin 'greedy-plugin') broke the {op} contract in chunk mode" in msg
            assert expected in msg, msg
            assert "RWKV_ZOO_DISABLE_PLUGINS=greedy-plugin" in msg
            with rwkv_zoo.use_backend("reference"):  # the way out, while the plugin is still there
                torch.testing.assert_close(model(tokens)[0], ref)
        again, _ = model(tokens)
    torch.testing.assert_close(again, ref)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), f"{n} changed"


def test_builtins_name_their_distribution_and_failed_plugins_show_in_explain():
    plugins = {p["name"]: p for p in rwkv_zoo.list_plugins()}
    assert plugins["rwkv_zoo.backends.reference"]["distribution"] == f"rwkv-zoo {rwkv_zoo.__version__}"

    class Exploding:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            raise RuntimeError("driver exploded")

    model = rwkv_zoo.build("v6-tiny", device="meta")
    with registered_plugin(Exploding(), "exploding-plugin"):
        text = str(rwkv_zoo.explain(model, (1, 32)))
        assert "not considered: plugin exploding-plugin failed: RuntimeError: driver exploded" in text
        with pytest.raises(ValueError, match="Not loaded: plugin exploding-plugin failed"), \
                rwkv_zoo.use_backend("exploding"):
            rwkv_zoo.explain(model, (1, 32))
    assert "not considered" not in str(rwkv_zoo.explain(model, (1, 32)))
