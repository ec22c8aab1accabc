"""Spatial feature maps: where on a slice an SAE feature fires, exact for mean-pooled encoders.

A mean-pooled encoder's embedding is x = mean_p h_p over the positions p of its last feature grid.
The SAE sees x / s (s = ||x|| under cfg.json's per-row L2 ``input_normalization``, else 1), so the
pre-activation of feature f is

    pre_f = w_f . (x / s - b_dec) + b_enc_f = mean_p [ w_f . (h_p / s - b_dec) + b_enc_f ].

The bracket is the map: one value per grid position whose mean is exactly the pre-activation
(s and the biases are constants of the image). It costs one encoder pass that keeps the grid.
Encoders that pool otherwise (DINOv3's CLS token) have no such identity and get a SailError.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sail.encoders.base import Encoder
from sail.errors import SailError
from sail.sae.api import SAE


class MapsResult(NamedTuple):
    """Spatial maps of K features over a batch of B slices.

    ``maps_BKhw``: float32 per-position contributions on the encoder's grid (h, w); their mean
    over (h, w) is ``pre_BK``. ``pre_BK``: the SAE pre-activations (before the variant's threshold)
    of the pooled embeddings. ``features_K``: the feature indices, in the order of K.
    ``method``: ``"exact"`` (the mean-pooled decomposition), ``"approximate"`` (patch tokens
    through the SAE, :mod:`sail.maps.methods`) or ``"occlusion"``.
    """

    maps_BKhw: Tensor
    pre_BK: Tensor
    features_K: Tensor
    method: str


def feature_indices(features: list[int] | Tensor, d_sae: int) -> Tensor:
    features_K = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if features_K.numel() == 0:
        raise SailError("feature maps: no features given")
    bad = features_K[(features_K < 0) | (features_K >= d_sae)]
    if bad.numel():
        raise SailError(f"feature maps: feature {int(bad[0])} is not in 0..{d_sae - 1}")
    return features_K


@torch.no_grad()
def feature_maps(
    encoder: Encoder, sae: SAE, images_BCHW: Tensor, features: list[int] | Tensor
) -> MapsResult:
    """Exact spatial maps of ``features`` for raw 0-255 slices (as ``Encoder.encode`` takes).

    Raises SailError for an encoder without a mean-pooled grid, or an SAE of another width.
    """
    return maps_from_grid(encoder.encode_grid(images_BCHW), sae, features, encoder.name)


def check_width(D: int, sae: SAE, source: str) -> None:
    if sae.d_in != D:
        raise SailError(f"feature maps: {source} gives {D}-d features, the SAE takes {sae.d_in}")


@torch.no_grad()
def maps_from_grid(
    grid_BDhw: Tensor, sae: SAE, features: list[int] | Tensor, source: str = "the encoder"
) -> MapsResult:
    """Exact maps from a mean-pooled encoder's (B, D, h, w) grid (one encoder pass can serve
    several SAEs of that encoder); ``source`` names the encoder in errors."""
    grid_BDhw = grid_BDhw.to(sae.device, torch.float32)
    B, D, h, w = grid_BDhw.shape
    check_width(D, sae, source)
    features_K = feature_indices(features, sae.d_sae).to(sae.device)
    x_BD = grid_BDhw.mean(dim=(2, 3))
    scale_B = (
        x_BD.norm(dim=1).clamp_min(1e-12)  # F.normalize's floor, so maps match SAE.normalize
        if sae.input_normalization == "l2"
        else torch.ones(B, device=sae.device)
    )
    # Centre each position as the SAE centres the pooled row (dense_pre: x - b_dec, then W).
    h_BPD = grid_BDhw.flatten(2).transpose(1, 2) / scale_B[:, None, None] - sae.b_dec.float()
    W_KD, b_K = sae.W_enc.float()[features_K], sae.b_enc.float()[features_K]
    maps_BKhw = (h_BPD @ W_KD.T + b_K).transpose(1, 2).reshape(B, len(features_K), h, w)
    pre_BK = sae.stack.pre_activations(sae.normalize(x_BD))[0][:, features_K].float()
    return MapsResult(maps_BKhw.contiguous(), pre_BK, features_K.cpu(), "exact")
