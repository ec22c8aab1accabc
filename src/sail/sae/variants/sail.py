"""``sail``: the published model exactly (reference/spec_sae.md §1-2, §7.5).

Tied weights: the decoder is a stop-gradient copy of the encoder; an independent BatchTopK per
nested prefix with its own K and no ReLU; the mean of the level MSEs; and at inference a soft
threshold relu(pre - theta), theta the running mean of the smallest value kept at the last level.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from sail.errors import SailError
from sail.sae.distributed import DistContext
from sail.sae.model import SaeLensWeights, Selection, StackedSAE, TrainBatch, register_variant

# The published code switches validation to its threshold once this many steps contributed.
SAIL_THRESHOLD_MIN_STEPS = 100


@register_variant
class SailSAE(StackedSAE):
    variant = "sail"
    topk_modes = ("per_level",)
    nonnegative = False
    state_names = ("W", "b_enc", "b_dec", "theta_sum", "theta_count")
    default_recipe = "published"
    result_settings = (
        "epochs",
        "batch_size",
        "lr",
        "lr_min",
        "warmup_steps",
        "clip_norm",
        "seed",
        "permutation",
        "schedule",
    )
    validation_mode = "published"
    validation_label = "published"

    def init_parameters(self, M: int, F: int, D: int, L: int) -> None:
        self.W = nn.Parameter(torch.zeros(M, F, D))
        self.register_buffer("theta_sum", torch.zeros(M))
        self.register_buffer("theta_count", torch.zeros(M, dtype=torch.int64))

    @property
    def W_encoder(self) -> Tensor:
        return self.W

    @property
    def W_decoder(self) -> Tensor:
        # Published: the tied decoder reads the encoder's `.data`, so reconstructions train nothing.
        return self.W.detach()

    @torch.no_grad()
    def initialize(
        self, seeds: list[int], x_sample_ND: Tensor | None = None, b_dec_init: str = "zeros"
    ) -> None:
        """Published init: Xavier-uniform rows scaled to unit norm, zero biases."""
        if len(seeds) != self.n_models:
            raise ValueError(f"need {self.n_models} seeds, got {len(seeds)}")
        F, D = self.n_latents, self.d_in
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        bound = math.sqrt(6.0 / (D + F))
        W = torch.stack([(torch.rand(F, D, generator=g) * 2 - 1) * bound for g in gens])
        self.W.copy_(W / (W.norm(dim=-1, keepdim=True) + 1e-8))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def after_selection(self, batch: TrainBatch) -> tuple[Tensor | None, Tensor | None]:
        self._update_theta(batch.sels, batch.vals, batch.ctx)
        return None, None

    @torch.no_grad()
    def _update_theta(
        self, sels: list[Selection], vals: list[Tensor], ctx: DistContext | None = None
    ) -> None:
        """Published threshold: running mean of the smallest positive value kept at the last level.

        With ``ctx`` the minimum is taken over the global batch (all-reduced across ranks).
        """
        last = self.n_levels - 1
        lows = {}
        for s, v in zip(sels, vals, strict=False):
            if s.level != last:
                continue
            pos = torch.where(
                v > 0, v.detach().float(), torch.full_like(v, math.inf, dtype=torch.float32)
            )
            lows[s.model] = pos.min() if pos.numel() else torch.tensor(math.inf, device=v.device)
        if ctx is not None:
            reduced = ctx.all_reduce(torch.stack([lows[m] for m in sorted(lows)]), "min")
            lows = dict(zip(sorted(lows), reduced, strict=False))
        for m, low in lows.items():
            has = torch.isfinite(low)
            self.theta_sum[m] += torch.where(has, low, torch.zeros_like(low))
            self.theta_count[m] += has.to(torch.int64)

    def theta_M(self) -> Tensor:
        """The inference threshold theta = sum / count (0 before any step)."""
        return self.theta_sum / self.theta_count.clamp_min(1).to(self.theta_sum.dtype)

    @torch.no_grad()
    def inference_codes(self, x_BD: Tensor) -> Tensor:
        """Dense (M, B, F) codes as stored: the soft threshold relu(pre - theta)."""
        return tnf.relu(self.pre_activations(x_BD) - self.theta_M()[:, None, None])

    def resolve_eval_mode(self, mode: str) -> str:
        """``published``: what the published validation used (its threshold once 100 steps
        contributed, else per-sample top-k)."""
        if mode != "published":
            return mode
        ready = bool((self.theta_count >= SAIL_THRESHOLD_MIN_STEPS).all())
        return "inference" if ready else "sample_topk"

    def calibrate(self, x_ND: Tensor, batch_size: int = 4096):
        raise SailError("the sail variant uses the published soft threshold; it is not calibrated")

    def inference_summary(self, m: int) -> dict[str, Any]:
        return {
            "kind": "soft_threshold",
            "theta": float(self.theta_M()[m]),
            "theta_sum": float(self.theta_sum[m]),
            "theta_count": int(self.theta_count[m]),
        }

    @torch.no_grad()
    def saelens_weights(self, m: int) -> SaeLensWeights:
        """SAELens ``standard``: relu(pre - theta) is relu of pre with b_enc shifted by -theta."""
        W = self.W[m].detach().float()
        return SaeLensWeights(
            "standard",
            W.T.contiguous(),
            (self.b_enc[m].detach().float() - self.theta_M()[m].float()).contiguous(),
            W.clone(),
            self.b_dec[m].detach().float().clone(),
            notes=["b_enc holds b_enc - theta (the soft threshold is a bias shift)"],
        )
