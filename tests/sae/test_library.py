"""The SAE as a library: sail.load_sae / sail.SAE, a test-only variant through every stage,
the SAELens / Hugging Face export, cfg.json's schema policy and the trainer's named steps."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn
from typer.testing import CliRunner

import sail
from sail.cli import app
from sail.config import TrainingSettings, load_config
from sail.encoders.table import read_embeddings, write_embeddings
from sail.errors import SailError
from sail.sae.activations import run_activations
from sail.sae.activations_io import read_activations
from sail.sae.checkpoint import read_cfg, save_sae
from sail.sae.export import export_sae_folder
from sail.sae.grid import GridEntry
from sail.sae.model import SaeLensWeights, SAESpec, StackedSAE, register_variant
from sail.sae.train import (
    Meter,
    Runtime,
    calibrate_step,
    checkpoint_step,
    plan_family,
    resume_step,
    run_epoch,
    run_train,
    start_run,
    train_family,
    train_step,
    validate_step,
)
from sail.workspace import Workspace
from tests.sae.conftest import planted, slice_ids

CPU = Runtime(torch.device("cpu"), "fp32", "sparse", log_every=5, show_progress=False)
TRAINING = {"epochs": 2, "batch_size": 64, "lr": 3e-3}
GRID = [
    {"variant": "sail", "dict_sizes": [8, 32], "k_values": [2, 4]},
    {"variant": "matryoshka", "dict_sizes": [8, 32], "k_values": [2, 4]},
    {"variant": "matryoshka", "topk_mode": "global", "dict_sizes": [8, 32], "k_values": [4]},
]


# ----- a test-only variant: one class and one registry line ---------------------------------------
@register_variant
class ToyReluSAE(StackedSAE):
    """Untied ReLU SAE trained with BatchTopK whose stored code is the plain ReLU."""

    variant = "toy_relu"
    state_names = ("W_enc", "b_enc", "W_dec", "b_dec")

    def init_parameters(self, M: int, F: int, D: int, L: int) -> None:
        self.W_enc = nn.Parameter(torch.zeros(M, F, D))
        self.W_dec = nn.Parameter(torch.zeros(M, F, D))

    @property
    def W_encoder(self) -> Tensor:
        return self.W_enc

    @property
    def W_decoder(self) -> Tensor:
        return self.W_dec

    @torch.no_grad()
    def initialize(self, seeds, x_sample_ND=None, b_dec_init="zeros") -> None:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        W = torch.stack([torch.randn(self.n_latents, self.d_in, generator=g) for g in gens])
        self.W_enc.copy_(W / W.norm(dim=-1, keepdim=True))
        self.W_dec.copy_(self.W_enc)

    @torch.no_grad()
    def inference_codes(self, x_BD: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x_BD))

    def inference_summary(self, m: int) -> dict:
        return {"kind": "relu"}

    def saelens_weights(self, m: int) -> SaeLensWeights:
        return SaeLensWeights(
            "standard",
            self.W_enc[m].detach().T.contiguous(),
            self.b_enc[m].detach().clone(),
            self.W_dec[m].detach().clone(),
            self.b_dec[m].detach().clone(),
        )


def saelens_encode(folder: Path, x_raw: np.ndarray) -> np.ndarray:
    """SAELens' documented encode for standard/jumprelu with constant_norm_rescale, written from
    its cfg.json and tensor names (the real package is checked by the `saelens` test)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = torch.from_numpy(x_raw).double()
    assert cfg["normalize_activations"] == "constant_norm_rescale"
    x = x * math.sqrt(cfg["d_in"]) / x.norm(dim=-1, keepdim=True)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    acts = torch.relu(pre)
    if cfg["architecture"] == "jumprelu":
        acts = acts * (pre > t["threshold"])
    return acts.numpy()


def test_a_new_variant_trains_saves_loads_encodes_and_exports(tmp_path):
    x, _ = planted(600, 12, 24, 3, seed=2)
    raw = (x * 3 + 0.5).numpy()
    spec = SAESpec("toy_relu", (8, 24), (2, 4))
    entry = GridEntry(spec, TrainingSettings(**TRAINING))
    xn = torch.nn.functional.normalize(torch.from_numpy(raw), dim=1)
    result = train_family([entry], xn[:500], xn[500:], [tmp_path / "run"], CPU)
    assert isinstance(result.model, ToyReluSAE) and result.calibration is None
    assert isinstance(copy.deepcopy(result.model), ToyReluSAE)
    assert result.metrics[0]["fvu"].iloc[-1] < 1
    sae_dir = save_sae(tmp_path / "toy", result.model, 0, entry.name, {}, result.metrics[0])
    sae = sail.load_sae(sae_dir)
    assert sae.variant == "toy_relu" and read_cfg(sae_dir)["inference"] == {"kind": "relu"}
    codes = sae.encode(raw[500:]).numpy()
    assert (codes > 0).any()
    np.testing.assert_array_equal(codes, result.model.inference_codes(xn[500:])[0].numpy())
    out = export_sae_folder(sae_dir, tmp_path / "toy-saelens", "saelens")
    np.testing.assert_allclose(saelens_encode(out, raw[500:]), codes, atol=2e-5)


# ----- sail.load_sae / sail.SAE -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with one SAE per variant and top-k mode, trained and exported as activations."""
    tmp = tmp_path_factory.mktemp("lib")
    torch.set_num_threads(1)
    x, _ = planted(400, 24, 32, 3, seed=3)
    ids = slice_ids(400)
    ws = Workspace(tmp / "ws").ensure()
    ws.embeddings("toy").parent.mkdir(parents=True)
    write_embeddings(ws.embeddings("toy"), ids, x.numpy() * 5 + 1.0)
    vols = pd.Series(sorted(ids)).str.split("/", expand=True)[[0, 1]].drop_duplicates()
    split = np.array(["train", "train", "train", "valid", "test"] * 4)[: len(vols)]
    ws.data_dir.mkdir()
    pd.DataFrame({"modality": vols[0], "image_id": vols[1], "split": split}).to_csv(
        ws.split_csv, index=False
    )
    cfg = load_config(
        None,
        {
            "workspace": ws.root,
            "train": {"grid": GRID, "variants": ["matryoshka", "sail"], "training": TRAINING},
            "activations": {"splits": ["valid"]},
        },
    )
    run_train(cfg, ws)
    run_activations(cfg, ws)
    return ws


def sae_dirs(ws: Workspace) -> list[Path]:
    return sorted(p.parent for p in (ws.root / "sae" / "toy").glob("*/*/cfg.json"))


def valid_rows(ws: Workspace, sae_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw embeddings of the stored valid activations' rows, and the stored codes (dense)."""
    ids, csr, _ = read_activations(
        ws.activations("toy", sae_dir.parent.name, sae_dir.name, "valid")
    )
    table = read_embeddings(ws.embeddings("toy"))
    pos = pd.Series(np.arange(len(table.slice_ids)), index=table.slice_ids)[list(ids)].to_numpy()
    return table.x_ND[pos], csr.toarray(), ids


def test_load_sae_encode_of_raw_embeddings_equals_the_stored_activations(trained):
    dirs = sae_dirs(trained)
    kinds = {(read_cfg(d)["variant"], read_cfg(d)["topk_mode"]) for d in dirs}
    assert kinds == {("sail", "per_level"), ("matryoshka", "per_level"), ("matryoshka", "global")}
    for sae_dir in dirs:
        sae = sail.load_sae(sae_dir)
        raw, stored, _ = valid_rows(trained, sae_dir)
        assert stored.any()
        np.testing.assert_array_equal(sae.encode(raw).numpy(), stored)  # numpy in
        np.testing.assert_array_equal(sae.encode(torch.from_numpy(raw)).numpy(), stored)
        assert sae.W_dec.shape == (sae.d_sae, sae.d_in) == (32, 24)
        assert sae.cfg["input_normalization"] == "l2"
        # the SAE normalises its own input: pre-normalised rows give the same codes
        torch.testing.assert_close(sae.encode(raw / 7.0), sae.encode(raw))
        recon = sae.forward(raw)
        assert recon.shape == raw.shape
        direct = sae.decode(sae.encode(raw)) * torch.from_numpy(raw).norm(dim=1, keepdim=True)
        torch.testing.assert_close(recon, direct)


def test_import_sail_stays_light():
    code = "import sail, sys; print('pydantic' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----- export -------------------------------------------------------------------------------------
def test_saelens_export_encodes_raw_embeddings_like_sail(trained, tmp_path):
    for sae_dir in sae_dirs(trained):
        raw, stored, _ = valid_rows(trained, sae_dir)
        out = export_sae_folder(sae_dir, tmp_path / sae_dir.parent.name / sae_dir.name, "saelens")
        cfg = json.loads((out / "cfg.json").read_text())
        tensors = load_file(str(out / "sae_weights.safetensors"))
        arch = "standard" if sae_dir.parent.name == "sail" else "jumprelu"
        assert (
            cfg["architecture"] == arch and cfg["normalize_activations"] == "constant_norm_rescale"
        )
        want = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
            {"threshold"} if arch == "jumprelu" else set()
        )
        assert set(tensors) == want and tensors["W_enc"].shape == (24, 32)
        codes = saelens_encode(out, raw)
        np.testing.assert_allclose(codes, stored, atol=2e-5)
        assert ((codes > 1e-4) == (stored > 1e-4)).mean() > 0.999


def test_hf_export_is_an_upload_ready_folder_with_a_model_card(trained, tmp_path):
    sae_dir = next(d for d in sae_dirs(trained) if d.parent.name == "matryoshka")
    result = CliRunner().invoke(
        app, ["export-sae", str(sae_dir), str(tmp_path / "hf"), "--format", "hf"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {
        "README.md",
        "model.safetensors",
        "cfg.json",
        "metrics.csv",
        "saelens",
    }
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sail" and "sparse-autoencoder" in front["tags"]
    assert front["training_data"]["encoder"] == "toy"
    final = read_cfg(sae_dir)["final_metrics"]
    assert front["sail"]["final_metrics"]["fvu"] == final["fvu"]
    results = front["model-index"][0]["results"][0]
    fvu = next(m for m in results["metrics"] if m["type"] == "fvu")
    assert fvu["value"] == pytest.approx(final["fvu"][-1]) and results["task"]["type"]
    from huggingface_hub import ModelCard  # the Hub's own parser of the front matter

    hub = ModelCard.load(out / "README.md").data
    assert hub.library_name == "sail" and hub.eval_results[0].metric_type == "fvu"
    assert sail.load_sae(out).encode(valid_rows(trained, sae_dir)[0]).shape[1] == 32
    bad = CliRunner().invoke(
        app, ["export-sae", str(sae_dir), str(tmp_path / "x"), "--format", "onnx"]
    )
    assert bad.exit_code != 0 and "onnx" in bad.output


@pytest.mark.saelens
def test_real_saelens_loads_the_export_and_encodes_raw_embeddings_like_sail(trained, tmp_path):
    """Runs sae-lens itself: in this interpreter when installed, else in SAIL_SAELENS_PYTHON."""
    python = os.environ.get("SAIL_SAELENS_PYTHON", sys.executable)
    cases = []
    for sae_dir in sae_dirs(trained):
        raw, stored, _ = valid_rows(trained, sae_dir)
        out = export_sae_folder(sae_dir, tmp_path / sae_dir.parent.name / sae_dir.name, "saelens")
        np.save(out / "raw.npy", raw)
        np.save(out / "stored.npy", stored)
        np.save(out / "recon.npy", sail.load_sae(sae_dir).forward(raw).numpy())
        cases.append(str(out))
    script = (
        "import sys, numpy as np, torch\n"
        "from sae_lens import SAE\n"
        "for folder in sys.argv[1:]:\n"
        "    sae = SAE.load_from_disk(folder)\n"
        "    raw = torch.from_numpy(np.load(folder + '/raw.npy'))\n"
        "    got = sae.encode(raw).detach().numpy()\n"
        "    np.testing.assert_allclose(got, np.load(folder + '/stored.npy'), atol=2e-5)\n"
        "    recon = sae.decode(sae.encode(raw)).detach().numpy()  # raw units, like SAE.forward\n"
        "    np.testing.assert_allclose(recon, np.load(folder + '/recon.npy'), atol=1e-4)\n"
        "    print(folder, type(sae).__name__, 'ok')\n"
    )
    t = time.perf_counter()
    run = subprocess.run([python, "-c", script, *cases], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok") == 3
    print(f"sae-lens check: {time.perf_counter() - t:.1f}s\n{run.stdout}")


# ----- cfg.json schema policy ---------------------------------------------------------------------
def test_cfg_json_readers_accept_new_keys_and_refuse_only_a_newer_major(trained, tmp_path):
    src = sae_dirs(trained)[0]
    dst = tmp_path / "sae"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    (dst / "cfg.json").write_text(
        json.dumps({**cfg, "schema_version": "1.7", "added_by_a_later_sail": {"x": 1}})
    )
    assert sail.load_sae(dst).encode(valid_rows(trained, src)[0]).shape[1] == 32
    (dst / "cfg.json").write_text(json.dumps({**cfg, "schema_version": 2}))
    with pytest.raises(SailError, match=r"cfg\.json: written with cfg\.json schema 2, newer"):
        sail.load_sae(dst)
    (dst / "cfg.json").write_text(json.dumps({**cfg, "schema_version": "two"}))
    with pytest.raises(SailError, match=r"cfg\.json: schema_version 'two' is not a version"):
        read_cfg(dst)
    (dst / "cfg.json").write_text(json.dumps({**cfg, "variant": "nonesuch"}))
    with pytest.raises(SailError, match=r"cfg\.json: .*variant 'nonesuch' is not one of"):
        sail.load_sae(dst)


# ----- trainer steps ------------------------------------------------------------------------------
def family(**settings):
    specs = [SAESpec("matryoshka", (8, 32), k) for k in ((2, 4), (3, 6))]
    st = TrainingSettings(**{**TRAINING, "dead_window": 64, **settings})
    return [GridEntry(s, st) for s in specs]


def test_train_step_moves_every_member_and_counts_rows_since_fired():
    x, _ = planted(256, 16, 24, 3, seed=4)
    plan = plan_family(family(), x)
    assert (plan.batch_size, plan.steps_per_epoch, plan.total_steps) == (64, 4, 8)
    assert plan.auxk_alpha > 0 and plan.auxk_k == 8
    run = start_run(plan, x)
    before = {k: v.clone() for k, v in run.model.model_state(1).items()}
    out = train_step(run, plan, x[:64], 64, CPU)
    assert run.step == 1 and out.loss.item() > 0
    assert not torch.equal(run.model.model_state(1)["W_enc"], before["W_enc"])
    never = ~out.fired_MF
    assert (run.since_fired[never] == 64).all() and (run.since_fired[out.fired_MF] == 0).all()
    meter = Meter(2, 2, 16, x.device)
    meter.add(x[:64], out.sse_LM, out.l0_LM, out.auxk_M)
    assert (meter.summary()["l0"][1] <= torch.tensor([4, 6]).numpy() + 1e-9).all()


def test_checkpoint_and_resume_steps_restore_the_run(tmp_path):
    x, _ = planted(256, 16, 24, 3, seed=4)
    dirs = [tmp_path / "a", tmp_path / "b"]
    plan = plan_family(family(epochs=2), x)
    assert not resume_step(start_run(plan, x), plan, dirs)  # nothing saved yet
    run = start_run(plan, x)
    run_epoch(run, plan, x, CPU, Meter(2, 2, 16, x.device), lambda step: None)
    validate_step(run, plan, x[:32], Meter(2, 2, 16, x.device))
    run.epoch += 1
    assert checkpoint_step(run, plan, dirs, CPU)
    resumed = start_run(plan, x)
    assert resume_step(resumed, plan, dirs) and (resumed.step, resumed.epoch) == (4, 1)
    for m in range(2):
        for name, value in run.model.model_state(m).items():
            assert torch.equal(resumed.model.model_state(m)[name].nan_to_num(), value.nan_to_num())
    assert torch.equal(resumed.since_fired, run.since_fired)
    assert all(
        pd.DataFrame(a).equals(pd.DataFrame(b)) for a, b in zip(resumed.rows, run.rows, strict=True)
    )
    run.epoch = 2  # the last epoch writes no state (the checkpoint folder gets the final model)
    assert not checkpoint_step(run, plan, dirs, CPU)


def test_calibrate_step_sets_thresholds_only_for_variants_that_calibrate(caplog):
    x, _ = planted(256, 16, 24, 3, seed=4)
    for variant, calibrates in (("matryoshka", True), ("sail", False)):
        entries = [GridEntry(SAESpec(variant, (8, 32), (2, 4)), TrainingSettings(**TRAINING))]
        plan = plan_family(entries, x)
        run = start_run(plan, x)
        found = calibrate_step(run.model, plan.names, x[:64], x, plan.batch_size)
        assert (found is not None) == calibrates
        if calibrates:
            assert found[0]["held_out"] and found[0]["rows"] == 64
            assert bool(run.model.calibrated.all())
    caplog.set_level("WARNING")
    found = calibrate_step(run.model, plan.names, None, x, plan.batch_size)
    assert found is None  # sail: nothing to calibrate, no warning
    model = start_run(plan_family(family(), x), x).model
    assert not calibrate_step(model, ["a", "b"], None, x, 64)[0]["held_out"]
    assert "calibrating thresholds on the rows the SAE was trained on" in caplog.text
