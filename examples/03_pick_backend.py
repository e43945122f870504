"""Choose the WKV kernel backend, and plug in your own.

Shows:
- ``rwkv_zoo.list_backends()``: what is registered, with priorities and availability;
- the three explicit ways to pick a backend: ``build(..., backend=...)``,
  ``with rwkv_zoo.use_backend(...):`` and the ``RWKV_ZOO_BACKEND`` environment variable;
- an in-process plugin (``with rwkv_zoo.plugin(...)``) whose ``rwkv_zoo_register_backends`` hook
  registers a ``rwkv_zoo.Backend`` with a higher priority than ``reference``: a toy that wraps the
  reference chunked wkv6 kernel and counts its calls. ``rwkv_zoo.explain`` then picks it for v6, and
  keeps ``reference`` wherever the toy has no kernel (its decode step, and other versions);
- that an explicit choice which cannot run a call raises ``BackendError``; it never falls back silently.

A real third-party backend is the same plugin in its own distribution, found through the
``rwkv_zoo`` entry-point group. Run: ``python examples/03_pick_backend.py``
"""

from __future__ import annotations

import torch

import rwkv_zoo


class ToyBackendPlugin:
    """A plugin object: pluggy finds its ``@rwkv_zoo.hookimpl`` methods by name."""

    def __init__(self) -> None:
        from rwkv_zoo.backends.reference.chunk import wkv6_chunk  # the kernel this toy wraps

        self.inner = wkv6_chunk
        self.calls = 0

    def toy_wkv6(self, r, k, v, w, u, state):
        self.calls += 1
        return self.inner(r, k, v, w, u, state)

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_backends(self, register):
        register(
            rwkv_zoo.Backend(
                name="toy",
                kernels=[rwkv_zoo.Kernel("wkv6", "chunk", self.toy_wkv6, devices=["cpu"], dtypes=[torch.float32])],
                priority=10,  # reference has 0: the toy wins every call it can run
                description="example: the reference wkv6 chunk kernel, counting its calls",
            )
        )


def show_backends() -> None:
    for b in rwkv_zoo.list_backends():
        ops = "; ".join(f"{op}: {'+'.join(modes)}" for op, modes in b["ops"].items())
        status = "available" if b["available"] else f"unavailable ({b['reason']})"
        print(f"  {b['name']} (priority {b['priority']}, from {b['provider']}): {status}; {ops}")


@torch.no_grad()
def main() -> None:
    print("registered backends:")
    show_backends()

    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6-tiny"), seed=0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 48))

    print("\n== explicit choices ==")
    forced = rwkv_zoo.build("v6-tiny", backend="reference")
    print(f"build(..., backend='reference') -> model.backend = {forced.backend!r}")
    with rwkv_zoo.use_backend("reference"):
        print(rwkv_zoo.explain(model, tokens, requires_grad=False))
        reference_logits, _ = model(tokens)
    print("(RWKV_ZOO_BACKEND=reference in the environment does the same for a whole process)")

    toy = ToyBackendPlugin()
    with rwkv_zoo.plugin(toy, name="toy-example"):
        print("\n== with the toy backend plugin registered ==")
        show_backends()
        print(rwkv_zoo.explain(model, tokens, requires_grad=False, has_state=True))
        logits, _ = model(tokens)
        print(f"the model ran the toy kernel {toy.calls} time(s) (once per layer); relative difference "
              f"from the reference run: {float((logits - reference_logits).norm() / reference_logits.norm()):.1e}")

        print("\nthe toy has no recurrent kernel, so a decoding step stays on reference:")
        print(rwkv_zoo.explain(model, (1, 1), requires_grad=False, has_state=True))

        v7 = rwkv_zoo.build("v7-tiny", device="meta")
        try:
            with rwkv_zoo.use_backend("toy"):
                rwkv_zoo.explain(v7, (1, 48), device="cpu", requires_grad=False)
        except rwkv_zoo.BackendError as exc:
            print(f"\nuse_backend('toy') on v7 raises BackendError:\n  {exc}")

    print(f"\nafter the block the plugin is gone: {[b['name'] for b in rwkv_zoo.list_backends()]}")


if __name__ == "__main__":
    main()
