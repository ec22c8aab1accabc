"""BiomedParse backbone: checkpoint key mapping and the pooled output against an independent
forward.

The reference below is written from the published description of BiomedParse's FocalNet (tokens
channels-last, Linear layers, LayerNorm after modulation and after the MLP, layer-scale gammas,
modulator divided by focal_level + 1, ``norm3`` on the last stage, mean over tokens), and it reads
the published key layout directly, so it shares no code with the timm-based encoder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sail.encoders.biomedparse import FOCALNET_L, FocalNetArch, build_biomedparse, build_focalnet
from sail.errors import SailError

from .conftest import TINY_FOCALNET

ARCH = FocalNetArch(**TINY_FOCALNET)


def published_backbone(arch: FocalNetArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, non-trivial weights in BiomedParse's own ``backbone.*`` naming and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, c):
        return {f"{prefix}.weight": 1 + rand(c), f"{prefix}.bias": rand(c)}

    sd = {
        "patch_embed.proj.weight": rand(arch.embed_dim, 3, 7, 7),
        "patch_embed.proj.bias": rand(arch.embed_dim),
    }
    sd |= norm("patch_embed.norm", arch.embed_dim)
    n = len(arch.depths)
    for i, depth in enumerate(arch.depths):
        c, levels = arch.embed_dim * 2**i, arch.focal_levels[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            sd |= {
                f"{p}.modulation.f.weight": rand(2 * c + levels + 1, c),
                f"{p}.modulation.f.bias": rand(2 * c + levels + 1),
                f"{p}.modulation.h.weight": rand(c, c, 1, 1),
                f"{p}.modulation.h.bias": rand(c),
                f"{p}.modulation.proj.weight": rand(c, c),
                f"{p}.modulation.proj.bias": rand(c),
                f"{p}.mlp.fc1.weight": rand(4 * c, c),
                f"{p}.mlp.fc1.bias": rand(4 * c),
                f"{p}.mlp.fc2.weight": rand(c, 4 * c),
                f"{p}.mlp.fc2.bias": rand(c),
                f"{p}.gamma_1": 0.5 + rand(c),
                f"{p}.gamma_2": 0.5 + rand(c),
            }
            sd |= norm(f"{p}.norm1", c) | norm(f"{p}.norm2", c)
            for lvl in range(levels):
                k = 2 * lvl + arch.focal_windows[i]
                sd[f"{p}.modulation.focal_layers.{lvl}.0.weight"] = rand(c, 1, k, k)
        if i < n - 1:
            sd |= {
                f"layers.{i}.downsample.proj.weight": rand(2 * c, c, 3, 3),
                f"layers.{i}.downsample.proj.bias": rand(2 * c),
            }
            sd |= norm(f"layers.{i}.downsample.norm", 2 * c)
        sd |= norm(f"norm{i}", c)
    return sd


def reference_pooled(
    sd: dict[str, torch.Tensor], arch: FocalNetArch, x_B3HW: torch.Tensor
) -> torch.Tensor:
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)

    def embed(img, p, stride, pad):
        y = F.conv2d(img, sd[f"{p}.proj.weight"], sd[f"{p}.proj.bias"], stride=stride, padding=pad)
        return ln(y.flatten(2).transpose(1, 2), f"{p}.norm"), y.shape[2], y.shape[3]

    t, H, W = embed(x_B3HW, "patch_embed", 4, 2)
    B = x_B3HW.shape[0]
    last = len(arch.depths) - 1
    for i, depth in enumerate(arch.depths):
        L = arch.focal_levels[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            C = t.shape[-1]
            u = F.linear(
                t.view(B, H, W, C), sd[f"{p}.modulation.f.weight"], sd[f"{p}.modulation.f.bias"]
            ).permute(0, 3, 1, 2)
            q, ctx, gates = u[:, :C], u[:, C : 2 * C], u[:, 2 * C :]
            ctx_all = 0
            for lvl in range(L):
                k = 2 * lvl + arch.focal_windows[i]
                ctx = F.gelu(
                    F.conv2d(
                        ctx,
                        sd[f"{p}.modulation.focal_layers.{lvl}.0.weight"],
                        padding=k // 2,
                        groups=C,
                    )
                )
                ctx_all = ctx_all + ctx * gates[:, lvl : lvl + 1]
            ctx_all = ctx_all + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, L:]
            ctx_all = ctx_all / (L + 1)
            m = q * F.conv2d(ctx_all, sd[f"{p}.modulation.h.weight"], sd[f"{p}.modulation.h.bias"])
            m = F.linear(
                m.permute(0, 2, 3, 1),
                sd[f"{p}.modulation.proj.weight"],
                sd[f"{p}.modulation.proj.bias"],
            )
            t = t + sd[f"{p}.gamma_1"] * ln(m.reshape(B, H * W, C), f"{p}.norm1")
            mlp = F.linear(
                F.gelu(F.linear(t, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                sd[f"{p}.mlp.fc2.weight"],
                sd[f"{p}.mlp.fc2.bias"],
            )
            t = t + sd[f"{p}.gamma_2"] * ln(mlp, f"{p}.norm2")
        out = t
        if i < last:
            t, H, W = embed(t.transpose(1, 2).reshape(B, -1, H, W), f"layers.{i}.downsample", 2, 1)
    return ln(out, f"norm{last}").mean(dim=1)


def write_checkpoint(path, backbone: dict[str, torch.Tensor], wrap: str | None = None) -> None:
    sd = {f"backbone.{k}": v for k, v in backbone.items()}
    # The rest of the SEEM model is in the file too and must be ignored.
    sd["sem_seg_head.predictor.class_embed"] = torch.zeros(3, 4)
    sd["lang_encoder.token_embedding.weight"] = torch.zeros(5, 4)
    torch.save({wrap: sd} if wrap else sd, path)


def test_published_checkpoint_maps_strictly_and_pooled_output_matches_reference(tmp_path):
    backbone = published_backbone(ARCH)
    ckpt = tmp_path / "biomedparse_v1.pt"
    write_checkpoint(ckpt, backbone)
    encoder = build_biomedparse(weights=str(ckpt), image_size=64, arch=ARCH)
    assert encoder.dim == ARCH.dim == 64 and encoder.name == "biomedparse"
    x = torch.randint(0, 256, (3, 1, 48, 48), dtype=torch.uint8)
    got = encoder.encode(x)
    want = reference_pooled(backbone, ARCH, encoder.preprocess(x))
    assert got.shape == (3, ARCH.dim)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # A folder holding biomedparse_v1.pt and a {"model": ...}-wrapped file load the same weights.
    wrapped = tmp_path / "wrapped" / "biomedparse_v1.pt"
    wrapped.parent.mkdir()
    write_checkpoint(wrapped, backbone, wrap="model")
    again = build_biomedparse(weights=str(wrapped.parent), image_size=64, arch=ARCH)
    torch.testing.assert_close(again.encode(x), got)


def test_every_backbone_key_is_needed(tmp_path):
    backbone = published_backbone(ARCH)
    dropped = dict(backbone)
    del dropped["layers.2.blocks.1.modulation.focal_layers.2.0.weight"]
    ckpt = tmp_path / "missing.pt"
    write_checkpoint(ckpt, dropped)
    with pytest.raises(
        SailError,
        match=(
            "1 model tensors without a checkpoint key"
            ".*layers.2.blocks.1.modulation.focal_layers.2.0.weight"
        ),
    ):
        build_biomedparse(weights=str(ckpt), image_size=64, arch=ARCH)

    extra = dict(backbone, **{"layers.0.blocks.0.modulation.ln.weight": torch.ones(8)})
    write_checkpoint(ckpt, extra)
    with pytest.raises(
        SailError,
        match="1 unexpected backbone keys.*backbone.layers.0.blocks.0.modulation.ln.weight",
    ):
        build_biomedparse(weights=str(ckpt), image_size=64, arch=ARCH)

    bad_shape = dict(backbone, **{"layers.0.blocks.0.mlp.fc1.weight": torch.ones(31, 8)})
    write_checkpoint(ckpt, bad_shape)
    with pytest.raises(SailError, match="wrong shape.*backbone.layers.0.blocks.0.mlp.fc1.weight"):
        build_biomedparse(weights=str(ckpt), image_size=64, arch=ARCH)

    torch.save({"sem_seg_head.x": torch.zeros(1)}, ckpt)
    with pytest.raises(SailError, match="no 'backbone.\\*' keys"):
        build_biomedparse(weights=str(ckpt), image_size=64, arch=ARCH)


def test_hub_weights_offline_say_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(SailError) as err:
        build_biomedparse(weights=None, image_size=64, arch=ARCH)
    msg = str(err.value)
    assert (
        "microsoft/BiomedParse" in msg
        and "gated" in msg
        and "hf download microsoft/BiomedParse biomedparse_v1.pt" in msg
    )
    assert "--weights" in msg


@pytest.mark.slow
def test_full_size_matches_timm_focalnet_large_fl4():
    import timm

    ours = build_focalnet(FOCALNET_L)
    ref = timm.create_model("focalnet_large_fl4", normalize_modulator=True, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(205.7e6, rel=0.01)
    backbone = published_backbone(FOCALNET_L)
    from sail.encoders.biomedparse import remap_backbone

    ours.load_state_dict(remap_backbone(backbone, ours), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours.forward_features(x).mean((2, 3)), reference_pooled(backbone, FOCALNET_L, x)
    # 24 blocks of non-trivial random weights: fp32 reassociation grows to ~1e-5 relative.
    assert ((got - want).norm() / want.norm()).item() < 1e-4
