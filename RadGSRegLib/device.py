"""Which torch device a setting names, checked before any work."""
from __future__ import annotations

from .errors import InputError

__all__ = ["resolve_device"]


def resolve_device(name: str, option: str = "--device"):
    """``torch.device(name)`` for "cpu", "cuda" or "cuda:N", refusing (InputError naming
    ``option``) a CUDA device this machine does not have."""
    import torch

    name = str(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"{option} {name}: CUDA is not available here ({build}, torch {torch.__version__}); "
                             f"use {option} cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)
