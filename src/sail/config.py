"""Typed configuration for every pipeline stage.

One YAML file maps onto :class:`SailConfig`; each top-level key is one stage's section.
Unknown keys are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sail.errors import SailError

Modality = Literal["ct", "mri"]


class ConfigError(SailError):
    """A config file or override that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(Section):
    """Synthetic TotalSegmentator-format dataset (``sail phantom``)."""

    n_ct: int = Field(24, ge=0)
    n_mri: int = Field(12, ge=0)
    size: int = Field(64, ge=24, le=512, description="voxels per side of each phantom volume")
    seed: int = 0


class PrepareConfig(Section):
    """Volumes -> PNG slices + slices.parquet (``sail prepare``)."""

    source: Path | None = Field(
        None,
        description=(
            "folder holding CT_Dataset_v201/ and/or MRI_Dataset_v200/, or a manifest "
            "(.csv/.parquet, one row per volume: image, optional image_id, modality, "
            "segmentations, labels, group, metadata)"
        ),
    )
    modalities: list[Modality] = Field(default_factory=lambda: ["ct", "mri"])
    style: Literal["canonical", "published"] = "canonical"
    image_size: int = Field(224, ge=16, le=4096)
    slice_stride: int = Field(1, ge=1, description="keep every n-th slice along each plane")
    ct_spacing_mm: float = Field(1.5, gt=0, description="isotropic CT resampling (canonical style)")
    workers: int | None = Field(None, ge=1, description="worker processes; default: CPU count")
    max_scans: int | None = Field(
        None, ge=1, description="only the first n scans per modality (quick looks)"
    )
    label_maps: bool = Field(
        False,
        description=(
            "also write, beside each slice PNG, a lossless 8-bit label map (structure id per "
            "pixel, same geometry; ids in data/structure_ids.csv; where masks overlap the "
            "smallest structure wins). Spatial grounding (sail maps) needs them; they add disk "
            "use (docs/artifacts.md)"
        ),
    )

    @field_validator("modalities")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one modality is needed")
        return sorted(set(value))


class SplitConfig(Section):
    """Scan-level train/valid/test split (``sail split``)."""

    test_institutes: list[str] = Field(default_factory=lambda: ["A", "D", "E"])
    train_fraction: float = Field(0.8, gt=0, lt=1)
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of scans (or patient groups) drawn, seeded, "
        "as the test split when no scan comes from test_institutes",
    )
    seed: int = 42


class EncoderEntry(Section):
    """One embeddings table: an encoder from the registry, its weights and input size."""

    encoder: str = Field(
        "efficientnet-lite0",
        description=(
            "dinov3, biomedparse, random-biomedparse, random-dinov3, efficientnet-lite0, "
            "timm:MODEL_NAME or hf:MODEL_ID_OR_DIR"
        ),
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="table name; default: the encoder's",
    )
    weights: str | None = Field(
        None, description="local file/folder or hub id; default: the published weights"
    )
    image_size: int | None = Field(
        None, ge=16, le=4096, description="model input side; default: the published size"
    )
    pooling: Literal["auto", "mean", "cls", "gem"] = Field(
        "auto",
        description=(
            "timm:/hf: encoders: cls token, mean or GeM of the last tokens/feature map; "
            "auto = cls when the model has a class token, else mean"
        ),
    )


class EncodeConfig(Section):
    """Slices -> embeddings/<name>.parquet (``sail encode``)."""

    encoders: list[EncoderEntry] = Field(default_factory=lambda: [EncoderEntry()])
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU where published, else fp32"
    )
    batch_size: int | None = Field(
        None, ge=1, description="default: per encoder on GPU (32-128), 16 on CPU"
    )
    workers: int | None = Field(
        None, ge=0, description="PNG-decoding DataLoader workers; default: CPUs - 1 (max 8)"
    )
    chunk_size: int = Field(1600, ge=1, description="slices per part file (resume and shard unit)")
    shard: str | None = Field(
        None, pattern=r"^\d+/\d+$", description="i/n: encode only chunks i, i+n, ... (0-based)"
    )


PUBLISHED_PROBE_STRUCTURES = [
    "gallbladder",
    "kidney_left",
    "liver",
    "spleen",
    "prostate",
    "brain",
    "heart",
    "sternum",
    "clavicula_left",
    "clavicula_right",
]


class ProbeSettings(Section):
    """Elastic-net logistic probes; defaults are the published ones (saga, C=1, l1_ratio=0.5)."""

    C: float = Field(1.0, gt=0)
    l1_ratio: float = Field(0.5, ge=0, le=1)
    max_iter: int = Field(1000, ge=1)
    tol: float = Field(1e-4, gt=0)
    train_samples: int = Field(10_000, ge=10, description="stratified training subsample per task")
    dense_input: Literal["raw", "l2"] = Field(
        "raw", description="raw embeddings as published, or L2-normalised as the SAE saw them"
    )
    solver: Literal["sail", "sklearn"] = Field(
        "sail",
        description=(
            "SAGA for the same objective: sail's O(nnz) lazy-update kernel, "
            "or sklearn's saga (published)"
        ),
    )
    seed: int = 42


class RecoverySettings(Section):
    """Performance recovery: probes restricted to the top-N features of the sparse probe."""

    n_features: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 30, 50, 75, 100])
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    train_samples: int = Field(5_000, ge=10)
    max_iter: int = Field(200, ge=1)
    min_dense_auc: float = Field(
        0.55, description="skip targets whose dense valid ROC-AUC is below this (or NaN)"
    )


class MonosemanticitySettings(Section):
    split: Literal["train", "valid", "test"] = "valid"
    top_n: list[int] = Field(default_factory=lambda: [10, 50])
    null_draws: int = Field(100, ge=1)
    seed: int = 42


class RankingSettings(Section):
    """Table 1. ``published: true`` reproduces the published choices (see docs/artifacts.md)."""

    published: bool = False
    m_config: Literal["top10", "top50"] = Field(
        "top50", description="which M_config ranks (the published table used top50)"
    )
    fill_unreached: Literal["grid_max", "column_max_plus_one"] = "grid_max"
    count_both_binary_targets: bool = False
    variants_together: bool = False
    min_dense_auc: float = 0.6


class ConceptSettings(Section):
    """Concept grounding: best feature per label selected on train, its ROC-AUC reported on valid
    and test."""

    confound_labels: list[str] = Field(
        default_factory=lambda: ["institute", "scanner_model", "kvp"]
    )
    confound_min_auc: float = Field(0.75, ge=0.5, le=1)
    breakdown_by: list[str] = Field(default_factory=lambda: ["institute", "modality", "plane"])
    bootstrap: int = Field(
        200, ge=0, description="volume-clustered bootstrap resamples for test breakdown CIs"
    )
    seed: int = 42


class EvaluateConfig(Section):
    """Probes, monosemanticity, recovery, ranking and concepts (``sail evaluate``)."""

    encoders: list[str] | None = Field(
        None, description="encoders to evaluate; default: every embeddings table"
    )
    tasks: list[Literal["modality", "plane", "sex", "age_group", "structures"]] = Field(
        default_factory=lambda: ["modality", "plane", "sex", "age_group", "structures"]
    )
    extra_tasks: list[str] = Field(
        default_factory=list,
        description=(
            "more probe targets: kvp, institute, manufacturer, scanner_model, pathology, or any "
            "metadata column of "
            "slices.parquet (e.g. a manifest's diagnosis): one binary probe per value seen in "
            "training"
        ),
    )
    probe_structures: list[str] = Field(default_factory=lambda: list(PUBLISHED_PROBE_STRUCTURES))
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    monosemanticity: MonosemanticitySettings = Field(default_factory=MonosemanticitySettings)
    ranking: RankingSettings = Field(default_factory=RankingSettings)
    concepts: ConceptSettings = Field(default_factory=ConceptSettings)


class EndpointSettings(Section):
    """An OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp, TGI).

    The API key is read from the environment variable named by ``api_key_env`` only, so it is
    never part of a config file, a manifest or a log line."""

    base_url: str | None = Field(
        None, description="e.g. http://127.0.0.1:8000/v1; default: env SAIL_OPENAI_BASE_URL"
    )
    model: str | None = Field(None, description="served model name; default: env SAIL_OPENAI_MODEL")
    api_key_env: str = Field(
        "SAIL_OPENAI_API_KEY", description="environment variable holding the API key (optional)"
    )
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(
        3, ge=0, description="retries after a timeout, connection error, 429 or 5xx"
    )
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    concurrency: int = Field(4, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(300, ge=1)
    seed: int | None = 0
    json_schema: bool = Field(
        True, description="ask for JSON-schema structured output (response_format)"
    )


class LocalModelSettings(Section):
    """A local transformers image-text-to-text model (e.g. a MedGemma checkpoint you have)."""

    model: str | None = Field(None, description="local folder or hub id (offline: must be cached)")
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    max_new_tokens: int = Field(100, ge=1)


class FingerprintSettings(Section):
    split: Literal["train", "valid", "test"] = "valid"
    n_references: int = Field(1000, ge=1)
    k_values: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 50, 100])
    k_main: int = Field(5, ge=1, description="K written out per hit and fingerprint, and drawn")
    top_hits: int = Field(5, ge=1, description="hits per reference, one per volume")
    batch_size: int = Field(256, ge=1, description="references scored together")
    seed: int = 0


class AutointerpSettings(Section):
    n_features: int = Field(250, ge=1)
    selection: Literal["top_n", "custom", "all"] = "top_n"
    features: list[int] = Field(
        default_factory=list, description="feature ids for selection: custom"
    )
    exclude_tasks: list[str] = Field(
        default_factory=lambda: ["institute", "scanner_model", "kvp", "manufacturer"],
        description="probe tasks not counted as task importance (confounds)",
    )
    monosemanticity_top_n: int = Field(50, ge=1)
    coef_top: int = Field(100, ge=1, description="top-|coef| features per probe list")
    n_images: int = Field(5, ge=1)
    n_candidates: int = Field(20, ge=1, description="distinct volumes the images are drawn from")
    enrichment_top: int = Field(
        200, ge=10, description="top-activating slices used for enrichment statistics"
    )
    min_active: int = Field(
        10, ge=1, description="distractors must fire on at least this many concept-split slices"
    )
    concept_split: Literal["train", "valid", "test"] = "train"
    judge_split: Literal["train", "valid", "test"] = "valid"
    n_distractors: int = Field(4, ge=1, le=25)
    judge_permutations: int = Field(3, ge=1)
    parse_retries: int = Field(2, ge=0, description="re-asks with the parse error fed back")
    seed: int = 0


class LanguageSettings(Section):
    split: Literal["train", "valid", "test"] = "test"
    published_queries: bool = Field(True, description="include the 12 published queries")
    queries_file: Path | None = Field(
        None, description="YAML list of {name, text} (constraints parsed from text)"
    )
    queries: list[dict[str, Any]] = Field(
        default_factory=list, description="inline user queries {name, text}"
    )
    n_features: int = Field(3, ge=1)
    top_k: int = Field(10, ge=1)
    eligible: Literal["judged", "all"] = Field(
        "judged", description="judged: only features whose judge rank <= 2 (all when not judged)"
    )


class InterpretConfig(Section):
    """Fingerprint retrieval, autointerpretation and language retrieval (``sail interpret``)."""

    encoders: list[str] = Field(
        default_factory=list, description="empty: every encoder with activations"
    )
    sae_configs: list[str] = Field(
        default_factory=list, description="configs added to the final_rank == 1 one (or 'all')"
    )
    verbs: list[Literal["fingerprint", "autointerp", "language"]] = Field(
        default_factory=lambda: ["fingerprint", "autointerp", "language"],
        description="what the interpret stage runs",
    )
    describer: Literal["metadata", "openai", "transformers"] = "metadata"
    judge: Literal["embedding", "openai", "transformers", "none"] = "embedding"
    matcher: Literal["embedding", "lexical", "llm"] = "embedding"
    matcher_llm: Literal["openai", "transformers"] = "openai"
    openai: EndpointSettings = Field(default_factory=EndpointSettings)
    judge_openai: EndpointSettings | None = Field(
        None, description="a separate judge endpoint/model; default: openai"
    )
    transformers: LocalModelSettings = Field(default_factory=LocalModelSettings)
    judge_transformers: LocalModelSettings | None = None
    allow_remote: bool = Field(
        False, description="allow non-loopback endpoints (images leave the machine)"
    )
    dry_run: bool = Field(
        False, description="print prompts and call counts; call nothing, write nothing"
    )
    max_calls: int | None = Field(
        None, ge=0, description="model calls allowed per run (cache hits are free)"
    )
    fingerprint: FingerprintSettings = Field(default_factory=FingerprintSettings)
    autointerp: AutointerpSettings = Field(default_factory=AutointerpSettings)
    language: LanguageSettings = Field(default_factory=LanguageSettings)


class FiguresConfig(Section):
    """Matplotlib figures (``sail figures``)."""

    formats: list[Literal["png", "pdf", "svg"]] = Field(default_factory=lambda: ["png", "pdf"])
    dpi: int = Field(150, ge=50, le=600)


class TrainingSettings(Section):
    """Training hyper-parameters shared by one grid.

    The field defaults are the published settings (the naming baseline of SAE folders). With
    ``recipe: auto`` (the default for matryoshka) epochs, lr, lr_min, warmup_steps, clip_norm and
    schedule that are not given explicitly come from ``sail.sae.recipe`` instead.
    """

    recipe: Literal["auto", "published"] | None = Field(
        None,
        description="auto: settings from data and dictionary size; published: the paper's; "
        "default: auto for matryoshka, published for sail",
    )
    epochs: int = Field(
        100, ge=1, description="published 100; auto: at least 5000 steps, at most 100 epochs"
    )
    batch_size: int = Field(2048, ge=1)
    lr: float = Field(
        1e-4, gt=0, description="published 1e-4; auto: 0.032 / sqrt(largest dictionary size)"
    )
    lr_min: float = Field(
        1e-6, ge=0, description="floor of the schedule's decay (published 1e-6; auto 0)"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="published min(1000, steps // 10); auto: 5% of steps, <= 1000"
    )
    clip_norm: float | None = Field(
        0.5, gt=0, description="global L2 gradient norm per SAE (published 0.5; auto: none)"
    )
    schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        description=(
            "cosine (published): warmup, cosine to lr_min; constant (auto): warmup, constant, "
            "linear decay to lr_min over the last 20% of steps"
        ),
    )
    seed: int = 42
    permutation: Literal["per_epoch", "fixed"] = Field(
        "per_epoch", description="fixed = the published single permutation reused every epoch"
    )
    dead_window: int = Field(
        100_000,
        ge=1,
        description="samples without firing before a latent is dead (at most one epoch)",
    )
    auxk_alpha: float = Field(1 / 32, ge=0, description="AuxK weight (matryoshka)")
    auxk_k: int | None = Field(
        None, ge=1, description="dead latents used by AuxK; default d_in // 2"
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    calibration_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description=(
            "share of the training rows (whole volumes) kept out of training to calibrate "
            "matryoshka thresholds"
        ),
    )


class TrainConfig(Section):
    """SAE grid training (``sail train``)."""

    encoders: list[str] = Field(
        default_factory=list, description="empty: every embeddings/*.parquet"
    )
    variants: list[Literal["matryoshka", "sail"]] = Field(
        default_factory=lambda: ["matryoshka"],
        description="variant(s) for grid entries that name none",
    )
    grid: str | list[dict[str, Any]] = Field(
        "paper", description="demo, paper, a YAML file, or an inline list"
    )
    shard: str | None = Field(
        None, description="i/n: train only the i-th of n parts of the grid (0-based)"
    )
    embeddings: Path | None = Field(
        None, description="train on this table instead of the workspace's"
    )
    name: str | None = Field(
        None, description="encoder name for --embeddings (default: the file stem)"
    )
    group_by: str | None = Field(
        None, description="column of --embeddings grouping rows for the seeded split"
    )
    training: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the grid's training settings"
    )
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    decode: Literal["auto", "dense", "sparse"] = Field(
        "auto",
        description="auto: dense on GPU; on CPU sparse from d_in x latents >= 32768, dense below",
    )
    log_every: int = Field(50, ge=1, description="steps between metrics.csv rows")
    checkpoint_every: int = Field(
        1, ge=1, description="epochs between resumable train_state.pt saves"
    )
    recalibrate: bool = Field(
        False,
        description="recompute thresholds and final metrics of existing checkpoints; no training",
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="train every config once per seed: the first is the config's own model (ranked "
        "and interpreted), the others are replicates in <config>/seed-<n>/ that eval/stability.csv "
        "compares with it; default: the training seed only",
    )
    replicate_configs: list[str] = Field(
        default_factory=list,
        description="only these configs get the seed replicates ('variant/name' or 'name', the -h "
        "suffix optional, e.g. matryoshka/D_32_128_512_K_8_16_32); empty: every config",
    )

    @field_validator("training")
    @classmethod
    def _known_training_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainingSettings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown training setting(s) {unknown}; known: "
                f"{sorted(TrainingSettings.model_fields)}"
            )
        TrainingSettings.model_validate(value)
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"seeds {value} repeat a seed; each replicate needs its own")
        return value

    @model_validator(mode="after")
    def _one_primary_seed(self) -> TrainConfig:
        given = self.training.get("seed")
        if self.seeds and given is not None and given != self.seeds[0]:
            raise ValueError(
                f"training.seed {given} and seeds[0] {self.seeds[0]} disagree; the first of "
                "seeds is the seed of each config's own model"
            )
        return self


class ActivationsConfig(Section):
    """Sparse codes of every split (``sail activations``)."""

    encoders: list[str] = Field(
        default_factory=list, description="empty: every encoder with trained SAEs"
    )
    variants: list[Literal["matryoshka", "sail"]] = Field(
        default_factory=list, description="empty: all"
    )
    sae_config: str = Field("all", description="a config folder name (D_.._K_..) or all")
    splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: ["train", "valid", "test"]
    )
    batch_size: int = Field(8192, ge=1)
    device: str = "auto"
    embeddings: Path | None = Field(
        None, description="table the SAEs were trained on with --embeddings"
    )
    name: str | None = None
    group_by: str | None = None
    verify_checkpoints: bool = Field(
        True, description="check model.safetensors against the sha256 in its cfg.json"
    )


class ReportConfig(Section):
    """The static HTML feature browser (``sail report``): the configs interpretation selects
    (``interpret.sae_configs``; by default final_rank 1 per encoder and variant)."""

    max_features: int = Field(
        200, ge=1, description="feature pages per config (best by selection score)"
    )
    top_slices: int = Field(
        12, ge=1, description="top-activating slices per feature, one per volume"
    )
    thumb_size: int = Field(128, ge=16, le=1024)


class SailConfig(Section):
    workspace: Path = Path("sail-work")
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    interpret: InterpretConfig = Field(default_factory=InterpretConfig)
    figures: FiguresConfig = Field(default_factory=FiguresConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: config key '{key}': {msg}")
    return "\n".join(lines)


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a copy of ``base``; ``None`` values in updates are ignored."""
    out = dict(base)
    for key, value in updates.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = deep_update(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, error: type[SailError] = SailError) -> Any:
    """Parse a YAML file; a syntax error becomes ``error`` naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> SailConfig:
    """Read a YAML config (or the defaults) and apply CLI overrides (nested dicts)."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path, ConfigError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded
    raw = deep_update(raw, overrides or {})
    try:
        return SailConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def dump_config(cfg: SailConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
