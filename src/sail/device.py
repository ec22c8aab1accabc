"""Device selection shared by every stage that runs a model."""

from __future__ import annotations

import torch

from sail.errors import SailError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; CUDA asked for but absent
    is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise SailError(f"--device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SailError(
            f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)"
        )
    return resolved
