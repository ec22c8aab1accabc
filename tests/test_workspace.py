"""Stage manifests: a changed artifact semantics version makes a finished stage rerun."""

from __future__ import annotations

import json

from sail.workspace import SEMANTICS, StageRecord, is_done, manifest_path, mark_done


def test_a_manifest_from_older_semantics_is_not_done(tmp_path):
    artifact = tmp_path / "model.safetensors"
    artifact.write_bytes(b"weights")
    record = StageRecord("train", "abc", {"embeddings": "sha256:1"})
    mark_done(artifact, record)
    assert is_done(artifact, record)
    assert json.loads(manifest_path(artifact).read_text())["semantics"] == SEMANTICS["train"] >= 2
    old = json.loads(manifest_path(artifact).read_text())
    old.pop("semantics")  # what SAIL wrote before artifact semantics existed
    manifest_path(artifact).write_text(json.dumps(old))
    assert not is_done(artifact, record)
    assert is_done(artifact, record, ignore_semantics=True)
    assert StageRecord("evaluate/sae", "x", {}).semantics == SEMANTICS["evaluate"]
    assert StageRecord("interpret.language", "x", {}).semantics == SEMANTICS["interpret"]
