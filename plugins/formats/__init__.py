"""Built-in checkpoint formats, registered through ``rwkv_zoo_register_formats``.

- ``safetensors``: rwkv_zoo's own files: official keys, metadata with version and config.
- ``official-pth``: BlinkDL's ``.pth``: a ``torch.save``d dict of official keys. Read with
  ``weights_only=True`` (a pickle cannot run code) and memory-mapped.
- ``fla``: flash-linear-attention RWKV-6/7 folders (``model.layers.*`` keys), read.
- ``hf``: Hugging Face folders: transformers RWKV-4 (read, write), RWKV org remote-code v5/v6 (read,
  write), fla-hub RWKV-7 (write; read by ``fla``).
- ``gguf``: llama.cpp GGUF files for RWKV-6/7 (write; ``gguf_format.py``).

Order matters for detection: the folder formats first (fla before hf: both see ``model_type
"rwkv6"``, and each checks the stored key names), then the single-file formats.
"""

from __future__ import annotations

from rwkv_zoo.hookspecs import hookimpl

from .fla import FlaFolder
from .gguf_format import GGUFFormat
from .hf import HFFolder
from .official import OfficialPth
from .safetensors_format import SafetensorsFormat

FORMATS = [FlaFolder, HFFolder, SafetensorsFormat, OfficialPth, GGUFFormat]


@hookimpl
def rwkv_zoo_register_formats(register):
    for cls in FORMATS:
        register(cls())
