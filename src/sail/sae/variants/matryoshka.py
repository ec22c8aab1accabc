"""``matryoshka``: the corrected model.

ReLU before top-k, a trained unit-norm decoder, ``per_level`` (a K per prefix) or ``global`` (one
BatchTopK, prefix reconstructions of the same code) top-k, AuxK for dead latents, and JumpReLU
thresholds calibrated after training on held-out rows so the stored code is the last level's
selection (``calibrate``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from sail.errors import SailError
from sail.sae.model import (
    Calibration,
    SaeLensWeights,
    StackedSAE,
    TrainBatch,
    geometric_median,
    register_variant,
)
from sail.workspace import SEMANTICS


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


@register_variant
class MatryoshkaSAE(StackedSAE):
    variant = "matryoshka"
    state_names = ("W_enc", "b_enc", "W_dec", "b_dec", "thresholds")
    # NaN before calibration and +inf for a range that never fired; the weights must be finite
    nonfinite_state = ("thresholds",)
    calibrates = True
    uses_auxk = True

    def init_parameters(self, M: int, F: int, D: int, L: int) -> None:
        self.W_enc = nn.Parameter(torch.zeros(M, F, D))
        self.W_dec = nn.Parameter(torch.zeros(M, F, D))
        n_thr = L if self.topk_mode == "per_level" else 1
        # NaN until calibrated; after calibration inf marks a range that never fired (dead)
        self.register_buffer("thresholds", torch.full((M, n_thr), math.nan))
        self.register_buffer("calibrated", torch.zeros(M, dtype=torch.bool))

    @property
    def W_encoder(self) -> Tensor:
        return self.W_enc

    @property
    def W_decoder(self) -> Tensor:
        return self.W_dec

    @torch.no_grad()
    def initialize(
        self, seeds: list[int], x_sample_ND: Tensor | None = None, b_dec_init: str = "zeros"
    ) -> None:
        """Tied unit-norm init (encoder = decoder), zero b_enc, b_dec from ``b_dec_init``."""
        if len(seeds) != self.n_models:
            raise ValueError(f"need {self.n_models} seeds, got {len(seeds)}")
        M, F, D = self.n_models, self.n_latents, self.d_in
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        W = torch.stack([torch.randn(F, D, generator=g) for g in gens])
        W = W / W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        if b_dec_init == "zeros" or x_sample_ND is None:
            self.b_dec.zero_()
        elif b_dec_init == "mean":
            self.b_dec.copy_(x_sample_ND.double().mean(0).float().expand(M, D))
        elif b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x_sample_ND).expand(M, D))
        else:
            raise SailError(f"b_dec_init {b_dec_init!r}: expected zeros, mean or geometric_median")

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row."""
        if self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        # row-wise dot, no (M, F, D) temporary
        along = torch.matmul(g.unsqueeze(-2), W.unsqueeze(-1)).squeeze(-1)
        g.sub_(along * W)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def after_selection(self, batch: TrainBatch) -> tuple[Tensor | None, Tensor | None]:
        """AuxK on the dead latents, when the trainer passes them and a weight."""
        if not (batch.auxk_alpha > 0 and batch.dead_MF is not None and batch.auxk_k > 0):
            return None, None
        aux_loss_M, auxk_M = self.auxk_loss(
            batch.x_BD,
            batch.acts_MBF,
            batch.R_LMBD[-1].detach(),
            batch.dead_MF,
            batch.auxk_k,
            batch.ctx,
            batch.B_global,
        )
        return batch.auxk_alpha * aux_loss_M, auxk_M

    def latent_thresholds_MF(self) -> Tensor:
        """Per-latent JumpReLU threshold from the per-range thresholds."""
        return self.expand_thresholds(self.thresholds)

    @torch.no_grad()
    def inference_codes(self, x_BD: Tensor) -> Tensor:
        """Dense (M, B, F) codes as stored: the calibrated JumpReLU."""
        if not bool(self.calibrated.all()):
            raise SailError(
                "matryoshka SAE has no calibrated thresholds; calibrate on held-out rows first"
            )
        acts = tnf.relu(self.pre_activations(x_BD))
        return acts * (acts > self.latent_thresholds_MF()[:, None, :])

    @torch.no_grad()
    def calibrate(self, x_ND: Tensor, batch_size: int = 4096) -> list[Calibration]:
        """Thresholds that make the stored code reproduce the last level's training selection
        (``StackedSAE.jumprelu_calibration``)."""
        thresholds_MR, found = self.jumprelu_calibration(x_ND, batch_size)
        self.thresholds.copy_(thresholds_MR)
        self.calibrated.fill_(True)
        return found

    def after_load(self, m: int) -> None:
        self.calibrated[m] = not bool(torch.isnan(self.thresholds[m]).any())

    @classmethod
    def check_loadable(cls, cfg: dict[str, Any], where: str, allow_stale: bool) -> None:
        """Thresholds calibrated by an older SAIL (artifact semantics 1: per-prefix thresholds
        that collapse flat-K schedules) are refused unless ``allow_stale``."""
        if not allow_stale and cfg.get("artifact_semantics", 1) < SEMANTICS["train"]:
            raise SailError(
                f"{where}: its thresholds were calibrated by an older SAIL whose rule is wrong for "
                "flat-K schedules; run `sail train --recalibrate` (keeps the weights) or retrain"
            )

    def inference_summary(self, m: int) -> dict[str, Any]:
        return {
            "kind": "jumprelu",
            "per": "range" if self.topk_mode == "per_level" else "dictionary",
            "ranges": [list(r) for r in self.threshold_ranges()],
            # null: the range never fired on the calibration rows (threshold inf, its latents dead)
            "thresholds": _finite_or_none([float(t) for t in self.thresholds[m].tolist()]),
        }

    @torch.no_grad()
    def saelens_weights(self, m: int) -> SaeLensWeights:
        """SAELens ``jumprelu``: relu(pre) * (pre > threshold), one threshold per latent (inf for
        a range that never fired on the calibration rows)."""
        if not bool(self.calibrated[m]):
            raise SailError("matryoshka SAE has no calibrated thresholds; nothing to export")
        return SaeLensWeights(
            "jumprelu",
            self.W_enc[m].detach().float().T.contiguous(),
            self.b_enc[m].detach().float().clone(),
            self.W_dec[m].detach().float().clone(),
            self.b_dec[m].detach().float().clone(),
            self.latent_thresholds_MF()[m].detach().float().contiguous(),
        )
