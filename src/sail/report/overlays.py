"""Spatial-map overlays for the feature pages, and the spatial-grounding rows beside them.

``maps/<enc>/<variant>/<config>/maps.npz`` holds, per reported feature, a map on the encoder's
grid for each of its top validation slices (the tiles' slices, looked up by slice_id). A map is
signed: for the exact decomposition of a mean-pooled encoder its cells are each position's
contribution to the feature's pre-activation and average to it, so cells that argue *against*
the feature are as real as the ones that argue for it. The overlay therefore uses a diverging
colormap centred on 0 (blue negative, red positive), with opacity growing with |value| so
near-zero cells leave the scan visible; one symmetric scale per feature page (the largest |value|
among its tiles' maps) keeps the tiles of a page comparable, and the colour bar states it.

Each map is upsampled bilinearly (cell centres, edges clamped: the rule the pointing game uses)
to the thumbnail's size and stored as an 8-bit palette PNG whose palette *is* the colour bar
(255 levels, index 127 = 0, fully transparent), small and cheap to encode.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from sail.artifacts import FeatureMapsFile, read_table
from sail.errors import SailError
from sail.workspace import write_bytes_atomic

LEVELS = 255  # palette entries used; index LEVELS // 2 is exactly 0
MAX_ALPHA = 0.85
# diverging anchors (ColorBrewer RdBu, reversed): -1, -0.5, 0, 0.5, 1
ANCHORS_RGB = np.array(
    [[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]], float
)
METHOD_NOTES = {
    "exact": "exact decomposition: each cell is that grid position's contribution to the "
    "feature's pre-activation; the map's mean equals the pre-activation",
    "approximate": "approximate: the encoder pools by its CLS token, so these maps pass the patch "
    "tokens through the SAE encoder; they do not add up to the feature's activation",
    "occlusion": "occlusion: each cell is the drop in the feature's pre-activation when that "
    "grid cell is masked (slower fallback; not a decomposition)",
}


def method_note(maps: FeatureMapsFile) -> str:
    """What the page says next to the overlays: how the maps were made and what they mean."""
    if maps.provenance.get("approximate") and maps.method == "exact":
        return METHOD_NOTES["approximate"]
    return METHOD_NOTES.get(maps.method, maps.method)


@cache
def palette() -> tuple[np.ndarray, np.ndarray]:
    """The overlay's colour lookup: (LEVELS x 3 uint8 RGB, LEVELS alpha uint8) for values from
    -scale (index 0) through 0 (index LEVELS // 2, transparent) to +scale (index LEVELS - 1)."""
    t = np.linspace(-1, 1, LEVELS)
    stops = np.linspace(-1, 1, len(ANCHORS_RGB))
    rgb = np.stack([np.interp(t, stops, ANCHORS_RGB[:, c]) for c in range(3)], axis=1)
    alpha = MAX_ALPHA * np.abs(t)
    return np.round(rgb).astype(np.uint8), np.round(255 * alpha).astype(np.uint8)


def to_levels(values: np.ndarray, scale: float) -> np.ndarray:
    """Values to palette indices on the symmetric scale [-scale, scale] (clipped)."""
    half = (LEVELS - 1) / 2
    t = np.asarray(values, np.float32) * np.float32(half / max(scale, 1e-12)) + np.float32(half)
    return np.rint(np.clip(t, 0, LEVELS - 1, out=t), out=t).astype(np.uint8)


def write_overlay(path: Path, levels_HW: np.ndarray) -> None:
    """An overlay PNG: palette image whose palette and transparency are :func:`palette`."""
    rgb, alpha = palette()
    height, width = levels_HW.shape
    img = Image.frombytes("P", (width, height), np.ascontiguousarray(levels_HW).tobytes())
    img.putpalette(rgb.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=alpha.tobytes())
    write_bytes_atomic(path, buf.getvalue())


def colour_bar_svg(scale: float, width: int = 240, height: int = 12) -> str:
    """The overlay's colour bar: the palette's colours (at full opacity; an overlay's opacity
    grows with |value|) from -scale to +scale, ticks at both ends and 0."""
    rgb, _ = palette()
    stops = "".join(
        f'<stop offset="{i / (LEVELS - 1):.3f}" stop-color="rgb({r},{g},{b})"/>'
        for i, (r, g, b) in list(enumerate(rgb))[:: (LEVELS - 1) // 8]
    )
    total_h = height + 16
    labels = (
        f'<text x="0" y="{total_h - 2}" font-size="10">{-scale:.3g}</text>'
        f'<text x="{width / 2}" y="{total_h - 2}" font-size="10" text-anchor="middle">0</text>'
        f'<text x="{width}" y="{total_h - 2}" font-size="10" text-anchor="end">+{scale:.3g}</text>'
    )
    return (
        f'<svg class="colour-bar" width="{width}" height="{total_h}" viewBox="0 0 {width} '
        f'{total_h}" role="img"><defs><linearGradient id="overlay-scale">{stops}'
        f'</linearGradient></defs><rect width="{width}" height="{height}" '
        f'fill="url(#overlay-scale)" stroke="#999" stroke-width="0.5"/>{labels}</svg>'
    )


def grounding_by_feature(path: Path, encoder: str, variant: str, config: str) -> dict[int, dict]:
    """``eval/spatial_grounding.csv`` rows of one config, by feature (empty when absent)."""
    df = read_table(path)
    if df is None:
        return {}
    need = {"encoder", "variant", "sae_config", "feature", "structure", "hit_rate"}
    missing = sorted(need - set(df.columns))
    if missing:
        raise SailError(f"{path}: missing column '{missing[0]}'")
    rows = df[(df.encoder == encoder) & (df.variant == variant) & (df.sae_config == config)]
    rows = rows.astype(object).where(rows.notna(), None)  # missing -> None, never NaN
    return {int(r["feature"]): r for r in rows.to_dict("records")}
