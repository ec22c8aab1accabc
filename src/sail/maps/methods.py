"""The two spatial-map methods beside the exact decomposition, and the rule that picks one.

- ``approximate`` (DINOv3, whose embedding is the CLS token): every final-LayerNorm patch token
  goes through the SAE encoder as if it were an embedding (normalised per token as the SAE
  normalises rows). The map says which patches look like the feature, but its mean is not the
  pre-activation of the CLS embedding, so it is labelled approximate wherever it is shown.
- ``occlusion`` (any encoder, opt-in): a grid of cells is blanked (set to 0, the background of
  the slices) one at a time; the map is the drop in the feature's pre-activation, so a positive
  cell is a region that raises the feature. One encoder pass per cell: G x G times the cost.

Each method is split into an encoder pass (:func:`encoder_pass`, what the images give) and the
maps of one SAE from it (:func:`maps_from_pass`), so the SAEs of one encoder share one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sail.encoders.base import Encoder
from sail.errors import SailError
from sail.maps.decompose import MapsResult, check_width, feature_indices, maps_from_grid
from sail.sae.api import SAE

METHODS = ("exact", "approximate", "occlusion")


def resolve_method(encoder: Encoder, requested: str) -> str | None:
    """``auto``: exact for a mean-pooled encoder, approximate for one with patch tokens
    (DINOv3), None for any other (occlusion is only run when asked: the caller skips it); an
    explicit method the encoder cannot give is a SailError naming the way out."""
    exact = type(encoder).forward_grid is not Encoder.forward_grid
    tokens = hasattr(encoder, "encode_patch_grid")
    if requested == "auto":
        return "exact" if exact else "approximate" if tokens else None
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


@dataclass
class EncoderPass:
    """What one batch of B images gave the encoder, for any SAE of it.

    exact: ``grid_BDhw`` (the mean-pooled grid); approximate: ``grid_BDhw`` (patch tokens) and
    ``pooled_BD``; occlusion: ``pooled_BD`` and ``occluded_BGD`` (cell g blanked), G = side^2.
    """

    method: str
    source: str
    grid_BDhw: Tensor | None = None
    pooled_BD: Tensor | None = None
    occluded_BGD: Tensor | None = None
    side: int = 0

    def pooled(self) -> Tensor:
        """The (B, D) embedding the encode stage stores (exact: the grid's mean)."""
        if self.pooled_BD is not None:
            return self.pooled_BD
        assert self.grid_BDhw is not None
        return self.grid_BDhw.float().mean(dim=(2, 3))


def occlusion_cells(height: int, width: int, grid: int) -> Tensor:
    """(grid * grid, H, W) bool masks of the occluding cells, row-major, tiling the image."""
    ys = torch.linspace(0, height, grid + 1).round().long()
    xs = torch.linspace(0, width, grid + 1).round().long()
    iy = torch.bucketize(torch.arange(height), ys[1:-1], right=True)
    ix = torch.bucketize(torch.arange(width), xs[1:-1], right=True)
    cell_HW = iy[:, None] * grid + ix[None, :]
    return cell_HW[None] == torch.arange(grid * grid)[:, None, None]


@torch.no_grad()
def encoder_pass(
    encoder: Encoder, images_BCHW: Tensor, method: str, grid: int = 8, batch_size: int = 32
) -> EncoderPass:
    """Encode one batch of raw 0-255 slices as ``method`` needs them."""
    if method == "exact":
        return EncoderPass(method, encoder.name, grid_BDhw=encoder.encode_grid(images_BCHW))
    if method == "approximate":
        pooled_BD, tokens_BDhw = encoder.encode_patch_grid(images_BCHW)  # type: ignore[attr-defined]
        return EncoderPass(method, encoder.name, grid_BDhw=tokens_BDhw, pooled_BD=pooled_BD)
    B, _, H, W = images_BCHW.shape
    keep_GHW = ~occlusion_cells(H, W, grid)
    G = grid * grid
    pairs = torch.arange(B * G)
    occluded = []
    for chunk in pairs.split(batch_size):
        b, g = chunk // G, chunk % G
        occluded.append(encoder.encode(images_BCHW[b] * keep_GHW[g][:, None].to(images_BCHW.dtype)))
    return EncoderPass(
        method,
        encoder.name,
        pooled_BD=encoder.encode(images_BCHW),
        occluded_BGD=torch.cat(occluded).reshape(B, G, -1),
        side=grid,
    )


@torch.no_grad()
def maps_from_pass(run: EncoderPass, sae: SAE, features: list[int] | Tensor) -> MapsResult:
    """The (B, K, h, w) maps of one SAE's ``features`` from an encoder pass."""
    if run.method == "exact":
        assert run.grid_BDhw is not None
        return maps_from_grid(run.grid_BDhw, sae, features, run.source)
    features_K = feature_indices(features, sae.d_sae).to(sae.device)
    assert run.pooled_BD is not None
    B, D = run.pooled_BD.shape
    check_width(D, sae, run.source)
    pre_BK = pre_activations(sae, run.pooled_BD.to(sae.device), features_K)
    if run.method == "approximate":
        assert run.grid_BDhw is not None
        _, _, h, w = run.grid_BDhw.shape
        tokens_ND = run.grid_BDhw.to(sae.device).flatten(2).transpose(1, 2).reshape(-1, D)
        cells_NK = pre_activations(sae, tokens_ND, features_K)
    else:
        assert run.occluded_BGD is not None
        h = w = run.side
        occluded_NK = pre_activations(
            sae, run.occluded_BGD.reshape(-1, D).to(sae.device), features_K
        )
        cells_NK = pre_BK.repeat_interleave(h * w, dim=0) - occluded_NK  # the drop when blanked
    maps_BKhw = cells_NK.reshape(B, h * w, -1).transpose(1, 2).reshape(B, -1, h, w)
    return MapsResult(maps_BKhw.contiguous(), pre_BK, features_K.cpu(), run.method)


def approximate_maps(
    encoder: Encoder, sae: SAE, images_BCHW: Tensor, features: list[int] | Tensor
) -> MapsResult:
    """Patch tokens through the SAE encoder: (B, K, h, w) pre-activations of each token."""
    return maps_from_pass(encoder_pass(encoder, images_BCHW, "approximate"), sae, features)


def occlusion_maps(
    encoder: Encoder,
    sae: SAE,
    images_BCHW: Tensor,
    features: list[int] | Tensor,
    grid: int = 8,
    batch_size: int = 32,
) -> MapsResult:
    """(B, K, grid, grid) drops of the pre-activation when each cell is blanked (0)."""
    run = encoder_pass(encoder, images_BCHW, "occlusion", grid, batch_size)
    return maps_from_pass(run, sae, features)
