"""The built-in SAE variants; importing this package registers them (``sail.sae.model``)."""

from sail.sae.variants.matryoshka import MatryoshkaSAE
from sail.sae.variants.sail import SailSAE

__all__ = ["MatryoshkaSAE", "SailSAE"]
