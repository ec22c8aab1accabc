"""The two spatial-map methods beside the exact decomposition, and the rule that picks one.

- ``approximate`` (DINOv3, whose embedding is the CLS token): every final-LayerNorm patch token
  goes through the SAE encoder as if it were an embedding (normalised per token as the SAE
  normalises rows). The map says which patches look like the feature, but its mean is not the
  pre-activation of the CLS embedding, so it is labelled approximate wherever it is shown.
- ``occlusion`` (any encoder, opt-in): a grid of cells is blanked (set to 0, the background of
  the slices) one at a time; the map is the drop in the feature's pre-activation, so a positive
  cell is a region that raises the feature. One encoder pass per cell: G x G times the cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sail.encoders.base import Encoder
from sail.errors import SailError
from sail.maps.decompose import MapsResult, feature_indices, feature_maps
from sail.sae.api import SAE

METHODS = ("exact", "approximate", "occlusion")


def resolve_method(encoder: Encoder, requested: str) -> str:
    """``auto``: exact for a mean-pooled encoder, approximate for one with patch tokens
    (DINOv3); an explicit method the encoder cannot give is a SailError naming the way out."""
    exact = type(encoder).forward_grid is not Encoder.forward_grid
    tokens = hasattr(encoder, "encode_patch_grid")
    if requested == "auto":
        if exact:
            return "exact"
        if tokens:
            return "approximate"
        raise SailError(
            f"maps: {encoder.name} pools by {encoder.pooled_by} and has no patch tokens; set "
            "maps.method: occlusion"
        )
    if requested == "exact" and not exact:
        raise SailError(
            f"maps.method exact: {encoder.name} pools by {encoder.pooled_by}; use auto "
            "(approximate where it has patch tokens) or occlusion"
        )
    if requested == "approximate" and not tokens:
        raise SailError(f"maps.method approximate: {encoder.name} has no patch tokens; use auto")
    if requested not in METHODS:
        raise SailError(f"maps.method {requested!r}: use auto, {', '.join(METHODS)}")
    return requested


@torch.no_grad()
def pre_activations(sae: SAE, x_ND: Tensor, features_K: Tensor) -> Tensor:
    """(N, K) SAE pre-activations (before the variant's threshold) of raw rows ``x_ND``."""
    return sae.stack.pre_activations(sae.normalize(x_ND))[0][:, features_K].float()


@torch.no_grad()
def approximate_maps(
    encoder: Encoder, sae: SAE, images_BCHW: Tensor, features: list[int] | Tensor
) -> MapsResult:
    """Patch tokens through the SAE encoder: (B, K, h, w) pre-activations of each token."""
    features_K = feature_indices(features, sae.d_sae).to(sae.device)
    pooled_BD, grid_BDhw = encoder.encode_patch_grid(images_BCHW)  # type: ignore[attr-defined]
    B, D, h, w = grid_BDhw.shape
    if sae.d_in != D:
        raise SailError(
            f"feature maps: {encoder.name} gives {D}-d features, the SAE takes {sae.d_in}"
        )
    tokens_ND = grid_BDhw.to(sae.device).flatten(2).transpose(1, 2).reshape(B * h * w, D)
    maps_NK = pre_activations(sae, tokens_ND, features_K)
    maps_BKhw = maps_NK.reshape(B, h * w, -1).transpose(1, 2).reshape(B, -1, h, w)
    pre_BK = pre_activations(sae, pooled_BD.to(sae.device), features_K)
    return MapsResult(maps_BKhw.contiguous(), pre_BK, features_K.cpu(), "approximate")


def occlusion_cells(height: int, width: int, grid: int) -> Tensor:
    """(grid * grid, H, W) bool masks of the occluding cells, row-major, tiling the image."""
    ys = torch.linspace(0, height, grid + 1).round().long()
    xs = torch.linspace(0, width, grid + 1).round().long()
    iy = torch.bucketize(torch.arange(height), ys[1:-1], right=True)
    ix = torch.bucketize(torch.arange(width), xs[1:-1], right=True)
    cell_HW = iy[:, None] * grid + ix[None, :]
    return cell_HW[None] == torch.arange(grid * grid)[:, None, None]


@torch.no_grad()
def occlusion_maps(
    encoder: Encoder,
    sae: SAE,
    images_BCHW: Tensor,
    features: list[int] | Tensor,
    grid: int = 8,
    batch_size: int = 32,
) -> MapsResult:
    """(B, K, grid, grid) drops of the pre-activation when each cell is blanked (0)."""
    features_K = feature_indices(features, sae.d_sae).to(sae.device)
    B, _, H, W = images_BCHW.shape
    keep_GHW = ~occlusion_cells(H, W, grid)
    pre_BK = pre_activations(sae, encoder.encode(images_BCHW).to(sae.device), features_K)
    G = grid * grid
    pairs = torch.arange(B * G)
    drops = []
    for chunk in pairs.split(batch_size):
        b, g = chunk // G, chunk % G
        occluded = images_BCHW[b] * keep_GHW[g][:, None].to(images_BCHW.dtype)
        pre_NK = pre_activations(sae, encoder.encode(occluded).to(sae.device), features_K)
        drops.append(pre_BK[b.to(sae.device)] - pre_NK)
    maps_BKhw = torch.cat(drops).reshape(B, G, -1).transpose(1, 2).reshape(B, -1, grid, grid)
    return MapsResult(maps_BKhw.contiguous(), pre_BK, features_K.cpu(), "occlusion")


def compute_maps(
    encoder: Encoder,
    sae: SAE,
    images_BCHW: Tensor,
    features: list[int] | Tensor,
    method: str,
    grid: int = 8,
    batch_size: int = 32,
) -> MapsResult:
    """One batch's maps by ``method`` (resolved: exact, approximate or occlusion)."""
    if method == "exact":
        return feature_maps(encoder, sae, images_BCHW, features)
    if method == "approximate":
        return approximate_maps(encoder, sae, images_BCHW, features)
    return occlusion_maps(encoder, sae, images_BCHW, features, grid, batch_size)
