"""`sail run` end to end on a manifest cohort without segmentations (metadata probes only), encoded
with a tiny timm ViT built and saved here: prepare -> split -> encode -> train -> activations ->
evaluate -> interpret -> figures -> report, through the console script (CPU, offline)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from sail.config import PhantomConfig
from sail.data.phantom import write_phantom_dataset

CONFIG = """
workspace: {ws}
prepare: {{source: {manifest}, image_size: 32, ct_spacing_mm: 8.0, slice_stride: 3, workers: 1}}
split: {{train_fraction: 0.6}}
encode:
  encoders: [{{encoder: "timm:test_vit", weights: {weights}, pooling: mean}}]
  workers: 0
train:
  grid: [{{variant: matryoshka, dict_sizes: [16, 32], k_values: [4, 8]}}]
  training: {{epochs: 4, batch_size: 64}}
evaluate:
  extra_tasks: [diagnosis]
  probe: {{max_iter: 50, train_samples: 500}}
  recovery: {{max_iter: 50, n_features: [1, 2, 5]}}
  monosemanticity: {{top_n: [2, 3]}}
  concepts: {{bootstrap: 0}}
interpret:
  fingerprint: {{n_references: 20, k_values: [1, 5]}}
  autointerp: {{n_features: 4, n_candidates: 4, n_images: 2, min_active: 1}}
  language: {{published_queries: false, queries: [{{name: ct, text: CT}}]}}
figures: {{formats: [png]}}
report: {{max_features: 5}}
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """20 phantom volumes as a manifest: relative paths, no masks, sex/age, a free 'diagnosis'
    column, two volumes per patient group, no institute column (so the test split is drawn)."""
    import timm
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("cohort")
    write_phantom_dataset(root / "ts", PhantomConfig(n_ct=14, n_mri=6, size=24, seed=3))
    rows = []
    for folder, modality, image in (
        ("CT_Dataset_v201", "CT", "ct.nii.gz"),
        ("MRI_Dataset_v200", "MR", "mri.nii.gz"),
    ):
        meta = pd.read_csv(
            root / "ts" / folder / "meta.csv", sep=";", encoding="utf-8-sig", dtype=str
        )
        for m in meta.itertuples():
            rows.append(
                {
                    "image": f"ts/{folder}/{m.image_id}/{image}",
                    "image_id": f"{modality.lower()}{m.image_id}",
                    "modality": modality,
                    "sex": m.gender,
                    "age": m.age,
                    "diagnosis": "lesion" if modality == "MR" or len(rows) % 5 == 0 else "normal",
                    "group": f"p{len(rows) // 2}",
                }
            )
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    save_for_hf(model, root / "vit", model_args={"img_size": 32})
    return root


def test_sail_run_on_a_manifest_with_a_timm_encoder(cohort, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        CONFIG.format(ws=tmp_path / "w", manifest=cohort / "cohort.csv", weights=cohort / "vit")
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run(
        [sys.executable, "-m", "sail", "run", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ws = tmp_path / "w"
    slices = pd.read_parquet(ws / "data" / "slices.parquet")
    assert {"diagnosis", "group"} <= set(slices.columns) and not any(
        c.startswith("has_") for c in slices.columns
    )
    split = pd.read_csv(ws / "data" / "split.csv").merge(
        slices[["modality", "image_id", "group"]].drop_duplicates()
    )
    assert set(split.split) == {
        "train",
        "valid",
        "test",
    }  # no institutes: a seeded grouped test split
    assert (split.groupby("group").split.nunique() == 1).all()
    emb = pd.read_parquet(ws / "embeddings" / "timm-test_vit.parquet")
    assert len(emb) == len(slices) and len(emb.embedding.iloc[0]) == 64
    probes = pd.read_csv(ws / "eval" / "probes.csv")
    assert {"diagnosis", "sex", "modality"} <= set(probes.task)
    assert set(probes[probes.task == "diagnosis"].target) == {"lesion", "normal"}
    assert (ws / "report" / "index.html").is_file()
    assert list((ws / "report" / "thumbs").glob("*.png"))
    pages = "".join(p.read_text() for p in (ws / "report" / "features").rglob("f*.html"))
    assert "diagnosis=" in pages  # a probe-target column is enriched on the feature pages
    assert ">group=" not in pages  # the patient key is not
