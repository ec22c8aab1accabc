"""Typed configuration for every pipeline stage.

One YAML file maps onto :class:`SailConfig`; each top-level key is one stage's section.
Unknown keys are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    source: Path | None = Field(None, description="folder holding CT_Dataset_v201/ and/or MRI_Dataset_v200/")
    modalities: list[Modality] = Field(default_factory=lambda: ["ct", "mri"])
    style: Literal["canonical", "published"] = "canonical"
    image_size: int = Field(224, ge=16, le=4096)
    slice_stride: int = Field(1, ge=1, description="keep every n-th slice along each plane")
    ct_spacing_mm: float = Field(1.5, gt=0, description="isotropic CT resampling (canonical style)")
    workers: int | None = Field(None, ge=1, description="worker processes; default: CPU count")
    max_scans: int | None = Field(None, ge=1, description="only the first n scans per modality (quick looks)")

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
    seed: int = 42


class SailConfig(Section):
    workspace: Path = Path("sail-work")
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)


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
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SailConfig:
    """Read a YAML config (or the defaults) and apply CLI overrides (nested dicts)."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
