"""``timm:NAME`` and ``hf:ID_OR_DIR`` encoders on tiny models built and saved here (no downloads):
a timm ViT and CNN, a transformers ViT and CNN. Embeddings are checked against the model's own
forward pass on the input its own preprocessing config describes."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sail.config import EncodeConfig
from sail.encoders.base import get_spec
from sail.encoders.encode import encode_job, make_job
from sail.encoders.table import read_embeddings
from sail.errors import SailError

TIMM_VIT = dict(img_size=48)  # test_vit: patch 16, 64-d, class token


@pytest.fixture(scope="module")
def timm_models(tmp_path_factory):
    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, **TIMM_VIT)
    save_for_hf(vit, root / "vit", model_args=TIMM_VIT)
    cnn = timm.create_model("test_resnet", pretrained=False)
    save_file(cnn.state_dict(), root / "resnet.safetensors")
    return root, vit.eval(), cnn.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
        resample=3,
    ).save_pretrained(root / "vit")
    cnn = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1], layer_type="basic")
    )
    cnn.save_pretrained(root / "resnet")
    ConvNextImageProcessor(
        size={"shortest_edge": 40},
        crop_pct=1.0,
        resample=2,
        image_mean=[0.45] * 3,
        image_std=[0.22] * 3,
    ).save_pretrained(root / "resnet")
    return root, vit.eval(), cnn.eval()


def _images(n=3, size=40, seed=0):
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    )


def _normalised(images, size, mean, std, mode):
    x = F.interpolate(
        images.float(), size=(size, size), mode=mode, antialias=True, align_corners=False
    )
    if mode == "bicubic":
        x = x.clamp(0, 255)
    return (x.expand(-1, 3, -1, -1) / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)


def test_timm_vit_from_a_save_for_hf_folder(timm_models):
    root, vit, _ = timm_models
    spec = get_spec("timm:test_vit")
    assert spec.table_name == "timm-test_vit" and spec.image_size_for(str(root / "vit")) == 48
    images = _images()
    x = _normalised(images, 48, (0.5,) * 3, (0.5,) * 3, "bicubic")
    with torch.no_grad():
        tokens = vit.forward_features(x)
    for pooling, expected in (
        ("auto", tokens[:, 0]),
        ("cls", tokens[:, 0]),
        ("mean", tokens[:, 1:].mean(1)),
        ("gem", tokens[:, 1:].clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)),
    ):
        enc = spec.build(weights=str(root / "vit"), image_size=48, pooling=pooling)
        assert (
            enc.dim == 64
            and enc.preprocess.interpolation == "bicubic"
            and enc.preprocess.mean == (0.5,) * 3
        )
        torch.testing.assert_close(enc.encode(images), expected, atol=1e-4, rtol=1e-4)
    assert enc.metadata()["pooling"] == "gem" and enc.metadata()["weights"].startswith("local:vit:")


def test_timm_cnn_from_a_weights_file(timm_models):
    root, _, cnn = timm_models
    enc = get_spec("timm:test_resnet").build(
        weights=str(root / "resnet.safetensors"), image_size=64
    )
    assert enc.dim == cnn.num_features == 96 and enc.pooling == "mean"
    images = _images()
    with torch.no_grad():
        expected = cnn.forward_features(
            _normalised(images, 64, (0.5,) * 3, (0.5,) * 3, "bilinear")
        ).mean((2, 3))
    torch.testing.assert_close(enc.encode(images), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(SailError, match="pooling 'cls' needs a model with a class token"):
        get_spec("timm:test_resnet").build(
            weights=str(root / "resnet.safetensors"), image_size=64, pooling="cls"
        )


def test_timm_errors_are_clear(timm_models, tmp_path):
    root, _, _ = timm_models
    with pytest.raises(SailError, match=r"holds a timm 'test_vit', not 'test_resnet'"):
        get_spec("timm:test_resnet").build(weights=str(root / "vit"), image_size=64)
    with pytest.raises(
        SailError, match="cannot load pretrained timm weights.*SAIL_ALLOW_DOWNLOADS"
    ):
        get_spec("timm:test_convnext").build(image_size=64)  # offline, nothing cached
    with pytest.raises(SailError, match="weights not found"):
        get_spec("timm:test_vit").build(weights=str(tmp_path / "nope"), image_size=48)
    with pytest.raises(SailError, match=r"cannot load .*resnet.safetensors into timm 'test_vit'"):
        get_spec("timm:test_vit").build(weights=str(root / "resnet.safetensors"), image_size=48)
    with pytest.raises(SailError, match="give a model after 'timm:'"):
        get_spec("timm:")


def test_hf_vit_and_cnn_from_save_pretrained_folders(hf_models):
    root, vit, cnn = hf_models
    spec = get_spec(f"hf:{root / 'vit'}")
    assert spec.table_name == "hf-vit" and spec.image_size_for(None) == 32
    images = _images(size=32)
    x = _normalised(images, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic")
    with torch.no_grad():
        tokens = vit(pixel_values=x).last_hidden_state
    enc = spec.build(image_size=32)
    assert enc.dim == 32 and enc.pooling == "cls" and enc.preprocess.std == (0.2, 0.25, 0.3)
    torch.testing.assert_close(enc.encode(images), tokens[:, 0], atol=1e-4, rtol=1e-4)
    enc = spec.build(image_size=32, pooling="mean")
    torch.testing.assert_close(enc.encode(images), tokens[:, 1:].mean(1), atol=1e-4, rtol=1e-4)

    spec = get_spec("hf:tiny-resnet")  # the name is a label; --weights says where the model is
    assert spec.image_size_for(str(root / "resnet")) == 40
    enc = spec.build(weights=str(root / "resnet"), image_size=40)
    assert (
        enc.dim == 24
        and enc.pooling == "mean"
        and enc.metadata()["architecture"]["model_type"] == "resnet"
    )
    assert enc.preprocess.interpolation == "bilinear" and enc.preprocess.image_size == 40
    with torch.no_grad():
        maps = cnn(
            pixel_values=_normalised(_images(), 40, (0.45,) * 3, (0.22,) * 3, "bilinear")
        ).last_hidden_state
    torch.testing.assert_close(enc.encode(_images()), maps.mean((2, 3)), atol=1e-4, rtol=1e-4)


def test_hf_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(
        SailError, match="not in the local Hugging Face cache.*SAIL_ALLOW_DOWNLOADS"
    ):
        get_spec("hf:nobody/no-such-model").build(image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SailError, match="not a loadable transformers model folder"):
        get_spec(f"hf:{tmp_path / 'empty'}").build(image_size=32)


def test_encode_stage_with_a_timm_model(tiny_ws, timm_models):
    root, _, _ = timm_models
    settings = EncodeConfig(device="cpu", workers=0, batch_size=4, chunk_size=4)
    job = make_job("timm:test_vit", settings, weights=str(root / "vit"), pooling="mean")
    assert (
        job.name == "timm-test_vit" and job.image_size == 48 and job.identity()["pooling"] == "mean"
    )
    table = read_embeddings(encode_job(tiny_ws, job))
    assert table.x_ND.shape == (10, 64) and np.isfinite(table.x_ND).all()
    assert table.metadata["encoder"] == "timm:test_vit" and table.metadata["pooling"] == "mean"
    with pytest.raises(SailError, match="--pooling applies to timm:/hf: encoders"):
        make_job("efficientnet-lite0", settings, pooling="gem")
    assert Path(tiny_ws.embeddings("timm-test_vit")).is_file()


def test_cli_encode_with_a_timm_name_and_pooling(tiny_ws, timm_models):
    from typer.testing import CliRunner

    from sail.cli import app

    root, _, _ = timm_models
    args = [
        "encode",
        "--encoder",
        "timm:test_vit",
        "--weights",
        str(root / "vit"),
        "--pooling",
        "gem",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--workspace",
        str(tiny_ws.root),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = read_embeddings(tiny_ws.embeddings("timm-test_vit"))
    assert table.metadata["pooling"] == "gem" and table.x_ND.shape == (10, 64)
    result = CliRunner().invoke(
        app, ["encode", "--pooling", "cls", "--workspace", str(tiny_ws.root)]
    )
    assert result.exit_code == 2 and "--pooling describe one encoder" in " ".join(
        result.output.split()
    )


def test_bf16_runs_under_autocast_and_stays_close_to_fp32(timm_models):
    root, _, _ = timm_models
    spec = get_spec("timm:test_resnet")
    images = _images()
    fp32 = (
        spec.build(weights=str(root / "resnet.safetensors"), image_size=64)
        .to("cpu", "fp32")
        .encode(images)
    )
    bf16 = spec.build(weights=str(root / "resnet.safetensors"), image_size=64).to("cpu", "bf16")
    out = bf16.encode(images)
    assert out.dtype == torch.float32 and bf16.metadata()["precision"] == "bf16"
    assert not torch.equal(out, fp32) and torch.allclose(out, fp32, atol=0.1, rtol=0.05)


def test_timm_channels_last_feature_maps_are_pooled_per_channel(tmp_path):
    import timm
    from timm.models import save_for_hf

    args = dict(depths=(1, 1), embed_dim=16, num_heads=(1, 1), img_size=32, window_size=4)
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()
    save_for_hf(swin, tmp_path / "swin", model_args=args)
    assert swin.output_fmt == "NHWC"  # (B, H, W, C) maps: pooling must average over H and W
    enc = get_spec("timm:swin_tiny_patch4_window7_224").build(
        weights=str(tmp_path / "swin"), image_size=32
    )
    images = _images(size=32)
    with torch.no_grad():
        maps = swin.forward_features(
            _normalised(images, 32, enc.preprocess.mean, enc.preprocess.std, "bicubic")
        )
    assert enc.pooling == "mean" and enc.dim == 32
    torch.testing.assert_close(enc.encode(images), maps.mean((1, 2)), atol=1e-4, rtol=1e-4)
