"""One owner for stored files (sail.artifacts): names, the cfg.json / split.csv readers, and no
artifact filename spelled anywhere else in src/."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

import sail
from sail.artifacts import (
    REGISTERED,
    SPLITS,
    Workspace,
    read_cfg,
    read_descriptions,
    read_final_metrics,
    read_ranking,
    read_sae_cfg,
    read_split,
)
from sail.errors import SailError

SRC = Path(sail.__file__).parent
OWNER = SRC / "artifacts.py"


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants that are a registered file name or a path ending in one. Prose (help
    texts, messages with spaces) may mention a file for the reader; code must not build one."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            tail = value.replace("\\", "/").rsplit("/", 1)[-1]
            if value and not re.search(r"\s", value) and tail in REGISTERED:
                out.append((node.lineno, node.value))
    return out


def test_no_artifact_filename_literal_outside_the_owner_module():
    offenders = [
        f"{path.relative_to(SRC.parent)}:{line}: {value!r}"
        for path in sorted(SRC.rglob("*.py"))
        if path != OWNER
        for line, value in _literals(path)
    ]
    assert not offenders, "artifact names belong in sail/artifacts.py:\n" + "\n".join(offenders)


def test_the_scan_finds_a_literal_when_there_is_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Prose may name ranking.csv."""\n'
        'p = root / "ranking.csv"\nq = "sae/enc/cfg.json"\nr = "fine.csv"\n'
        's = f"{root}/data/split.csv"\n'
    )
    found = [v for _, v in sorted(_literals(bad))]
    assert found == ["ranking.csv", "sae/enc/cfg.json", "/data/split.csv"]


def test_the_registry_names_the_files_the_issue_lists():
    for name in ("ranking.csv", "cfg.json", "model.safetensors", "split.csv", "descriptions.csv"):
        assert name in REGISTERED
    assert SPLITS == ("train", "valid", "test")


def test_workspace_layout_is_unchanged_on_disk(tmp_path):
    """Resumed workspaces must still be recognised: the names are the ones earlier runs wrote."""
    ws = Workspace(tmp_path)
    rel = ws.relative
    assert rel(ws.split_csv) == "data/split.csv"
    assert rel(ws.slices_table) == "data/slices.parquet"
    assert rel(ws.embeddings("e")) == "embeddings/e.parquet"
    assert rel(ws.embedding_parts("e")) == "embeddings/e.parts"
    sae = ws.sae("e", "matryoshka", "D_8_K_2")
    assert rel(sae.cfg) == "sae/e/matryoshka/D_8_K_2/cfg.json"
    assert rel(sae.weights) == "sae/e/matryoshka/D_8_K_2/model.safetensors"
    assert rel(sae.metrics) == "sae/e/matryoshka/D_8_K_2/metrics.csv"
    assert rel(ws.activations("e", "v", "c", "valid")) == "activations/e/v/c/valid.parquet"
    assert rel(ws.eval.ranking) == "eval/ranking.csv"
    assert rel(ws.eval.table("probe_coefficients")) == "eval/probe_coefficients.parquet"
    assert rel(ws.eval.unit("e", "dense", None)) == "eval/units/e/dense"
    folder = ws.interpret("autointerp", "e", "v", "c")
    assert rel(folder.descriptions) == "interpret/autointerp/e/v/c/descriptions.csv"
    assert rel(ws.interpret("language", "e", "v", "c").metrics_csv).endswith("metrics.csv")
    assert rel(ws.report.index) == "report/index.html"


def _cfg(tmp_path: Path, **over) -> Path:
    cfg = {"schema_version": 1, "variant": "sail", "dict_sizes": [8, 32], "k_values": [2, 4]}
    cfg |= {"d_in": 16, "final_metrics": {"l0": 3.5}, "added_by_a_later_issue": [1]} | over
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def test_cfg_json_reader_types_fields_and_keeps_additive_keys(tmp_path):
    cfg = read_sae_cfg(_cfg(tmp_path))
    assert (cfg.variant, cfg.dict_sizes, cfg.k_values, cfg.d_in) == ("sail", [8, 32], [2, 4], 16)
    assert cfg.topk_mode == "per_level" and cfg.final_metrics == {"l0": 3.5}
    assert cfg.raw["added_by_a_later_issue"] == [1]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"schema_version": 2}, "newer than the 1.x"),
        ({"schema_version": "x"}, "not a version number"),
        ({"d_in": None, "variant": None}, None),
    ],
)
def test_cfg_json_reader_refuses_what_it_cannot_read(tmp_path, over, message):
    path = _cfg(tmp_path, **over)
    if message is None:  # a required key missing is named
        raw = json.loads((path / "cfg.json").read_text())
        del raw["d_in"]
        (path / "cfg.json").write_text(json.dumps(raw))
        message = r"missing key\(s\) \['d_in'\]"
    with pytest.raises(SailError, match=message):
        read_cfg(path)


def test_cfg_json_reader_names_bad_json_and_missing_file(tmp_path):
    with pytest.raises(SailError, match="not found"):
        read_cfg(tmp_path)
    (tmp_path / "cfg.json").write_text("{")
    with pytest.raises(SailError, match="cfg.json: not valid JSON"):
        read_cfg(tmp_path)


def test_split_reader_keeps_ids_as_text_and_names_bad_rows(tmp_path):
    path = tmp_path / "split.csv"
    pd.DataFrame(
        {"modality": ["ct", "mri"], "image_id": ["0012", "NA"], "split": ["train", "test"]}
    ).to_csv(path, index=False)
    split = read_split(path)
    assert split.image_id.tolist() == ["0012", "NA"]
    pd.DataFrame({"modality": ["ct"], "image_id": ["s1"], "split": ["val"]}).to_csv(
        path, index=False
    )
    with pytest.raises(SailError, match=r"split.csv: column 'split' has values \['val'\]"):
        read_split(path)
    pd.DataFrame(
        {"modality": ["ct", "ct"], "image_id": ["s1", "s1"], "split": ["train"] * 2}
    ).to_csv(path, index=False)
    with pytest.raises(SailError, match=r"volume \(ct, s1\) listed twice"):
        read_split(path)
    pd.DataFrame({"modality": ["ct"], "split": ["train"]}).to_csv(path, index=False)
    with pytest.raises(SailError, match=r"missing column\(s\) \['image_id'\]"):
        read_split(path)


def test_table_readers_treat_missing_and_empty_files_as_absent(tmp_path):
    assert read_ranking(tmp_path / "ranking.csv") is None
    (tmp_path / "ranking.csv").write_text("")
    assert read_ranking(tmp_path / "ranking.csv") is None
    (tmp_path / "ranking.csv").write_text("encoder,variant\n")
    with pytest.raises(SailError, match=r"ranking.csv: missing column\(s\)"):
        read_ranking(tmp_path / "ranking.csv")
    assert read_final_metrics(tmp_path / "metrics.csv") == {}
    assert read_descriptions(tmp_path / "descriptions.csv") == {}


def test_descriptions_reader_returns_the_stored_enrichment(tmp_path):
    path = tmp_path / "descriptions.csv"
    enrichment = {"n_top": 3, "n_volumes": 2, "modality": []}
    pd.DataFrame(
        [
            {
                "feature": 4,
                "description": "liver",
                "status": "ok",
                "enrichment": json.dumps(enrichment),
            },
            {"feature": 7, "description": None, "status": "failed", "enrichment": None},
        ]
    ).to_csv(path, index=False)
    got = read_descriptions(path)
    assert got[4].description == "liver" and got[4].enrichment == enrichment
    assert got[7].description == "" and got[7].enrichment is None and got[7].status == "failed"


def test_the_cli_has_one_error_boundary():
    """Issue 13: SailGroup (sail.cli_errors) turns errors into one line; no command catches
    SailError itself."""
    tree = ast.parse((SRC / "cli.py").read_text(encoding="utf-8"))
    caught = [
        handler.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Try)
        for handler in node.handlers
        if handler.type is not None and "SailError" in ast.unparse(handler.type)
    ]
    assert caught == []
