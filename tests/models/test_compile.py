"""torch.compile of a whole model works: dispatch is stepped around, the kernels are traced.

``backend="eager"`` runs Dynamo's tracing and guards without Inductor's C++ code generation, which is
what can break when library code is not traceable; Inductor itself is torch's business and slow on CI.
"""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v4", "v5", "v6", "v7"])
def test_compiled_model_matches_eager_forward_and_backward(version):
    torch._dynamo.reset()
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=0)
    toks = torch.randint(0, 256, (1, 40))
    compiled = torch.compile(model, backend="eager")
    out, state = compiled(toks)
    ref, ref_state = model(toks)
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref.square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    step, _ = compiled(toks[:, :1], state.detach())
    torch.testing.assert_close(step, model(toks[:, :1], ref_state.detach())[0])
