"""Checkpoint round trip and import of the published Lightning checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sail.errors import SailError
from sail.sae.checkpoint import import_published, load_stack, save_sae
from sail.sae.model import SAESpec, StackedSAE


@pytest.mark.parametrize(
    "spec",
    [
        SAESpec("sail", (4, 8), (2, 3)),
        SAESpec("matryoshka", (4, 8), (2, 3)),
        SAESpec("matryoshka", (4, 8), (3,), "global"),
    ],
)
def test_save_load_is_bit_exact(tmp_path, spec):
    model = StackedSAE(
        [SAESpec(spec.variant, spec.dict_sizes, (1,) * len(spec.k_values), spec.topk_mode), spec], 6
    )
    model.initialize([1, 2])
    x = torch.nn.functional.normalize(
        torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), dim=1
    )
    with torch.no_grad():
        model.b_enc.normal_(generator=torch.Generator().manual_seed(3))
    if spec.variant == "sail":
        model.forward_train(x)
    else:
        model.calibrate(x)
    save_sae(tmp_path / "sae", model, 1, "name", {"encoder": "toy"})
    loaded, cfg = load_stack(tmp_path / "sae")
    for key, value in model.model_state(1).items():
        assert torch.equal(loaded.model_state(0)[key], value), key
    assert torch.equal(loaded.inference_codes(x)[0], model.inference_codes(x)[1])
    assert cfg["variant"] == spec.variant and cfg["k_values"] == list(spec.k_values)
    assert (
        cfg["schema_version"] == 1
        and cfg["input_normalization"] == "l2"
        and cfg["encoder"] == "toy"
    )
    assert (tmp_path / "sae" / "metrics.csv").read_text().startswith("step,epoch,split,level,fvu")


def _published_ckpt(tmp_path, d=6, sizes=(4, 8), ks=(2, 3)):
    g = torch.Generator().manual_seed(0)
    D = sizes[-1]
    state = {
        "model.encoder.weight": torch.randn(D, d, generator=g),
        "model.encoder.bias": torch.randn(D, generator=g) * 0.1,
        "model.bias": torch.randn(d, generator=g) * 0.1,
        "model.inference_threshold": torch.tensor(0.25),
        "model._threshold_sum": torch.tensor(25.0),
        "model._threshold_count": torch.tensor(100),
    }
    ckpt = {
        "epoch": 99,
        "global_step": 39100,
        "pytorch-lightning_version": "2.5.5",
        "state_dict": state,
        "hyper_parameters": {
            "input_dim": d,
            "dictionary_sizes": list(sizes),
            "tied_weights": True,
            "normalize_decoder": True,
            "l1_coefficient": 0.0,
            "diversity_coefficient": 0.0,
            "learning_rate": 1e-4,
            "k_values": list(ks),
            "correlation_sample_batches": 20,
        },
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    hp = tmp_path / "hparams.yaml"
    hp.write_text(
        f"{{input_dim: {d}, dictionary_sizes: {list(sizes)}, k_values: {list(ks)}, "
        "train_parquet: data/x_train.parquet, val_parquet: data/x_valid.parquet}\n"
    )
    return path, hp, state


def test_import_published_checkpoint_reproduces_its_inference(tmp_path):
    ckpt, hp, state = _published_ckpt(tmp_path)
    out = import_published(ckpt, hp, tmp_path / "sae", "biomedparse")
    assert out == tmp_path / "sae" / "biomedparse" / "sail" / "D_4_8_K_2_3"
    assert set(load_file(str(out / "model.safetensors"))) == {
        "W",
        "b_enc",
        "b_dec",
        "theta_sum",
        "theta_count",
    }
    model, cfg = load_stack(out)
    assert cfg["inference"]["theta"] == pytest.approx(0.25)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1)) * 3
    xn = x / x.norm(dim=1, keepdim=True)
    W, b_enc, b_dec = (
        state["model.encoder.weight"],
        state["model.encoder.bias"],
        state["model.bias"],
    )
    expected = torch.relu((xn - b_dec) @ W.T + b_enc - 0.25)  # published closed form (spec §1.6)
    torch.testing.assert_close(model.inference_codes(xn)[0], expected)
    assert (
        json.loads((out / "cfg.json").read_text())["imported_from"]["hparams_content"]["input_dim"]
        == 6
    )


def test_import_names_missing_keys_and_shape_mismatch(tmp_path):
    ckpt, hp, state = _published_ckpt(tmp_path)
    bad = torch.load(ckpt, weights_only=True)
    del bad["state_dict"]["model.bias"]
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(SailError, match="model.bias"):
        import_published(tmp_path / "bad.ckpt", hp, tmp_path / "sae", "x")
    hp.write_text("{input_dim: 7, dictionary_sizes: [4, 8], k_values: [2, 3]}\n")
    with pytest.raises(SailError, match="input_dim 7"):
        import_published(ckpt, hp, tmp_path / "sae", "x")
