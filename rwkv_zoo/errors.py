"""The errors a user can meet, and the one way dtype and device names are read.

Every mistake a user can make (a file, a name, a value, a state, a config) raises a subclass of
``RWKVZooError`` whose message is one sentence naming the thing and what to do. The classes also keep
the builtin base they had before this family existed (``ValueError`` for most, ``RuntimeError`` for
``BackendError``), so code written as ``except ValueError`` keeps catching them.

The command line prints such an error as one line and exits with the class's ``exit_code``: 2 for a
mistake on the command line itself (``UsageError``), 1 for everything that failed while running.

``parse_dtype`` and ``parse_device`` are the only readers of dtype and device names: ``build``,
``load``, ``explain`` and every CLI flag go through them, so ``"bf16"`` means the same everywhere.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEVICE_NAMES",
    "DTYPE_NAMES",
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "RWKVZooError",
    "StateMismatchError",
    "UnknownNameError",
    "UsageError",
    "check_device_usable",
    "parse_device",
    "parse_dtype",
]


class RWKVZooError(Exception):
    """Base of every error caused by what the user asked for; the message says what to do."""

    exit_code = 1


class UsageError(RWKVZooError):
    """A mistake on the command line: printed as one message, exit status 2."""

    exit_code = 2


class UnknownNameError(RWKVZooError, ValueError):
    """A name (dtype, device, version, size, backend, ...) that is not known; the message lists the known ones."""


class CheckpointError(RWKVZooError, ValueError):
    """A checkpoint cannot be read or does not fit: the message says what was found and expected."""


class StateMismatchError(RWKVZooError, ValueError):
    """A state that belongs to another model (version, dims, batch, layers)."""


class ConfigError(RWKVZooError, ValueError):
    """A configuration value (a training config, a generation setting) that cannot be used."""


class BackendError(RWKVZooError, RuntimeError):
    """No backend can run a kernel call, or the one asked for cannot; the message gives every reason."""


# ---------------------------------------------------------------------------------------------------
# dtype and device names

# Floating dtypes only: these name weights and activations, and an integer model makes no sense.
_DTYPE_ALIASES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: ("fp32", "float32", "float", "f32"),
    torch.bfloat16: ("bf16", "bfloat16"),
    torch.float16: ("fp16", "float16", "half", "f16"),
    torch.float64: ("fp64", "float64", "double", "f64"),
}
DTYPE_NAMES: dict[str, torch.dtype] = {name: dt for dt, names in _DTYPE_ALIASES.items() for name in names}

# What the error message offers; torch.device accepts a few more (xla, hpu, ...), which pass through.
DEVICE_NAMES = ("cpu", "cuda", "cuda:N", "mps", "xpu", "meta")


def _dtype_list() -> str:
    return "; ".join("/".join(names) for names in _DTYPE_ALIASES.values())


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``torch.bfloat16`` -> ``torch.bfloat16``; None -> None.

    Case does not matter. Anything else, or a non-floating dtype, raises ``UnknownNameError`` listing the names.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in _DTYPE_ALIASES:
            return value
        raise UnknownNameError(f"dtype {value} is not a floating dtype a model can use; dtypes: {_dtype_list()}")
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise UnknownNameError(f"unknown dtype {value!r}; dtypes: {_dtype_list()}")


def parse_device(value: str | torch.device | None) -> torch.device | None:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"meta"``, a ``torch.device`` -> ``torch.device``; None -> None.

    Whether the device exists on this machine is not checked here: ``explain`` asks about devices that
    are absent on purpose. Unknown names raise ``UnknownNameError`` listing the usual ones.
    """
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value.strip())
        except (RuntimeError, ValueError):
            pass
    raise UnknownNameError(f"unknown device {value!r}; devices: {', '.join(DEVICE_NAMES)} (N: a GPU index)")


def check_device_usable(device: torch.device) -> None:
    """Refuse, with what to do, a device this machine cannot allocate on (before torch fails deep inside)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if not torch.version.cuda else "no CUDA GPU is visible"
            raise UnknownNameError(f"device {str(device)!r} cannot be used: {why}; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UnknownNameError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UnknownNameError("device 'mps' cannot be used: no Apple GPU is available here; use device='cpu'")
