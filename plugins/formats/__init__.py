"""Built-in checkpoint formats, registered through ``rwkv_zoo_register_formats``.

- ``safetensors``: rwkv_zoo's own files: official keys, metadata with version and config.
- ``official-pth``: BlinkDL's ``.pth``: a ``torch.save``d dict of official keys. Read with
  ``weights_only=True`` (a pickle cannot run code) and memory-mapped.
Further formats (HF folders, fla) live in sibling modules and register here too.
"""

from __future__ import annotations

from rwkv_zoo.hookspecs import hookimpl

from .official import OfficialPth
from .safetensors_format import SafetensorsFormat

FORMATS = [SafetensorsFormat, OfficialPth]


@hookimpl
def rwkv_zoo_register_formats(register):
    for cls in FORMATS:
        register(cls())
