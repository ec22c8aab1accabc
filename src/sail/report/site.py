"""The feature browser: a static site that works from ``file://`` with no network.

Every page inlines its data (tables, SVG charts); images are relative links to thumbnails in
``report/thumbs/``. Jinja2 autoescaping is on, so model-written text (descriptions) is shown as
text, never run. Sections whose artifacts are missing are left out, so the report renders at
any point of a run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import escape
from PIL import Image

from sail.artifacts import (
    SAE_WEIGHTS,
    FeatureMapsFile,
    ReportFolder,
    read_descriptions,
    read_maps,
    read_ranking,
    read_sae_cfg,
    read_table,
)
from sail.config import SailConfig
from sail.console import track
from sail.evaluate.inputs import EvalData, load_eval_data, load_sparse
from sail.evaluate.ranking import stability_labels
from sail.evaluate.top_slices import top_per_volume
from sail.interpret.data import select_targets
from sail.maps.grounding import upsample
from sail.report.overlays import (
    colour_bar_svg,
    grounding_by_feature,
    method_note,
    to_levels,
    write_overlay,
)
from sail.report.profiles import (
    HeatmapFeature,
    ProfileRow,
    VolumeAxes,
    column,
    heatmap_svg,
    strip_svg,
    volume_axes,
)
from sail.report.selection import (
    paged_features,
    planted_by_unit,
    planted_rows,
    report_label_columns,
    report_rows,
    unit_key,
)
from sail.workspace import (
    StageRecord,
    Workspace,
    check_table,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
    write_text_atomic,
)

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
TREE_FEATURES = 10  # top features whose Matryoshka tree (eval/hierarchy.csv) a config page shows
PROFILE_VOLUMES = 3  # volumes (of the top tiles) whose profile strip a feature page draws


@dataclass
class ConfigUnit:
    encoder: str
    variant: str
    config: str
    rank: int | None = None

    @property
    def key(self) -> str:
        return unit_key(self.encoder, self.variant, self.config)


def _ranks(ws: Workspace) -> dict[tuple[str, str, str], int]:
    ranking = read_ranking(ws.eval.ranking)
    if ranking is None:
        return {}
    return {
        (r.encoder, r.variant, str(r.sae_config)): int(r.final_rank) for r in ranking.itertuples()
    }


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = lambda v, nd=3: (
        ""
        if v is None or (isinstance(v, float) and np.isnan(v))
        else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))
    )
    return env


def _svg_bars(
    values: list[float], labels: list[str] | None = None, width: int = 320, height: int = 80
) -> str:
    """A tiny inline SVG bar chart (numbers only; the template marks it safe)."""
    vals = np.asarray(values, float)
    if vals.size == 0 or not np.isfinite(vals).any():
        return ""
    top = float(np.nanmax(vals)) or 1.0
    bw = width / len(vals)
    bars = []
    for i, v in enumerate(vals):
        h = 0 if not np.isfinite(v) else (height - 12) * v / top
        title = f"<title>{escape(labels[i]) if labels else i}: {v:.3g}</title>"
        bars.append(
            f'<rect x="{i * bw:.1f}" y="{height - h:.1f}" width="{max(bw - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#3b6ea8">{title}</rect>'
        )
    return (
        f'<svg class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{"".join(bars)}</svg>'
    )


def _thumb(ws: Workspace, out: Path, slice_id: str, png_path: str, size: int) -> str:
    name = slice_id.replace("/", "_") + ".png"
    dst = ReportFolder(out).thumbs / name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(ws.root / png_path) as img:
                img = img.convert("L")
                img.thumbnail((size, size))
                img.save(dst)
        except (OSError, ValueError) as exc:
            log.warning("report: cannot read %s (%s); thumbnail left out", png_path, exc)
            return ""
    return f"thumbs/{name}"


def _enrichment_rows(ev, limit: int = 8) -> list[dict]:
    """The page's table: labels over-represented among the top slices, largest excess first."""
    labelled = [
        (f"{attr}={v}", s, b, li, p)
        for attr, rows in ev.categorical.items()
        for v, s, b, li, p in rows
    ]
    labelled += [(f"region={v}", *rest) for v, *rest in ev.regions]
    labelled += [(f"structure={v}", *rest) for v, *rest in ev.structures]
    over = sorted((r for r in labelled if r[1] > r[2]), key=lambda r: (r[2] - r[1], r[0]))
    keys = ("label", "freq", "base", "lift", "p")
    return [dict(zip(keys, r, strict=True)) for r in over[:limit]]


class ConceptSplit:
    """The split autointerp describes features on, with its enrichment base rates: the feature
    pages score the same top slices of the same split as the descriptions they show."""

    def __init__(self, cfg: SailConfig, data: EvalData, codes: sp.csr_matrix, label_columns):
        from sail.interpret.enrichment import EnrichmentTable

        self.name = cfg.interpret.autointerp.concept_split
        self.n_top = cfg.interpret.autointerp.enrichment_top
        rows = data.split_rows[self.name]
        meta = data.slices.iloc[rows].reset_index(drop=True)
        structures = [c[4:] for c in meta.columns if c.startswith("has_")]
        H_NS = meta[[f"has_{s}" for s in structures]].fillna(False).to_numpy(dtype=bool)
        self.csc = codes[rows].tocsc()
        self.csc.sort_indices()
        self.table = EnrichmentTable(meta, H_NS, structures, categorical=label_columns)

    def of(self, feature: int) -> dict:
        from sail.interpret.enrichment import top_slices_for_enrichment

        ev = self.table.of(top_slices_for_enrichment(self.csc, feature, self.n_top))
        return {
            "rows": _enrichment_rows(ev),
            "split": self.name,
            "n_top": ev.n_top,
            "n_volumes": ev.n_volumes,
        }


def _descriptions(ws: Workspace, unit: ConfigUnit) -> dict[int, dict]:
    folder = ws.interpret("autointerp", unit.encoder, unit.variant, unit.config)
    keep = ("description", "status", "describer", "judge", "judge_success", "judge_rank_mean")
    return {
        f: {k: d.fields[k] for k in keep if k in d.fields}
        for f, d in read_descriptions(folder.descriptions).items()
    }


def _decoder_neighbours(
    ws: Workspace, unit: ConfigUnit, features: np.ndarray, k: int = 5
) -> dict[int, list[tuple[int, float]]]:
    from sail.sae.checkpoint import load_stack

    sae = ws.sae(unit.encoder, unit.variant, unit.config)
    if not sae.weights.is_file():
        return {}
    model, _ = load_stack(sae.path)
    W = model.W_decoder[0].detach().float().numpy()
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    sims = W[features] @ W.T
    sims[np.arange(len(features)), features] = -np.inf
    nearest = np.argsort(-sims, axis=1)[:, :k]
    return {
        int(f): [(int(j), float(sims[i, j])) for j in nearest[i]] for i, f in enumerate(features)
    }


def _unit_table(path: Path, unit: ConfigUnit) -> pd.DataFrame | None:
    """The rows of an eval/ table that belong to ``unit`` (None when the table is missing)."""
    df = read_table(path)
    if df is None:
        return None
    return df[
        (df.encoder == unit.encoder)
        & (df.variant == unit.variant)
        & (df.sae_config.astype(str) == unit.config)
    ]


def _link(f: int, paged: set[int], prefix: str) -> dict:
    return {"feature": f, "href": f"{prefix}f{f:05d}.html" if f in paged else ""}


def _family(hier: pd.DataFrame | None, f: int, paged: set[int], width: int = 12) -> dict:
    """A feature's parents (co-activation and decoder) and its co-activation children."""
    if hier is None or hier.empty:
        return {}
    out: dict = {"children": []}
    if f in hier.index:
        row = hier.loc[f]
        if row.parent_coact >= 0:
            out["parent"] = _link(int(row.parent_coact), paged, "") | {
                "lift": float(row.coact_lift),
                "p": float(row.p_parent_given_child),
            }
        if row.parent_decoder >= 0:
            out["decoder_parent"] = _link(int(row.parent_decoder), paged, "") | {
                "cos": float(row.decoder_cos)
            }
    kids = hier[hier.parent_coact == f].sort_values("coact_lift", ascending=False).head(width)
    out["children"] = [
        _link(int(k), paged, "") | {"lift": float(r.coact_lift), "p": float(r.p_parent_given_child)}
        for k, r in kids.iterrows()
    ]
    return out


def _tree(
    hier: pd.DataFrame | None,
    roots: list[int],
    paged: set[int],
    prefix: str,
    depth: int = 2,
    width: int = 6,
) -> list[dict]:
    """Co-activation descendants of ``roots`` (``depth`` levels, ``width`` children a node);
    ``prefix``: where the feature pages are, relative to the page that shows the tree."""
    if hier is None or hier.empty:
        return []
    by_parent = {
        int(p): g.sort_values("coact_lift", ascending=False)
        for p, g in hier[hier.parent_coact >= 0].groupby("parent_coact")
    }

    def node(f: int, left: int) -> dict:
        kids = by_parent.get(f)
        below = [] if kids is None or left == 0 else list(kids.index[:width])
        lift = float(hier.loc[f, "coact_lift"]) if f in hier.index else np.nan
        return _link(f, paged, prefix) | {
            "lift": lift if np.isfinite(lift) else None,
            "children": [node(int(k), left - 1) for k in below],
        }

    return [node(int(f), depth) for f in roots]


def _stability(ws: Workspace, unit: ConfigUnit) -> dict:
    rows = _unit_table(ws.eval.table("stability"), unit)
    if rows is None or rows.empty or rows.iloc[0].n_seeds < 2:
        return {}
    return rows.iloc[0].to_dict()


@dataclass
class _Browser:
    """One config's inputs to the volume profiles, overlays and grounding of its pages."""

    unit: ConfigUnit
    out: Path
    data: EvalData
    codes_csr: sp.csr_matrix  # all splits: profiles describe, they do not score
    codes_csc: sp.csc_matrix
    vmax_F: np.ndarray  # each feature's largest activation over all slices
    axes: VolumeAxes
    maps: FeatureMapsFile | None
    grounding: dict[int, dict]
    volume_planes: dict[int, set[str]] = field(default_factory=dict)  # volumes the tiles show
    modality: np.ndarray = field(init=False)
    image_id: np.ndarray = field(init=False)
    plane: np.ndarray = field(init=False)
    slice_idx: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # plain arrays: a DataFrame row lookup per tile costs more than the page it feeds
        slices = self.data.slices
        self.modality, self.image_id, self.plane = (
            slices[c].astype(str).to_numpy() for c in ("modality", "image_id", "plane")
        )
        self.slice_idx = slices["slice_idx"].to_numpy()

    @property
    def report(self) -> ReportFolder:
        return ReportFolder(self.out)

    def volume_page(self, row: int) -> Path:
        return self.report.volume_page(self.unit.key, self.modality[row], self.image_id[row])

    def volume_href(self, row: int, start: Path) -> str:
        """The volume page of slice ``row`` (its plane's section), as a link from ``start``."""
        return f"{self.report.href(self.volume_page(row), start)}#{self.plane[row]}"


def _browser_context(
    ws: Workspace, out: Path, unit: ConfigUnit, data: EvalData, codes: sp.csr_matrix
) -> _Browser:
    csc = codes.tocsc()
    csc.sort_indices()
    vmax = codes.max(axis=0).toarray().ravel() if codes.shape[0] else np.zeros(codes.shape[1])
    return _Browser(
        unit=unit,
        out=out,
        data=data,
        codes_csr=codes,
        codes_csc=csc,
        vmax_F=vmax.astype(float),
        axes=volume_axes(data.slices, data.volume),
        maps=read_maps(ws.maps(unit.encoder, unit.variant, unit.config)),
        grounding=grounding_by_feature(
            ws.eval.spatial_grounding, unit.encoder, unit.variant, unit.config
        ),
    )


def _feature_nav(chosen: np.ndarray) -> dict[int, dict]:
    """Previous and next feature page in the config's order (keyboard j/k, arrows)."""
    order = [int(f) for f in chosen]
    return {
        f: {
            "prev": order[i - 1] if i > 0 else None,
            "next": order[i + 1] if i + 1 < len(order) else None,
            "position": i + 1,
            "total": len(order),
        }
        for i, f in enumerate(order)
    }


def _feature_spatial(b: _Browser, f: int, tile_rows: np.ndarray, tiles: list[dict]) -> dict:
    """What a feature page shows about *where*: the profile strip of its top tiles' volumes,
    volume links and heatmap overlays on the tiles, and its spatial-grounding row."""
    page_dir = b.report.feature_page(b.unit.key, f).parent
    for tile, row in zip(tiles, tile_rows, strict=True):
        b.volume_planes.setdefault(int(b.data.volume[row]), set()).add(b.plane[row])
        tile["volume_href"] = b.volume_href(int(row), page_dir)
    return {
        "strip": _profile_strip(b, f, tile_rows[:PROFILE_VOLUMES], page_dir),
        "overlays": _overlays(b, f, tiles, page_dir),
        "grounding": b.grounding.get(f, {}),
    }


def _profile_strip(b: _Browser, f: int, tile_rows: np.ndarray, page_dir: Path) -> str:
    values = column(b.codes_csc, f, b.codes_csc.shape[0])
    profile = []
    for row in tile_rows:
        volume, plane = int(b.data.volume[row]), b.plane[row]
        members = b.axes.rows(volume, plane)
        profile.append(
            ProfileRow(
                label=f"{b.modality[row]}/{b.image_id[row]} {plane}",
                href=b.volume_href(int(row), page_dir),
                position=b.axes.position[members],
                value=values[members],
                marked=int(np.flatnonzero(members == row)[0]),
                unit=b.axes.unit(volume, plane),
                slice_idx=b.slice_idx[members],
            )
        )
    return strip_svg(profile, float(b.vmax_F[f]))


def _overlays(b: _Browser, f: int, tiles: list[dict], page_dir: Path) -> dict:
    """Writes one overlay PNG per tile whose slice has a map; returns the colour bar, scale and
    method note (empty when the config has no maps or this feature none)."""
    if b.maps is None:
        return {}
    shown = [t for t in tiles if t["thumb"]]
    found, maps_Nhw = b.maps.lookup(f, [t["slice_id"] for t in shown])
    if not found.any():
        return {}
    with_map = [t for t, ok in zip(shown, found, strict=True) if ok]
    scale = float(np.abs(maps_Nhw).max())
    if not scale > 0:
        return {}
    sizes = [_image_size(b.out / t["thumb"]) for t in with_map]
    for size in set(sizes):
        pick = [i for i, s in enumerate(sizes) if s == size]
        levels = to_levels(upsample(maps_Nhw[pick], (size[1], size[0])), scale)
        for i, lv in zip(pick, levels, strict=True):
            path = b.report.overlay(b.unit.key, f, with_map[i]["slice_id"])
            write_overlay(path, lv)
            with_map[i]["overlay"] = b.report.href(path, page_dir)
    return {
        "n": len(with_map),
        "scale": scale,
        "colour_bar": colour_bar_svg(scale),
        "method": b.maps.method,
        "note": method_note(b.maps),
    }


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:  # reads the header only
        return img.size


def _write_volume_pages(b: _Browser, env: Environment, cards: list[dict]) -> None:
    """A page per volume shown in any tile: every reported feature along its slices."""
    if not cards:
        return
    features = np.array([c["feature"] for c in cards], dtype=np.int64)
    labels = [c.get("description") or c.get("top_label") or "" for c in cards]
    first_row = pd.Series(np.arange(len(b.data.volume))).groupby(b.data.volume).first()
    for volume in track(sorted(b.volume_planes), f"volume pages {b.unit.key}"):
        s = b.data.slices.iloc[int(first_row[volume])]
        page = b.volume_page(int(first_row[volume]))
        heat = [
            HeatmapFeature(
                int(f), b.report.href(b.report.feature_page(b.unit.key, int(f)), page.parent), lab
            )
            for f, lab in zip(features, labels, strict=True)
        ]
        sections = [
            _volume_section(b, volume, plane, features, heat) for plane in b.axes.planes[volume]
        ]
        write_text_atomic(
            page,
            env.get_template("volume.html.j2").render(
                unit=b.unit,
                slice=s,
                sections=sections,
                shown=sorted(b.volume_planes[volume]),
                config_href=b.report.href(b.report.config_page(b.unit.key), page.parent),
                index_href=b.report.href(b.report.index, page.parent),
            ),
        )


def _volume_section(
    b: _Browser, volume: int, plane: str, features: np.ndarray, heat: list[HeatmapFeature]
) -> dict:
    members = b.axes.rows(volume, plane)
    position = b.axes.position[members]
    slice_idx = b.slice_idx[members]
    values_SF = b.codes_csr[members][:, features].toarray()
    unit = b.axes.unit(volume, plane)
    svg, order = heatmap_svg(position, slice_idx, values_SF, heat, b.vmax_F[features], unit)
    peak = values_SF.argmax(axis=0)
    table = [
        {
            "feature": heat[j].feature,
            "href": heat[j].href,
            "label": heat[j].label,
            "peak_position": float(position[peak[j]]),
            "peak_slice": int(slice_idx[peak[j]]),
            "peak": float(values_SF[peak[j], j]),
            "n_active": int((values_SF[:, j] > 0).sum()),
        }
        for j in order
    ]
    return {
        "plane": plane,
        "n_slices": len(members),
        "unit": unit,
        "svg": svg,
        "features": table,
    }


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _index_json(cards: list[dict]) -> str:
    """The config page's feature index as JSON for its search and sort script: per card the sort
    keys (missing = null) and the searchable text (concept labels, structures, description).
    ``<``, ``>`` and ``&`` are escaped so no text can close the script element."""
    rows = []
    for i, c in enumerate(cards):
        g = c.get("grounding") or {}
        words = [*c["labels"], c.get("description") or "", g.get("structure") or ""]
        words.append(g.get("enrichment_structure") or "")
        rows.append(
            {
                "feature": c["feature"],
                "order": i,
                "monosemanticity": _finite(c.get("monosemanticity")),
                "frac_active": _finite(c["frac_active"]),
                "hit_rate": _finite(g.get("hit_rate")),
                "text": " ".join(w for w in words if w),
            }
        )
    text = json.dumps(rows, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _unit_pages(
    ws: Workspace,
    env: Environment,
    out: Path,
    unit: ConfigUnit,
    data: EvalData,
    cfg: SailConfig,
    label_columns: list[str],
    planted_features: dict[str, list[int]],
) -> dict:
    rcfg = cfg.report
    codes = load_sparse(ws, unit.encoder, unit.variant, unit.config, data)
    concept = ConceptSplit(cfg, data, codes, label_columns)
    rows = report_rows(data)
    sub = codes[rows].tocsc()
    sub.sort_indices()
    volumes = data.volume[rows]
    active = np.diff(sub.indptr)
    n_features = sub.shape[1]
    chosen, extra = paged_features(
        ws,
        (unit.encoder, unit.variant, unit.config),
        active,
        planted_features.get(unit.key, []),
        rcfg.max_features,
    )
    enrich = {int(f): concept.of(int(f)) for f in chosen}
    descriptions = _descriptions(ws, unit)
    neighbours = _decoder_neighbours(ws, unit, chosen) if len(chosen) else {}
    slices = data.slices.iloc[rows].reset_index(drop=True)
    flag_cols = [c for c in slices.columns if c.startswith("has_")]
    flags = slices[flag_cols].fillna(False).to_numpy(bool)
    # numpy records: a DataFrame row per tile (150-odd columns) cost more than its page
    tile_meta = slices[
        ["slice_id", "png_path", "modality", "plane", "sex", "age_group", "institute"]
    ].to_records(index=False)
    paged = {int(f) for f in chosen}
    report = ReportFolder(out)
    hier = _unit_table(ws.eval.table("hierarchy"), unit)
    hier = hier.set_index("feature") if hier is not None else None
    browser = _browser_context(ws, out, unit, data, codes)
    nav = _feature_nav(chosen)
    cards = []
    for f in track(chosen, f"report pages {unit.key}"):
        f = int(f)
        top, top_vals = top_per_volume(sub, f, volumes, rcfg.top_slices)
        lo, hi = sub.indptr[f], sub.indptr[f + 1]
        hist, edges = np.histogram(sub.data[lo:hi], bins=20)
        tiles = []
        for r, value in zip(top, top_vals, strict=True):
            row = tile_meta[r]
            present = [flag_cols[j][4:] for j in np.flatnonzero(flags[r])]
            tiles.append(
                {
                    "thumb": _thumb(ws, out, row.slice_id, row.png_path, rcfg.thumb_size),
                    "slice_id": row.slice_id,
                    "value": float(value),
                    "meta": f"{row.modality} {row.plane} {row.sex or '?'} "
                    f"{row.age_group or '?'} inst {row.institute}",
                    "structures": ", ".join(present[:8]) + (" …" if len(present) > 8 else ""),
                }
            )
        info = {
            "feature": f,
            "n_active": int(active[f]),
            "frac_active": float(active[f] / max(len(rows), 1)),
            "monosemanticity": extra.get(f, {}).get("monosemanticity"),
            **descriptions.get(f, {}),
        }
        spatial = _feature_spatial(browser, f, rows[top], tiles)
        page = env.get_template("feature.html.j2").render(
            unit=unit,
            info=info,
            tiles=tiles,
            nav=nav[f],
            spatial=spatial,
            enrichment=enrich[f],
            histogram=_svg_bars(
                hist.tolist(), [f"{edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(len(hist))]
            ),
            neighbours=[(j, sim, j in paged) for j, sim in neighbours.get(f, [])],
            family=_family(hier, f, paged),
        )
        write_text_atomic(report.feature_page(unit.key, f), page)
        cards.append(
            info
            | {
                "href": report.href(
                    report.feature_page(unit.key, f), report.config_page(unit.key).parent
                ),
                "thumb": tiles[0]["thumb"] if tiles else "",
                "top_label": (enrich[f]["rows"] or [{}])[0].get("label", ""),
                "labels": [e["label"] for e in enrich[f]["rows"]],
                "grounding": spatial["grounding"],
            }
        )
    _write_volume_pages(browser, env, cards)
    recovery = read_table(ws.eval.table("recovery_summary"))
    rec_rows = []
    if recovery is not None:
        rec = recovery[
            (recovery.encoder == unit.encoder)
            & (recovery.variant == unit.variant)
            & (recovery.sae_config == unit.config)
        ]
        rec_rows = rec.drop(columns=["encoder", "variant", "sae_config"]).to_dict("records")
    sae = ws.sae(unit.encoder, unit.variant, unit.config)
    metrics = read_sae_cfg(sae.path).final_metrics if sae.cfg.is_file() else {}
    page = env.get_template("config.html.j2").render(
        unit=unit,
        cards=cards,
        index_json=_index_json(cards),
        recovery=rec_rows,
        metrics=metrics,
        n_features=n_features,
        fingerprint=_fingerprint_section(ws, out, unit, data.slices, rcfg),
        language=_language_section(ws, out, unit, data.slices, rcfg),
        dead=int((active == 0).sum()),
        l0=float(np.diff(codes[rows].tocsr().indptr).mean()) if len(rows) else 0.0,
        stability=_stability(ws, unit),
        tree=_tree(
            hier, [int(f) for f in chosen[:TREE_FEATURES]], paged, f"../features/{unit.key}/"
        ),
    )
    write_text_atomic(report.config_page(unit.key), page)
    return {
        "unit": unit,
        "href": report.href(report.config_page(unit.key)),
        "n_pages": len(cards),
        "dead": int((active == 0).sum()),
        "n_features": n_features,
    }


def _planted_panel(
    ws: Workspace, out: Path, data: EvalData, rows: list[dict], thumb_size: int, k: int = 5
) -> dict:
    """The index's opening panel: each planted label's best SAE feature (chosen on train, scored
    on test) beside the raw-dimension, random-init and shuffled-label figures, with the feature's
    top test slices (one per volume); and, plainly, where the SAE falls below the raw dimension."""
    if not rows:
        return {}
    test = data.split_rows["test"]
    codes_by_unit: dict[str, sp.csc_matrix] = {}
    for r in rows:
        key = f"{r['encoder']}__{r['variant']}__{r['sae_config']}"
        if key not in codes_by_unit:
            codes = load_sparse(ws, r["encoder"], r["variant"], r["sae_config"], data)
            codes_by_unit[key] = codes[test].tocsc()
            codes_by_unit[key].sort_indices()
        page = (
            out / "features" / key / f"f{r['feature']:05d}.html"
            if r["feature"] is not None
            else None
        )
        r["href"] = (
            str(page.relative_to(out))
            if page is not None and page.is_file()
            else f"configs/{key}.html"
        )
        r["thumbs"] = []
        if r["feature"] is not None:
            top, _ = top_per_volume(codes_by_unit[key], r["feature"], data.volume[test], k)
            for i in top:
                row = data.slices.iloc[test[i]]
                r["thumbs"].append(_thumb(ws, out, row.slice_id, row.png_path, thumb_size))
        r["below_raw"] = r["sae"] is not None and r["raw"] is not None and r["sae"] < r["raw"]
    sae = [r["sae"] for r in rows if r["sae"] is not None]
    control = [r["control"] for r in rows if r["control"] is not None]
    return {
        "rows": rows,
        "n_labels": len(sae),
        "n_reached": sum(v >= 0.9 for v in sae),
        "median_sae": float(np.median(sae)) if sae else None,
        "median_control": float(np.median(control)) if control else None,
        "median_raw": float(
            np.median([r["raw"] for r in rows if r["raw"] is not None] or [np.nan])
        ),
        "below_raw": [r["label"] for r in rows if r["below_raw"]],
    }


SINGLE_FEATURE_NOTE = (
    "one-feature scoring (published): similarity 1/(1+|a - a_ref|), "
    "so a slice where the feature is inactive still scores 1/(1+a_ref)"
)


def _fingerprint_section(
    ws: Workspace, out: Path, unit: ConfigUnit, slices: pd.DataFrame, rcfg, n_examples: int = 4
) -> dict:
    """Retrieval examples (reference + its sparse-fingerprint hits) and the metric summary."""
    folder = ws.interpret("fingerprint", unit.encoder, unit.variant, unit.config)
    hits, summary = read_table(folder.csv("hits")), read_table(folder.summary)
    if hits is None:
        return {}
    paths = slices.set_index("slice_id").png_path

    def thumb(sid: str) -> str:
        return _thumb(ws, out, sid, paths[sid], rcfg.thumb_size) if sid in paths.index else ""

    sparse = hits[hits.method == "sparse"]
    examples = []
    for ref in sparse.reference.drop_duplicates().head(n_examples):
        rows = sparse[sparse.reference == ref].sort_values("rank").head(5)
        single = (
            "similarity_rule" in rows and (rows.similarity_rule == "published_single_feature").any()
        )
        examples.append(
            {
                "reference": ref,
                "thumb": thumb(ref),
                "rule_note": SINGLE_FEATURE_NOTE if single else "",
                "hits": [
                    {"slice_id": r.hit, "thumb": thumb(r.hit), "similarity": float(r.similarity)}
                    for r in rows.itertuples()
                ],
            }
        )
    table, p_text = [], ""
    if summary is not None:
        k = int(sparse.k.dropna().iloc[0]) if sparse.k.notna().any() else None
        pick = summary[(summary.k == k) | summary.k.isna()] if k is not None else summary
        table = (
            pick.pivot_table(index="metric", columns="method", values="mean")
            .reset_index()
            .to_dict("records")
        )
        p_rows = (
            pick[(pick.method == "sparse") & pick.p_vs_chance.notna()]
            if "p_vs_chance" in pick
            else pick.iloc[:0]
        )
        p_text = "; ".join(f"{r.metric} p = {r.p_vs_chance:.2g}" for r in p_rows.itertuples())
        if p_text:
            unit = (
                f"over {int(p_rows.n_volumes.max())} reference volumes"
                if "n_volumes" in p_rows
                else "slice-level: references of one volume counted as independent"
            )
            p_text = f"sparse vs chance (one-sided Wilcoxon, {unit}): {p_text}"
    return {"examples": examples, "summary": table, "p_text": p_text}


def _language_section(
    ws: Workspace, out: Path, unit: ConfigUnit, slices: pd.DataFrame, rcfg
) -> list[dict]:
    """Per query: its text, precision@k against its constraints vs chance, and the top hits."""
    folder = ws.interpret("language", unit.encoder, unit.variant, unit.config)
    hits, metrics, queries = (
        read_table(path) for path in (folder.hits, folder.metrics_csv, folder.queries)
    )
    if hits is None or metrics is None or queries is None:
        return []
    paths = slices.set_index("slice_id").png_path
    scoring = metrics.scoring.iloc[0]
    rows = []
    for q in queries.itertuples():
        m = metrics[(metrics["query"] == q.query) & (metrics.scoring == scoring)]
        top = (
            hits[(hits["query"] == q.query) & (hits.scoring == scoring)].sort_values("rank").head(6)
        )
        labelled = len(m) and "scoring_rule" in m and isinstance(m.scoring_rule.iloc[0], str)
        rule = m.scoring_rule.iloc[0] if labelled else scoring
        rows.append(
            {
                "query": q.query,
                "text": q.text,
                "scoring": scoring,
                "rule_note": SINGLE_FEATURE_NOTE if rule == "published_single_feature" else "",
                "precision": float(m.precision.iloc[0]) if len(m) else None,
                "chance": float(m.chance.iloc[0]) if len(m) else None,
                "hits": [
                    {
                        "slice_id": h.slice_id,
                        "ok": bool(h.meets_all),
                        "score": float(h.score),
                        "thumb": _thumb(ws, out, h.slice_id, paths[h.slice_id], rcfg.thumb_size)
                        if h.slice_id in paths.index
                        else "",
                    }
                    for h in top.itertuples()
                ],
            }
        )
    return rows


def _with_stability(ranking: pd.DataFrame | None, ws: Workspace) -> pd.DataFrame | None:
    """The ranking with Table 1's stability column ("0.82 (3 seeds)"; empty: one seed)."""
    if ranking is None:
        return None
    labels = stability_labels(read_table(ws.eval.table("stability")))
    keys = zip(ranking.encoder, ranking.variant, ranking.sae_config.astype(str), strict=True)
    return ranking.assign(stable=[labels.get(k, "") for k in keys])


def build_site(cfg: SailConfig, ws: Workspace) -> Path:
    out = ws.report_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = _env()
    data = load_eval_data(ws)
    ranks = _ranks(ws)
    units = [
        ConfigUnit(
            t.encoder, t.variant, t.sae_config, ranks.get((t.encoder, t.variant, t.sae_config))
        )
        for t in select_targets(cfg, ws)
    ]
    # metadata columns named as probe targets (e.g. a manifest's diagnosis) are enriched too;
    # other free columns (patient groups, ids) never reach the pages
    label_columns = report_label_columns(cfg, data.slices)
    planted = planted_rows(cfg, ws, read_table(ws.eval.table("concepts")))
    planted_features = planted_by_unit(planted)
    unit_cards = [
        _unit_pages(ws, env, out, u, data, cfg, label_columns, planted_features) for u in units
    ]
    planted_panel = _planted_panel(ws, out, data, planted, cfg.report.thumb_size)
    figures = []
    if ws.figures_dir.is_dir():
        ws.report.figures.mkdir(exist_ok=True)
        for png in sorted(ws.figures_dir.glob("*.png")):
            shutil.copy(png, ws.report.figures / png.name)
            figures.append({"src": f"figures/{png.name}", "name": png.stem.replace("_", " ")})
    split_counts = data.slices.groupby(["split", "modality"]).size().unstack(fill_value=0)
    probes = read_table(ws.eval.table("probes"))
    probe_rows = []
    if probes is not None:
        test = probes[probes.split == "test"]
        for (enc, task, target), grp in test.groupby(["encoder", "task", "target"]):
            dense = grp[grp.sae_config == "dense"].roc_auc
            sparse = grp[grp.sae_config != "dense"]
            best = (
                sparse.loc[sparse.roc_auc.idxmax()]
                if len(sparse) and sparse.roc_auc.notna().any()
                else None
            )
            probe_rows.append(
                {
                    "encoder": enc,
                    "task": task,
                    "target": target,
                    "dense": float(dense.iloc[0]) if len(dense) else None,
                    "sparse": float(best.roc_auc) if best is not None else None,
                    "config": f"{best.variant}/{best.sae_config}" if best is not None else "",
                }
            )
    ranking = _with_stability(read_ranking(ws.eval.ranking), ws)
    page = env.get_template("index.html.j2").render(
        planted=planted_panel,
        n_slices=len(data.slices),
        n_volumes=int(data.volume.max() + 1) if len(data.volume) else 0,
        split_counts=split_counts.reset_index().to_dict("records"),
        split_columns=list(split_counts.columns),
        units=unit_cards,
        figures=figures,
        probes=probe_rows,
        ranking=ranking.to_dict("records") if ranking is not None else [],
    )
    write_text_atomic(ws.report.index, page)
    log.info(
        "report: %s (%d configs, %d feature pages)",
        ws.report.index,
        len(unit_cards),
        sum(u["n_pages"] for u in unit_cards),
    )
    return ws.report.index


def run_report(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    inputs = {"slices": fingerprint(ws.slices_table), "split": fingerprint(ws.split_csv)}
    for folder in (
        ws.eval_dir,
        ws.interpret_dir,
        ws.figures_dir,
        ws.activations_root,
        ws.sae_root,
        ws.maps_root,
    ):
        if folder.is_dir():
            inputs[folder.name] = hash_config(
                sorted(
                    (str(p.relative_to(ws.root)), p.stat().st_size)
                    for p in folder.rglob("*")
                    if p.is_file() and not p.name.startswith(".")
                )
            )
    record = StageRecord("report", hash_config(cfg.report.model_dump(mode="json")), inputs)
    index = ws.report.index
    if not force and is_done(index, record):
        log.info("report: up to date (%s)", index)
        return
    _check_inputs(ws)
    build_site(cfg, ws)
    mark_done(index, record)


def _check_inputs(ws: Workspace) -> None:
    """Every checkpoint and activations table the site reads is intact before a page is
    rewritten."""
    from sail.sae.checkpoint import load_stack

    for table in sorted(ws.activations_root.rglob("*.parquet")):
        check_table(table, "activations table")
    for weights in sorted(ws.sae_root.glob(f"*/*/*/{SAE_WEIGHTS}")):
        load_stack(weights.parent)
