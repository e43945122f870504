"""Suite-wide settings: hermetic plugins (built-ins only; third-party entry points are not loaded)."""

from __future__ import annotations

import os

# Before rwkv_zoo loads its plugins: installed third-party plugins must not change what tests see.
os.environ.setdefault("RWKV_ZOO_NO_AUTOLOAD", "1")
os.environ.pop("RWKV_ZOO_BACKEND", None)
os.environ.pop("RWKV_ZOO_DISABLE_PLUGINS", None)

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
