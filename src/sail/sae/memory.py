"""A memory estimate checked before an SAE family is built, so an absurd dictionary size is a clear
error naming the config instead of an allocator failure (or the kernel's OOM killer) mid-run."""

from __future__ import annotations

import os

import torch

from sail.errors import SailError

# float32 parameters, their gradients and Adam's two moments: 16 bytes per parameter; a batch holds
# a few (B, F) float32 tensors (pre-activations, codes, gradients).
_BYTES_PER_PARAM = 16
_BATCH_TENSORS = 6


def family_bytes(dict_size: int, d_in: int, n_models: int, batch_size: int) -> int:
    params = 2 * dict_size * d_in + dict_size + d_in
    return n_models * (params * _BYTES_PER_PARAM + _BATCH_TENSORS * batch_size * dict_size * 4)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def check_fits(
    names: list[str], dict_size: int, d_in: int, batch_size: int, device: torch.device
) -> None:
    """Refuse a family that cannot fit in the device's memory, naming its configs and the
    estimate."""
    need = family_bytes(dict_size, d_in, len(names), batch_size)
    have = available_bytes(device)
    if need > have:
        raise SailError(
            f"SAE config(s) {', '.join(names)}: dictionary size {dict_size} x d_in {d_in} needs "
            f"about {need / 2**30:,.1f} GiB but {device} has {have / 2**30:,.1f} GiB; use smaller "
            "dict_sizes or a smaller batch_size"
        )
