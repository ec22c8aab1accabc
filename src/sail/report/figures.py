"""Figures: SAE quality vs L0 (the paper's Figure 2) and performance-recovery curves.

Every panel's x-axis is the SAE's L0 (log scale) from its last validation metrics, or the mean
number of active features of its validation activations when no metrics.csv exists. Colour =
encoder (and variant), line style = dictionary family, marker = K schedule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sail.artifacts import (
    FIGURE_RECOVERY,
    FIGURE_SAE_QUALITY,
    read_final_metrics,
    read_table,
)
from sail.config import SailConfig
from sail.errors import SailError
from sail.evaluate.inputs import sae_levels
from sail.sae.activations_io import read_activations
from sail.workspace import (
    StageRecord,
    Workspace,
    atomic_path,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
)

# Files only, never a window. matplotlib resolves its backend lazily (at the first figure), so
# selecting Agg after the imports still precedes any use of it.
matplotlib.use("Agg")

log = logging.getLogger(__name__)

KEYS = ["encoder", "variant", "sae_config"]
RECOVERY_PANELS = (1, 3, 10, 50)
_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
_LINES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
INPUT_TABLES = ["probes", "monosemanticity_configs", "recovery_curves", "recovery_summary"]


def _read(path: Path) -> pd.DataFrame:
    table = read_table(path)
    return pd.DataFrame() if table is None else table


def config_table(ws: Workspace) -> pd.DataFrame:
    """One row per evaluated SAE config with L0, R², alive fraction, M and mean AUCs."""
    e = ws.eval
    probes, mono, curves = (
        _read(e.table(name)) for name in ("probes", "monosemanticity_configs", "recovery_curves")
    )
    if probes.empty:
        raise SailError(f"{e.table('probes')} is missing or empty: run `sail evaluate` first")
    valid = probes[probes["split"] == "valid"]
    dense = valid[valid["sae_config"] == "dense"][["encoder", "task", "target", "roc_auc"]].rename(
        columns={"roc_auc": "dense_auc"}
    )
    sparse = valid[valid["sae_config"] != "dense"].merge(dense, on=["encoder", "task", "target"])
    sparse = sparse[sparse["dense_auc"] >= 0.6]
    table = (
        sparse.groupby(KEYS, as_index=False)["roc_auc"]
        .mean()
        .rename(columns={"roc_auc": "mean_sparse_auc"})
    )
    if not mono.empty:
        table = table.merge(mono[KEYS + ["m_config_top10", "m_config_top50"]], on=KEYS, how="left")
    if not curves.empty:
        c = curves[curves["dense_valid_roc_auc"] > 0.6]
        for n in RECOVERY_PANELS:
            at = c[c["n_features"] == n].groupby(KEYS, as_index=False)["valid_roc_auc"].mean()
            table = table.merge(
                at.rename(columns={"valid_roc_auc": f"recovery_n{n}"}), on=KEYS, how="left"
            )
    if table.empty:
        return table
    rows = []
    for r in table.itertuples():
        met = read_final_metrics(ws.sae(r.encoder, r.variant, r.sae_config).metrics)
        if "l0" not in met:
            path = ws.activations(r.encoder, r.variant, r.sae_config, "valid")
            if path.is_file():
                _, codes, _ = read_activations(path)
                met["l0"] = float(codes.nnz / max(1, codes.shape[0]))
        parsed = sae_levels(ws, r.encoder, r.variant, r.sae_config)
        rows.append(
            {
                "l0": met.get("l0", np.nan),
                "r2": met.get("r2_published", np.nan),
                "alive": 1.0 - met["dead_frac"] if "dead_frac" in met else np.nan,
                "family": "_".join(map(str, parsed[0])) if parsed else r.sae_config,
                "schedule": "_".join(map(str, parsed[1])) if parsed else "",
            }
        )
    table = pd.concat([table.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    dense_mean = dense[dense["dense_auc"] >= 0.6].groupby("encoder")["dense_auc"].mean()
    table["dense_mean_auc"] = table["encoder"].map(dense_mean)
    return table


def _styles(table: pd.DataFrame) -> tuple[dict, dict, dict]:
    models = sorted({f"{e}/{v}" for e, v in zip(table["encoder"], table["variant"], strict=True)})
    families = sorted(
        set(table["family"]), key=lambda f: [int(x) if x.isdigit() else 0 for x in f.split("_")]
    )
    schedules = sorted(
        set(table["schedule"]), key=lambda k: [int(x) for x in k.split("_") if x.isdigit()][::-1]
    )
    return (
        {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(models)},
        {f: _LINES[i % len(_LINES)] for i, f in enumerate(families)},
        {k: _MARKERS[i % len(_MARKERS)] for i, k in enumerate(schedules)},
    )


def sae_quality_figure(table: pd.DataFrame):
    """2 x 4 panels: R², mean sparse AUC, alive fraction, M (top-50); recovery at N = 1, 3, 10,
    50."""
    colour, line, marker = _styles(table)
    panels = [
        ("r2", "Reconstruction (R², published)"),
        ("mean_sparse_auc", "Sparse probe ROC-AUC (valid)"),
        ("alive", "Alive features (fraction)"),
        ("m_config_top50", "Monosemanticity (top-50 mean)"),
    ]
    panels += [
        (f"recovery_n{n}", f"Recovery: top-{n} feature{'s' if n > 1 else ''} ROC-AUC")
        for n in RECOVERY_PANELS
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5), constrained_layout=True)
    for ax, (col, title) in zip(axes.flat, panels, strict=False):
        ax.set_title(title, fontsize=12)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per slice)")
        ax.grid(alpha=0.3, which="both")
        if col not in table.columns or table[col].isna().all() or table["l0"].isna().all():
            ax.text(
                0.5,
                0.5,
                "not available",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
            continue
        for (enc, var, fam), g in table.groupby(["encoder", "variant", "family"]):
            g = g.dropna(subset=["l0", col]).sort_values("l0")
            c = colour[f"{enc}/{var}"]
            ax.plot(g["l0"], g[col], line[fam], color=c, alpha=0.8, lw=1.5)
            for r in g.itertuples():
                ax.plot(
                    r.l0, getattr(r, col), marker[r.schedule], color=c, ms=7, mec="black", mew=0.5
                )
        if col == "mean_sparse_auc":
            for (enc, var), g in table.groupby(["encoder", "variant"]):
                if g["dense_mean_auc"].notna().any():
                    ax.axhline(
                        g["dense_mean_auc"].iloc[0],
                        color=colour[f"{enc}/{var}"],
                        ls="--",
                        lw=1,
                        alpha=0.7,
                    )
    handles = [plt.Line2D([], [], color=c, lw=3, label=m) for m, c in colour.items()]
    handles += [plt.Line2D([], [], color="black", ls=s, label=f"d={f}") for f, s in line.items()]
    handles += [
        plt.Line2D([], [], color="black", marker=m, ls="", label=f"k={k}")
        for k, m in marker.items()
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(8, len(handles)),
        fontsize=10,
        frameon=False,
    )
    return fig


def recovery_figure(curves: pd.DataFrame, ranking: pd.DataFrame):
    """Mean valid ROC-AUC vs number of features, one panel per encoder/variant; rank 1 in bold."""
    curves = curves[curves["dense_valid_roc_auc"] > 0.6]
    groups = sorted(curves.groupby(["encoder", "variant"]).groups)
    fig, axes = plt.subplots(
        1,
        max(1, len(groups)),
        figsize=(6.5 * max(1, len(groups)), 5),
        squeeze=False,
        constrained_layout=True,
    )
    best = set()
    if not ranking.empty:
        best = {
            tuple(r) for r in ranking.loc[ranking["final_rank"] == 1, KEYS].itertuples(index=False)
        }
    for ax, (enc, var) in zip(axes.flat, groups, strict=False):
        sub = curves[(curves["encoder"] == enc) & (curves["variant"] == var)]
        for cfg, g in sub.groupby("sae_config"):
            # a target with fewer ranked features than N keeps its all-features AUC beyond that
            # point, so every point averages the same targets
            per_target = g.pivot_table(
                index="n_features", columns=["task", "target"], values="valid_roc_auc"
            )
            m = per_target.sort_index().ffill().mean(axis=1)
            top = (enc, var, cfg) in best
            ax.plot(
                m.index,
                m.values,
                "-o",
                lw=2.5 if top else 1,
                ms=4 if top else 2,
                alpha=1 if top else 0.45,
                color="#d95f02" if top else "#4d4d4d",
                label=f"{cfg} (rank 1)" if top else None,
                zorder=3 if top else 2,
            )
        dense = sub.groupby(["task", "target"])["dense_valid_roc_auc"].first().mean()
        ax.axhline(dense, color="#1b9e77", ls="--", label="dense probe")
        ax.set_xscale("log")
        ax.set_xlabel("number of features (top-N by |coefficient|)")
        ax.set_ylabel("mean validation ROC-AUC")
        ax.set_title(f"{enc} / {var}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9, loc="lower right")
    if not groups:
        axes.flat[0].text(0.5, 0.5, "no recovery curves", ha="center", va="center")
    return fig


def save_figure(fig, path_stem: Path, formats: list[str], dpi: int) -> list[Path]:
    out = []
    for fmt in formats:
        path = path_stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        out.append(path)
    plt.close(fig)
    return out


def run_figures(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    fc = cfg.figures
    tables = [ws.eval.table(name) for name in INPUT_TABLES] + [ws.eval.ranking]
    inputs = {path.name: fingerprint(path) for path in tables}
    main = ws.figure(FIGURE_SAE_QUALITY).with_suffix(f".{fc.formats[0]}")
    record = StageRecord("figures", hash_config(fc.model_dump(mode="json")), inputs)
    if not force and is_done(main, record):
        log.info("figures: up to date (%s)", ws.relative(main))
        return
    table = config_table(ws)
    if table.empty:
        log.warning(
            "figures: no evaluated SAE config in %s; nothing to plot", ws.relative(ws.eval_dir)
        )
        return
    written = save_figure(
        sae_quality_figure(table), ws.figure(FIGURE_SAE_QUALITY), fc.formats, fc.dpi
    )
    curves, ranking = _read(ws.eval.table("recovery_curves")), _read(ws.eval.ranking)
    if not curves.empty:
        written += save_figure(
            recovery_figure(curves, ranking), ws.figure(FIGURE_RECOVERY), fc.formats, fc.dpi
        )
    log.info("figures: wrote %s", ", ".join(ws.relative(p) for p in written))
    mark_done(main, record)
