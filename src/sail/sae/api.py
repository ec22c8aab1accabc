"""The single-SAE face of a trained checkpoint: ``sail.load_sae(DIR)`` returns a :class:`SAE`.

A stored SAE was trained on normalised rows (cfg.json's ``input_normalization``, per-row L2 for
every SAIL checkpoint). :meth:`SAE.encode` applies that normalisation itself, then the variant's
inference rule, so raw embeddings give exactly the codes the ``activations`` stage stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as tnf
from torch import Tensor

from sail.errors import SailError
from sail.sae.model import StackedSAE

NORMALIZATIONS = ("l2", "none")


class SAE:
    """One trained SAE: ``encode`` raw embeddings (N, D) into codes (N, F), ``decode`` codes.

    Attributes: ``cfg`` (cfg.json as a dict), ``W_dec`` (F, D) decoder rows, ``W_enc`` (F, D),
    ``b_enc`` (F,), ``b_dec`` (D,), ``d_in`` (D), ``d_sae`` (F), ``variant``, ``device``.
    """

    def __init__(self, stack: StackedSAE, cfg: dict[str, Any]):
        if stack.n_models != 1:
            raise SailError(f"an SAE holds one model, this stack holds {stack.n_models}")
        norm = cfg.get("input_normalization", "l2")
        if norm not in NORMALIZATIONS:
            raise SailError(
                f"cfg.json: input_normalization {norm!r} is not one of {', '.join(NORMALIZATIONS)}"
            )
        self.stack = stack.eval()
        self.cfg = cfg
        self.input_normalization = norm

    @classmethod
    def from_stack(cls, stack: StackedSAE) -> SAE:
        """A one-model stack as trained (L2-normalised input), e.g. fresh from ``train_family``."""
        return cls(stack, {"variant": stack.variant, "input_normalization": "l2"})

    # ----- what it is -----------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.stack.variant

    @property
    def d_in(self) -> int:
        return self.stack.d_in

    @property
    def d_sae(self) -> int:
        return self.stack.n_latents

    @property
    def device(self) -> torch.device:
        return self.stack.b_dec.device

    @property
    def W_dec(self) -> Tensor:
        """(F, D) decoder rows (unit norm for matryoshka; the tied encoder rows for sail)."""
        return self.stack.W_decoder[0].detach()

    @property
    def W_enc(self) -> Tensor:
        return self.stack.W_encoder[0].detach()

    @property
    def b_enc(self) -> Tensor:
        return self.stack.b_enc[0].detach()

    @property
    def b_dec(self) -> Tensor:
        return self.stack.b_dec[0].detach()

    def to(self, device: str | torch.device) -> SAE:
        self.stack.to(device)
        return self

    def __repr__(self) -> str:
        name = self.cfg.get("name", self.stack.specs[0].published_name)
        return f"SAE({self.variant} {name}, d_in={self.d_in}, d_sae={self.d_sae})"

    # ----- computing ------------------------------------------------------------------------------
    def _as_rows(self, x: np.ndarray | Tensor) -> Tensor:
        x_ND = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if x_ND.ndim == 1:
            x_ND = x_ND[None]
        if x_ND.ndim != 2 or x_ND.shape[1] != self.d_in:
            raise SailError(
                f"expected embeddings of shape (N, {self.d_in}), got {tuple(x_ND.shape)}"
            )
        return x_ND.to(self.device, torch.float32)

    def normalize(self, x_raw: np.ndarray | Tensor) -> Tensor:
        """The rows as the SAE sees them (cfg.json's ``input_normalization``)."""
        x_ND = self._as_rows(x_raw)
        return tnf.normalize(x_ND, dim=1) if self.input_normalization == "l2" else x_ND

    @torch.no_grad()
    def encode(self, x_raw: np.ndarray | Tensor) -> Tensor:
        """Codes (N, F) of raw embeddings (N, D) (numpy or torch): the stored input normalisation,
        then the variant's inference rule. Equal to what the activations stage stores."""
        return self.stack.inference_codes(self.normalize(x_raw))[0]

    @torch.no_grad()
    def decode(self, codes: np.ndarray | Tensor) -> Tensor:
        """Reconstructions (N, D) of codes (N, F), in the normalised input space."""
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, Tensor) else codes)
        c_NF = (c[None] if c.ndim == 1 else c).to(self.device, torch.float32)
        return c_NF @ self.W_dec.float() + self.b_dec.float()

    @torch.no_grad()
    def forward(self, x_raw: np.ndarray | Tensor) -> Tensor:
        """Reconstructions of raw embeddings, in their own units: decode(encode(x)) scaled back
        by each row's norm when the input is L2-normalised."""
        x_ND = self._as_rows(x_raw)
        recon = self.decode(self.encode(x_ND))
        if self.input_normalization == "l2":
            recon = recon * x_ND.norm(dim=1, keepdim=True)
        return recon

    __call__ = forward


def load_sae(
    sae_dir: str | Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    allow_stale: bool = False,
) -> SAE:
    """The trained SAE in ``sae_dir`` (model.safetensors + cfg.json), checked and ready to encode
    raw embeddings. ``verify``: compare the weights with the sha256 cfg.json recorded."""
    from sail.sae.checkpoint import load_stack

    stack, cfg = load_stack(sae_dir, device, allow_stale=allow_stale, verify=verify)
    return SAE(stack, cfg)
