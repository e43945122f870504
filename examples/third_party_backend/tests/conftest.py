"""Hermetic plugins: only rwkv_zoo's built-ins load from entry points; each test registers this plugin
itself (the ``rwkv_zoo_plugin`` fixture), so the tests pass installed or not, and no other installed
plugin changes what they see."""

from __future__ import annotations

import os

os.environ["RWKV_ZOO_NO_AUTOLOAD"] = "1"
os.environ.pop("RWKV_ZOO_BACKEND", None)
