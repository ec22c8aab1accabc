"""Every file SAIL stores: its name, where it lies, and how it is read back (see docs/artifacts.md).

This module is the one owner of artifact names. :class:`Workspace` names the folders of a run,
:class:`SaeFolder`, :class:`EvalFolder`, :class:`InterpretFolder` and :class:`ReportFolder` the
files inside them, and the ``read_*`` functions turn a stored table or JSON file into a typed
object with one schema check each (``cfg.json``, ``split.csv``, ``ranking.csv``, interpret
outputs). No other module spells a stored file's name: tests/test_artifacts.py scans ``src/`` for
the basenames in :data:`REGISTERED` and fails on a literal outside this file.

To add an artifact: one constant (or one entry of a folder's table map) here, a property on its
folder class, and a reader when other stages read it back. Writes stay with the stage that makes
the file (atomically, through :mod:`sail.workspace`).

Import-light on purpose: pandas is imported by the readers, not at module import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sail.errors import SailError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SPLITS = ("train", "valid", "test")

# ---- workspace level -------------------------------------------------------------------------
CONFIG_YAML = "config.yaml"
PHANTOM_TRUTH = "phantom_truth.json"
SLICES_TABLE = "slices.parquet"
SKIPPED_CSV = "skipped.csv"
SKIPPED_FAILED_CSV = "skipped.failed.csv"
SPLIT_CSV = "split.csv"
# slices.parquet: the identity columns every row starts with (metadata and geometry follow)
SLICE_ID_COLUMNS = ("slice_id", "modality", "image_id", "plane", "slice_idx", "png_path")
PARQUET = ".parquet"

# ---- embeddings/<name>.parts/ (resumable encoding) ------------------------------------------
ENCODE_PLAN = "plan.json"
ENCODE_ENCODER = "encoder.json"

# ---- sae/<encoder>/<variant>/<config>/ -------------------------------------------------------
SAE_WEIGHTS = "model.safetensors"
SAE_CFG = "cfg.json"
SAE_METRICS = "metrics.csv"
TRAIN_STATE = "train_state.pt"
# A seed replicate of an SAE config lives in <config>/seed-<n>/ (train.seeds); the config folder
# itself holds the first seed's model, the one ranked and interpreted.
REPLICATE_PREFIX = "seed-"
# cfg.json schema major: a reader refuses only a newer major (bump when a key changes meaning)
CFG_SCHEMA_VERSION = 1

# ---- eval/ -----------------------------------------------------------------------------------
RANKING_CSV = "ranking.csv"
TABLE1_MD = "table1.md"
EVAL_UNIT_MAIN = "probes.parquet"  # a unit's main part (eval/units/...), its manifest marks it done
# eval/ table name -> (file, format); each evaluation unit writes one <name>.parquet part per entry
EVAL_TABLES: dict[str, tuple[str, str]] = {
    "probes": ("probes.csv", "csv"),
    "probe_coefficients": ("probe_coefficients.parquet", "parquet"),
    "probes_breakdown": ("probes_breakdown.csv", "csv"),
    "null_baselines": ("null_baselines.csv", "csv"),
    "monosemanticity_features": ("monosemanticity_features.csv", "csv"),
    "monosemanticity_configs": ("monosemanticity_configs.csv", "csv"),
    "recovery_curves": ("recovery_curves.csv", "csv"),
    "recovery_summary": ("recovery_summary.csv", "csv"),
    "concepts": ("concepts.csv", "csv"),
    "confounds": ("confounds.csv", "csv"),
    "stability": ("stability.csv", "csv"),
    "hierarchy": ("hierarchy.csv", "csv"),
}

# Written by the maps stage, not by an evaluation unit (so not in EVAL_TABLES): per reported
# feature, the structure its spatial maps point at and the pointing-game hit rate vs a null.
SPATIAL_GROUNDING_CSV = "spatial_grounding.csv"

# ---- data/: per-slice label maps (prepare.label_maps) -----------------------------------------
# Beside each slice PNG, ``<plane>_<idx>.labels.png``: 8-bit lossless PNG, same geometry as the
# image, value = structure id (0 background); the ``label_path`` column of slices.parquet.
LABEL_MAP_SUFFIX = ".labels.png"
STRUCTURE_IDS_CSV = "structure_ids.csv"  # data/: modality, structure_id, structure

# ---- maps/<encoder>/<variant>/<config>/: spatial feature maps (the maps stage) ---------------
# maps.npz arrays: feature_K (int64), slice_id_KT (str, "" = padding), maps_KThw (float16, the
# encoder's grid), pre_KT (float32, the pre-activation each map averages to; NaN = padding)
MAPS_ARRAYS = "maps.npz"
MAPS_PROVENANCE = "maps.json"  # method (exact|approximate|occlusion), encoder, grid, SAE, split
# the config's rows of eval/spatial_grounding.csv (the stage assembles that table from them)
MAPS_GROUNDING = "grounding.csv"
# maps/<encoder>/<variant>/<config>/volumes/: one volume's maps of one feature as NIfTI
# (`sail maps --volume ID --feature F`), named by :class:`VolumeMapFiles`
MAPS_VOLUMES_DIR = "volumes"
NIFTI_GZ = ".nii.gz"

# ---- interpret/<verb>/<encoder>/<variant>/<config>/ ------------------------------------------
FINGERPRINT_TABLES = ("per_reference", "hits", "fingerprints", "always_on")  # <name>.csv each
FINGERPRINT_SUMMARY = "summary.csv"
FINGERPRINT_K_SWEEP = "k_sweep.png"
AUTOINTERP_DESCRIPTIONS = "descriptions.csv"
AUTOINTERP_SELECTED = "selected_features.csv"
AUTOINTERP_JUDGE = "judge.csv"
AUTOINTERP_METRICS = "metrics.json"
MODEL_CALLS = "calls.jsonl"
LANGUAGE_QUERIES = "queries.csv"
LANGUAGE_MATCHES = "matches.csv"
LANGUAGE_HITS = "hits.csv"
LANGUAGE_METRICS = "metrics.csv"

# ---- figures/ and report/ --------------------------------------------------------------------
FIGURE_SAE_QUALITY = "sae_quality"  # + .<format>
FIGURE_RECOVERY = "recovery_curves"
REPORT_INDEX = "index.html"

# Basenames no other module may spell (tests/test_artifacts.py).
# ---- `sail export-sae` output folders ----------------------------------------------------------
EXPORT_SAELENS_WEIGHTS = "sae_weights.safetensors"  # SAELens' own on-disk names
EXPORT_SAELENS_CFG = "cfg.json"
EXPORT_HF_SAELENS_DIR = "saelens"  # the SAELens copy inside a Hugging Face folder
EXPORT_MODEL_CARD = "README.md"

REGISTERED: frozenset[str] = frozenset(
    {
        EXPORT_SAELENS_WEIGHTS,
        EXPORT_MODEL_CARD,
        CONFIG_YAML,
        PHANTOM_TRUTH,
        SLICES_TABLE,
        SKIPPED_CSV,
        SKIPPED_FAILED_CSV,
        SPLIT_CSV,
        ENCODE_PLAN,
        ENCODE_ENCODER,
        SAE_WEIGHTS,
        SAE_CFG,
        SAE_METRICS,
        TRAIN_STATE,
        RANKING_CSV,
        TABLE1_MD,
        EVAL_UNIT_MAIN,
        *(file for file, _ in EVAL_TABLES.values()),
        *(f"{name}.csv" for name in FINGERPRINT_TABLES),
        FINGERPRINT_SUMMARY,
        FINGERPRINT_K_SWEEP,
        AUTOINTERP_DESCRIPTIONS,
        AUTOINTERP_SELECTED,
        AUTOINTERP_JUDGE,
        AUTOINTERP_METRICS,
        MODEL_CALLS,
        LANGUAGE_QUERIES,
        LANGUAGE_MATCHES,
        LANGUAGE_HITS,
        LANGUAGE_METRICS,
        REPORT_INDEX,
        SPATIAL_GROUNDING_CSV,
        STRUCTURE_IDS_CSV,
        MAPS_ARRAYS,
        MAPS_PROVENANCE,
        MAPS_GROUNDING,
    }
)


# ---- folders ---------------------------------------------------------------------------------
def replicate_folder(seed: int) -> str:
    """Folder name of the seed-``seed`` replicate inside its config's folder."""
    return f"{REPLICATE_PREFIX}{seed}"


@dataclass(frozen=True)
class SaeFolder:
    """One trained SAE: weights, cfg.json, metrics.csv (and the trainer's resume state)."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / SAE_WEIGHTS

    @property
    def cfg(self) -> Path:
        return self.path / SAE_CFG

    @property
    def metrics(self) -> Path:
        return self.path / SAE_METRICS


@dataclass(frozen=True)
class EvalFolder:
    """``eval/``: the assembled tables, the ranking and Table 1, and the per-unit parts."""

    path: Path

    def table(self, name: str) -> Path:
        """An assembled table by its :data:`EVAL_TABLES` name (e.g. ``"probes"``)."""
        return self.path / EVAL_TABLES[name][0]

    @property
    def ranking(self) -> Path:
        return self.path / RANKING_CSV

    @property
    def table1(self) -> Path:
        return self.path / TABLE1_MD

    @property
    def spatial_grounding(self) -> Path:
        return self.path / SPATIAL_GROUNDING_CSV

    @property
    def units(self) -> Path:
        return self.path / "units"

    def unit(self, encoder: str, variant: str, config: str | None) -> Path:
        """One unit's part folder: ``units/<encoder>/dense`` for the dense probes (config None)."""
        if config is None:
            return self.units / encoder / variant
        return self.units / encoder / variant / config

    @staticmethod
    def part(unit: Path, name: str) -> Path:
        return unit / f"{name}{PARQUET}"

    @staticmethod
    def unit_main(unit: Path) -> Path:
        return unit / EVAL_UNIT_MAIN


@dataclass(frozen=True)
class InterpretFolder:
    """``interpret/<verb>/<encoder>/<variant>/<config>/``: one interpret verb's outputs."""

    path: Path

    def csv(self, name: str) -> Path:
        return self.path / f"{name}.csv"

    @property
    def summary(self) -> Path:
        return self.path / FINGERPRINT_SUMMARY

    @property
    def k_sweep(self) -> Path:
        return self.path / FINGERPRINT_K_SWEEP

    @property
    def descriptions(self) -> Path:
        return self.path / AUTOINTERP_DESCRIPTIONS

    @property
    def selected(self) -> Path:
        return self.path / AUTOINTERP_SELECTED

    @property
    def judge(self) -> Path:
        return self.path / AUTOINTERP_JUDGE

    @property
    def metrics_json(self) -> Path:
        return self.path / AUTOINTERP_METRICS

    @property
    def calls(self) -> Path:
        return self.path / MODEL_CALLS

    @property
    def queries(self) -> Path:
        return self.path / LANGUAGE_QUERIES

    @property
    def matches(self) -> Path:
        return self.path / LANGUAGE_MATCHES

    @property
    def hits(self) -> Path:
        return self.path / LANGUAGE_HITS

    @property
    def metrics_csv(self) -> Path:
        return self.path / LANGUAGE_METRICS


@dataclass(frozen=True)
class MapsFolder:
    """``maps/<encoder>/<variant>/<config>/``: one config's spatial feature maps."""

    path: Path

    @property
    def arrays(self) -> Path:
        return self.path / MAPS_ARRAYS

    @property
    def provenance(self) -> Path:
        return self.path / MAPS_PROVENANCE

    @property
    def grounding(self) -> Path:
        return self.path / MAPS_GROUNDING

    @property
    def volumes(self) -> Path:
        """Where ``sail maps --volume ID --feature F`` writes its NIfTI files by default."""
        return self.path / MAPS_VOLUMES_DIR


@dataclass(frozen=True)
class VolumeMapFiles:
    """One volume's exported maps of one feature, in ``folder`` (any folder: ``--out``).

    ``<modality>_<image_id>_f<feature:05d>_<plane>.nii.gz`` (float32 map per plane),
    ``..._<plane>_filled.nii.gz`` (uint8: 1 = the voxel got a map value) and
    ``<modality>_<image_id>_f<feature:05d>.json`` (what was exported, per-slice pre-activations).
    """

    folder: Path
    modality: str
    image_id: str
    feature: int

    @property
    def stem(self) -> str:
        return f"{self.modality}_{self.image_id}_f{self.feature:05d}"

    def map(self, plane: str) -> Path:
        return self.folder / f"{self.stem}_{plane}{NIFTI_GZ}"

    def filled(self, plane: str) -> Path:
        return self.folder / f"{self.stem}_{plane}_filled{NIFTI_GZ}"

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.stem}.json"


def _file_safe(name: str) -> str:
    """``name`` with every character but letters, digits, ``.``, ``-`` and ``_`` replaced by
    ``_`` (slice ids hold ``/``; image ids come from user folders)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass(frozen=True)
class ReportFolder:
    """``report/``: index, one page per config, feature pages, thumbnails and figure copies."""

    path: Path

    @property
    def index(self) -> Path:
        return self.path / REPORT_INDEX

    @property
    def thumbs(self) -> Path:
        return self.path / "thumbs"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def config_page(self, key: str) -> Path:
        return self.path / "configs" / f"{key}.html"

    def feature_page(self, key: str, feature: int) -> Path:
        return self.path / "features" / key / f"f{feature:05d}.html"

    def volume_page(self, key: str, modality: str, image_id: str) -> Path:
        """One volume's profile page: which of the config's features fire where along it."""
        return self.path / "volumes" / key / f"{_file_safe(modality)}__{_file_safe(image_id)}.html"

    def overlay(self, key: str, feature: int, slice_id: str) -> Path:
        """The spatial-map overlay PNG drawn over a feature page's thumbnail of ``slice_id``."""
        return self.path / "overlays" / key / f"f{feature:05d}" / f"{_file_safe(slice_id)}.png"

    def href(self, page: Path, start: Path | None = None) -> str:
        """``page`` as a link from the folder ``start`` (the report root by default)."""
        return Path(os.path.relpath(page, start or self.path)).as_posix()


class Workspace:
    """Paths of every artifact in one run folder (layout in docs/artifacts.md)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_yaml(self) -> Path:
        return self.root / CONFIG_YAML

    @property
    def phantom_dir(self) -> Path:
        return self.root / "phantom"

    @property
    def phantom_truth(self) -> Path:
        return self.phantom_dir / PHANTOM_TRUTH

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def slices_dir(self) -> Path:
        return self.data_dir / "slices"

    @property
    def slices_table(self) -> Path:
        return self.data_dir / SLICES_TABLE

    @staticmethod
    def volume_slices(modality: str, image_id: str) -> str:
        """One volume's PNG folder, relative to the workspace root."""
        return f"data/slices/{modality}/{image_id}"

    @staticmethod
    def slice_png(modality: str, image_id: str, plane: str, idx: int) -> str:
        """One slice's PNG, relative to the workspace root (the ``png_path`` column)."""
        return f"{Workspace.volume_slices(modality, image_id)}/{plane}_{idx:04d}.png"

    @staticmethod
    def slice_label_map(modality: str, image_id: str, plane: str, idx: int) -> str:
        """One slice's label map beside its PNG (the ``label_path`` column)."""
        return f"{Workspace.volume_slices(modality, image_id)}/{plane}_{idx:04d}{LABEL_MAP_SUFFIX}"

    @property
    def structure_ids(self) -> Path:
        return self.data_dir / STRUCTURE_IDS_CSV

    @property
    def skipped_csv(self) -> Path:
        return self.data_dir / SKIPPED_CSV

    @property
    def skipped_failed_csv(self) -> Path:
        """Where a failed re-prepare reports its skips without replacing the finished table's."""
        return self.data_dir / SKIPPED_FAILED_CSV

    def prepare_parts(self, config_hash: str) -> Path:
        return self.data_dir / ".parts" / config_hash

    @staticmethod
    def prepare_part(parts: Path, modality: str, image_id: str) -> Path:
        """One sliced scan's rows in ``parts`` (:meth:`prepare_parts`), kept until the table is
        assembled, so an interrupted run resumes."""
        return parts / f"{modality}_{image_id}{PARQUET}"

    @property
    def split_csv(self) -> Path:
        return self.data_dir / SPLIT_CSV

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def embeddings(self, encoder: str) -> Path:
        return self.embeddings_dir / f"{encoder}{PARQUET}"

    def embedding_parts(self, encoder: str) -> Path:
        return self.embeddings_dir / f"{encoder}.parts"

    def embedding_chunk(self, encoder: str, k: int) -> Path:
        """One finished chunk of a resumable or sharded encoding."""
        return self.embedding_parts(encoder) / f"chunk_{k:06d}{PARQUET}"

    def encoders_with_embeddings(self) -> list[str]:
        root = self.embeddings_dir
        return sorted(p.name[: -len(PARQUET)] for p in root.glob(f"*{PARQUET}"))

    @property
    def sae_root(self) -> Path:
        return self.root / "sae"

    def sae_dir(self, encoder: str, variant: str, config_name: str) -> Path:
        return self.sae_root / encoder / variant / config_name

    def sae(self, encoder: str, variant: str, config_name: str) -> SaeFolder:
        return SaeFolder(self.sae_dir(encoder, variant, config_name))

    def replicate_dir(self, encoder: str, variant: str, config_name: str, seed: int) -> Path:
        return self.sae_dir(encoder, variant, config_name) / replicate_folder(seed)

    def replicate_dirs(self, encoder: str, variant: str, config_name: str) -> dict[int, Path]:
        """Seed -> folder of every trained replicate of a config (those holding a cfg.json)."""
        root = self.sae_dir(encoder, variant, config_name)
        found = {}
        for folder in sorted(root.glob(f"{REPLICATE_PREFIX}*")) if root.is_dir() else []:
            seed = folder.name[len(REPLICATE_PREFIX) :]
            if seed.lstrip("-").isdigit() and SaeFolder(folder).cfg.is_file():
                found[int(seed)] = folder
        return dict(sorted(found.items()))

    @property
    def activations_root(self) -> Path:
        return self.root / "activations"

    def activations_dir(self, encoder: str, variant: str, config_name: str) -> Path:
        return self.activations_root / encoder / variant / config_name

    def activations(self, encoder: str, variant: str, config_name: str, split: str) -> Path:
        return self.activations_dir(encoder, variant, config_name) / f"{split}{PARQUET}"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval(self) -> EvalFolder:
        return EvalFolder(self.eval_dir)

    @property
    def interpret_dir(self) -> Path:
        return self.root / "interpret"

    def interpret(self, verb: str, encoder: str, variant: str, config_name: str) -> InterpretFolder:
        """``verb`` is ``fingerprint``, ``autointerp`` or ``language``."""
        return InterpretFolder(self.interpret_dir / verb / encoder / variant / config_name)

    @property
    def maps_root(self) -> Path:
        return self.root / "maps"

    def maps(self, encoder: str, variant: str, config_name: str) -> MapsFolder:
        return MapsFolder(self.maps_root / encoder / variant / config_name)

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, stem: str) -> Path:
        """A figure without its format suffix (``figure(FIGURE_SAE_QUALITY)``)."""
        return self.figures_dir / stem

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> ReportFolder:
        return ReportFolder(self.report_dir)

    def relative(self, path: str | os.PathLike) -> str:
        return Path(path).relative_to(self.root).as_posix()


# ---- readers ---------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SailError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SailError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SailError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def check_schema(cfg: dict[str, Any], where: str | Path) -> None:
    """cfg.json's compatibility rule: readers ignore keys they do not know (other versions add
    keys), so only a newer MAJOR schema version, one that changes the meaning of existing keys,
    is refused. ``schema_version`` is an int (the major) or a "MAJOR.MINOR" string."""
    raw = cfg.get("schema_version")
    try:
        major = int(str(raw).split(".")[0])
    except ValueError:
        raise SailError(
            f"{where}: schema_version {raw!r} is not a version number (expected e.g. "
            f"{CFG_SCHEMA_VERSION})"
        ) from None
    if major > CFG_SCHEMA_VERSION:
        raise SailError(
            f"{where}: written with cfg.json schema {raw}, newer than the "
            f"{CFG_SCHEMA_VERSION}.x this SAIL reads; upgrade SAIL to load it"
        )
    if major < 1:
        raise SailError(f"{where}: schema_version {raw!r} is not a SAIL cfg.json schema")


def read_cfg(sae_dir: str | os.PathLike) -> dict[str, Any]:
    """An SAE folder's cfg.json, schema-checked: the one parser of that file.

    Required keys are checked here (a missing one is an error naming it), so every reader can
    index them; keys a newer SAIL adds are kept and ignored by older readers.
    """
    path = SaeFolder(Path(sae_dir)).cfg
    cfg = _read_json(path, "SAE checkpoint config")
    check_schema(cfg, path)
    missing = [k for k in ("variant", "dict_sizes", "k_values", "d_in") if k not in cfg]
    if missing:
        raise SailError(f"{path}: missing key(s) {missing}; retrain it (`sail train --force`)")
    return cfg


@dataclass(frozen=True)
class SaeCfg:
    """The cfg.json fields other stages use, typed; ``raw`` keeps every stored key."""

    path: Path
    variant: str
    dict_sizes: list[int]
    k_values: list[int]
    topk_mode: str
    d_in: int
    final_metrics: dict[str, float]
    raw: dict[str, Any] = field(repr=False)


def read_sae_cfg(sae_dir: str | os.PathLike) -> SaeCfg:
    cfg = read_cfg(sae_dir)
    return SaeCfg(
        path=SaeFolder(Path(sae_dir)).cfg,
        variant=str(cfg["variant"]),
        dict_sizes=[int(v) for v in cfg["dict_sizes"]],
        k_values=[int(v) for v in cfg["k_values"]],
        topk_mode=str(cfg.get("topk_mode", "per_level")),
        d_in=int(cfg["d_in"]),
        final_metrics=dict(cfg.get("final_metrics") or {}),
        raw=cfg,
    )


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """``data/split.csv``: one row per volume (modality, image_id, split), checked: the columns are
    there, every split value is one of :data:`SPLITS`, no volume is listed twice. Ids stay strings
    (``s0001`` must not become 1)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SailError(f"{path} not found: run `sail split` first")
    split = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("modality", "image_id", "split") if c not in split.columns]
    if missing:
        raise SailError(f"{path}: missing column(s) {missing}")
    bad = sorted(set(split["split"]) - set(SPLITS))
    if bad:
        raise SailError(f"{path}: column 'split' has values {bad}; expected {'|'.join(SPLITS)}")
    twice = split.duplicated(["modality", "image_id"])
    if twice.any():
        row = split[twice].iloc[0]
        raise SailError(f"{path}: volume ({row['modality']}, {row['image_id']}) listed twice")
    return split


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """One slice's label map (the ``label_path`` column, resolved against the workspace root):
    uint8 (H, W), value = structure id of ``data/structure_ids.csv``, 0 = background."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SailError(f"label map not found: {path} (prepare with prepare.label_maps: true)")
    try:
        with Image.open(path) as img:
            mode = img.mode
            pixels = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise SailError(f"{path}: cannot read label map ({exc})") from None
    if mode != "L" or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise SailError(
            f"{path}: a label map is an 8-bit single-channel PNG; found mode {mode!r} "
            f"(shape {pixels.shape}, {pixels.dtype})"
        )
    return pixels


def read_structure_ids(path: str | os.PathLike) -> pd.DataFrame:
    """``data/structure_ids.csv``: modality, structure_id (int, 1-255), structure, checked: the
    columns are there, ids are 8-bit and positive, neither an id nor a name appears twice within
    a modality."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SailError(f"{path} not found: run `sail prepare` with prepare.label_maps: true")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("modality", "structure_id", "structure") if c not in table.columns]
    if missing:
        raise SailError(f"{path}: missing column(s) {missing}")
    ids = pd.to_numeric(table["structure_id"], errors="coerce")
    bad = table.index[ids.isna() | (ids != ids.round()) | (ids < 1) | (ids > 255)]
    if len(bad):
        raise SailError(
            f"{path}: row {bad[0] + 1}: structure_id {table['structure_id'][bad[0]]!r} is not an "
            "integer in 1..255"
        )
    table["structure_id"] = ids.astype(int)
    for column in ("structure_id", "structure"):
        twice = table.duplicated(["modality", column])
        if twice.any():
            row = table[twice].iloc[0]
            raise SailError(f"{path}: {row['modality']} {column} {row[column]} listed twice")
    return table


def read_table(path: str | os.PathLike) -> pd.DataFrame | None:
    """A CSV artifact, or None when it is missing or empty (a stage that had nothing to write)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path, dtype={"sae_config": str})
    except pd.errors.EmptyDataError:  # written from an empty frame: no header either
        return None


def read_final_metrics(path: str | os.PathLike) -> dict[str, float]:
    """An SAE's ``metrics.csv``: the stored codes' metrics at the largest level (l0, fvu,
    r2_published, dead_frac); empty when the file is missing.

    These are the ``mode == inference`` rows training writes last (held-out rows, dead fraction
    from the codes); files from before that column fall back to the last validation row.
    """
    df = read_table(path)
    if df is None or df.empty or "split" not in df.columns:
        return {}
    if "mode" in df.columns and (df["mode"] == "inference").any():
        df = df[df["mode"] == "inference"]
    else:
        df = df[df["split"].astype(str) == "valid"]
    if df.empty:
        return {}
    if "level" in df.columns:
        df = df[df["level"] == df["level"].max()]
    if "step" in df.columns:
        df = df[df["step"] == df["step"].max()]
    row = df.iloc[-1]
    keys = ("l0", "fvu", "r2_published", "dead_frac")
    return {k: float(row[k]) for k in keys if k in row and row[k] == row[k]}


RANKING_KEYS = ("encoder", "variant", "sae_config", "final_rank")  # what readers select on


def read_ranking(path: str | os.PathLike) -> pd.DataFrame | None:
    """``eval/ranking.csv`` (None when missing), checked for the columns readers select on."""
    ranking = read_table(path)
    if ranking is None:
        return None
    missing = sorted(set(RANKING_KEYS) - set(ranking.columns))
    if missing:
        raise SailError(f"{path}: missing column(s) {missing}")
    return ranking


@dataclass(frozen=True)
class Description:
    """One feature's autointerp result, with the enrichment its description was built from."""

    feature: int
    description: str
    status: str
    fields: dict[str, Any]
    enrichment: dict[str, Any] | None


def read_descriptions(path: str | os.PathLike) -> dict[int, Description]:
    """``descriptions.csv`` by feature (empty when missing): description, judge columns, and the
    stored enrichment (``enrichment`` JSON) of the concept-split slices it was built from."""
    table = read_table(path)
    if table is None or "feature" not in table.columns:
        return {}
    out = {}
    for rec in table.to_dict("records"):
        raw = rec.get("enrichment")
        enrichment = json.loads(raw) if isinstance(raw, str) and raw else None
        out[int(rec["feature"])] = Description(
            feature=int(rec["feature"]),
            description="" if _missing(rec.get("description")) else str(rec["description"]),
            status=str(rec.get("status", "")),
            fields=rec,
            enrichment=enrichment,
        )
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


@dataclass(frozen=True)
class FeatureMapsFile:
    """One config's stored spatial maps (maps.npz + maps.json): row k, column t = the t-th top
    valid slice of feature ``feature_K[k]`` (``slice_id_KT`` "" and ``pre_KT`` NaN = padding)."""

    feature_K: Any
    slice_id_KT: Any
    maps_KThw: Any  # float16, the encoder grid
    pre_KT: Any
    provenance: dict[str, Any]

    @property
    def method(self) -> str:
        """``exact``, ``approximate`` or ``occlusion`` (maps.json's; exact when unrecorded)."""
        return str(self.provenance.get("method", "exact"))

    def lookup(self, feature: int, slice_ids: list[str]) -> tuple[Any, Any]:
        """The maps of ``feature`` on ``slice_ids``: (mask of the ids that have one, their maps
        as float32, in ``slice_ids`` order)."""
        import numpy as np
        import pandas as pd

        k = np.flatnonzero(self.feature_K == feature)
        found = np.zeros(len(slice_ids), bool)
        if not len(k) or not slice_ids:
            return found, np.zeros((0, *self.maps_KThw.shape[2:]), np.float32)
        k = int(k[0])
        real = np.flatnonzero((self.slice_id_KT[k] != "") & np.isfinite(self.pre_KT[k]))
        at = pd.Index(self.slice_id_KT[k, real]).get_indexer(pd.Index(slice_ids))
        found = at >= 0
        return found, self.maps_KThw[k, real[at[found]]].astype(np.float32)


MAPS_KEYS = ("feature_K", "slice_id_KT", "maps_KThw", "pre_KT")


def read_maps(folder: MapsFolder | str | os.PathLike) -> FeatureMapsFile | None:
    """A config's maps (None when the maps stage has not written them), checked: the four arrays
    are there and agree in shape."""
    import numpy as np

    folder = folder if isinstance(folder, MapsFolder) else MapsFolder(Path(folder))
    if not folder.arrays.is_file():
        return None
    try:
        with np.load(folder.arrays, allow_pickle=False) as z:
            missing = [k for k in MAPS_KEYS if k not in z.files]
            arrays = {k: z[k] for k in MAPS_KEYS if k in z.files}
    except (OSError, ValueError) as exc:
        raise SailError(f"{folder.arrays}: unreadable ({exc}); rerun `sail maps --force`") from None
    if missing:
        raise SailError(f"{folder.arrays}: missing array(s) {missing}; rerun `sail maps --force`")
    K, T = arrays["slice_id_KT"].shape
    if arrays["feature_K"].shape != (K,) or arrays["maps_KThw"].shape[:2] != (K, T):
        raise SailError(f"{folder.arrays}: array shapes disagree; rerun `sail maps --force`")
    provenance = (
        _read_json(folder.provenance, "maps provenance") if folder.provenance.is_file() else {}
    )
    arrays["slice_id_KT"] = arrays["slice_id_KT"].astype(str)
    return FeatureMapsFile(**arrays, provenance=provenance)
