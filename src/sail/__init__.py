"""SAIL: sparse autoencoders for interpretable medical image representations.

``sail.load_sae(DIR)`` returns a trained :class:`sail.SAE`; both are imported on first use, so
``import sail`` stays light (no torch, no pydantic).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["SAE", "load_sae", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("SAE", "load_sae"):
        from sail.sae import api

        return getattr(api, name)
    raise AttributeError(f"module 'sail' has no attribute {name!r}")
