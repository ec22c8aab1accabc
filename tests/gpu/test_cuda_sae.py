"""CUDA checks of the SAE trainer (``pytest -m gpu``; ``benchmarks/device/run.sh`` runs them).

Without CUDA they skip, unless ``SAIL_GPU_TESTS_ON_CPU=1`` (the device script's CPU rehearsal)
runs the same code on the CPU so a broken path shows before a GPU is spent on it.
Written against the public model API only (``initialize``, ``forward_train``,
``pre_activations``, ``activations``, ``train_selections``, ``train_family``).
"""

from __future__ import annotations

import os

import pytest
import torch

from sail.sae.model import SAESpec, StackedSAE

pytestmark = pytest.mark.gpu

DICT = (32, 128, 512)
D_IN = 64
CASES = [  # (variant, topk_mode, K of the first stacked model; the second doubles it)
    ("sail", "per_level", (4, 8, 16)),
    ("matryoshka", "per_level", (4, 8, 16)),
    ("matryoshka", "global", (16,)),
]


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("SAIL_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA (SAIL_GPU_TESTS_ON_CPU=1 rehearses these on the CPU)")


def offset_embeddings(n: int, d: int, offset_scale: float, seed: int = 0) -> torch.Tensor:
    """Unit-norm rows sharing a large common direction, like real foundation-model embeddings."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=g)
    return torch.nn.functional.normalize(
        torch.randn(n, d, generator=g) + offset_scale * offset, dim=1
    )


def stacked(variant: str, mode: str, ks: tuple[int, ...], x_sample: torch.Tensor) -> StackedSAE:
    """Two stacked SAEs with biases and encoder/decoder that differ (not the tied init)."""
    specs = [
        SAESpec(variant, DICT, ks, mode),
        SAESpec(variant, DICT, tuple(2 * k for k in ks), mode),
    ]
    model = StackedSAE(specs, D_IN)
    model.initialize([1, 2], x_sample, "mean")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.b_enc.copy_(0.01 * torch.randn(model.b_enc.shape, generator=g))
        model.b_dec.add_(0.01 * torch.randn(model.b_dec.shape, generator=g))
        if variant == "matryoshka":
            model.W_dec.add_(0.05 * torch.randn(model.W_dec.shape, generator=g))
            model.normalize_decoder()
    return model


def train_step(model: StackedSAE, x: torch.Tensor, impl: str, dead: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x, impl, dead, D_IN // 2, 1 / 32 if dead is not None else 0.0)
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def dead_mask(variant: str, device: torch.device) -> torch.Tensor | None:
    if variant == "sail":
        return None
    dead = torch.zeros(2, DICT[-1], dtype=torch.bool, device=device)
    dead[:, -DICT[-1] // 4 :] = True  # a quarter dead: AuxK runs on both paths
    return dead


@pytest.mark.parametrize(("variant", "mode", "ks"), CASES)
def test_dense_device_path_equals_sparse_cpu_path(device, variant, mode, ks):
    """float64 on both sides: the same selections, so loss, metrics and gradients agree closely."""
    x = offset_embeddings(512, D_IN, 2.0)
    ref = stacked(variant, mode, ks, x).double()
    dev = stacked(variant, mode, ks, x).double().to(device)
    for step in range(2):  # a second batch after the first step's threshold/state updates
        xb = x[step * 256 : (step + 1) * 256].double()
        out_cpu, g_cpu = train_step(ref, xb, "sparse", dead_mask(variant, torch.device("cpu")))
        out_dev, g_dev = train_step(dev, xb.to(device), "dense", dead_mask(variant, device))
        assert torch.equal(out_dev.l0_LM.cpu(), out_cpu.l0_LM)
        assert torch.equal(out_dev.fired_MF.cpu(), out_cpu.fired_MF)
        torch.testing.assert_close(
            out_dev.loss.cpu().double(), out_cpu.loss.double(), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(out_dev.sse_LM.cpu(), out_cpu.sse_LM, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(out_dev.auxk_M.cpu(), out_cpu.auxk_M, rtol=1e-4, atol=1e-7)
        assert g_dev.keys() == g_cpu.keys()
        for name, g in g_cpu.items():
            scale = float(g.abs().max()) or 1.0
            torch.testing.assert_close(
                g_dev[name], g, rtol=1e-4, atol=1e-5 * scale, msg=f"grad {name}"
            )
    if variant == "sail":  # the published running threshold saw the same minima
        torch.testing.assert_close(dev.theta_M().cpu(), ref.theta_M(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("variant", "mode", "ks"), CASES)
def test_dense_device_fp32_loss_matches_sparse_cpu(device, variant, mode, ks):
    """fp32 as trained: a boundary tie may flip a selection, so only the losses are compared."""
    x = offset_embeddings(256, D_IN, 2.0, seed=1)
    ref = stacked(variant, mode, ks, x)
    dev = stacked(variant, mode, ks, x).to(device)
    out_cpu, _ = train_step(ref, x, "sparse", dead_mask(variant, torch.device("cpu")))
    out_dev, _ = train_step(dev, x.to(device), "dense", dead_mask(variant, device))
    torch.testing.assert_close(out_dev.loss.cpu(), out_cpu.loss, rtol=1e-3, atol=0)
    assert torch.equal(out_dev.l0_LM.cpu(), out_cpu.l0_LM)


@pytest.mark.parametrize("mode", ["per_level", "global"])
def test_bf16_batchtopk_selection_overlaps_fp32_with_large_offset(device, mode):
    """bf16 autocast keeps >= 99% of fp32's BatchTopK entries when embeddings share a big offset.

    b_dec (the data mean here) is nearly every row's whole vector; centring in bf16, or folding
    b_dec into the GEMM's bias, would leave mostly rounding error and change the selection.
    """
    x = offset_embeddings(2048, 256, 10.0, seed=2)
    sizes, ks = ((64, 256, 1024), (8, 16, 32)) if mode == "per_level" else ((64, 256, 1024), (32,))
    model = StackedSAE([SAESpec("matryoshka", sizes, ks, mode)], 256)
    model.initialize([0], x, "mean")
    model = model.to(device)
    xb = x[:512].to(device)
    with torch.no_grad():
        sel32 = model.train_selections(model.activations(model.pre_activations(xb)))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            sel16 = model.train_selections(model.activations(model.pre_activations(xb)))
    for a, b in zip(sel32, sel16, strict=True):
        assert (a.level, a.model) == (b.level, b.model)
        overlap = torch.isin(b.flat, a.flat).float().mean().item()
        assert overlap >= 0.99, f"level {a.level}: bf16 kept only {overlap:.4f} of fp32's selection"


def test_training_twice_gives_identical_weights(device, tmp_path):
    """The trainer on the device, bf16 autocast and dense decode as on GPUs: bitwise repeatable."""
    from sail.config import TrainingSettings
    from sail.sae.grid import GridEntry
    from sail.sae.train import Runtime, train_family

    x = offset_embeddings(448, D_IN, 3.0, seed=3).to(device)
    settings = TrainingSettings(
        epochs=2, batch_size=128, lr=1e-3, dead_window=200, b_dec_init="mean"
    )
    entries = [
        GridEntry(SAESpec("matryoshka", DICT, ks), settings) for ks in [(4, 8, 16), (8, 16, 32)]
    ]
    rt = Runtime(
        device,
        precision="bf16",
        decode="dense",
        log_every=5,
        checkpoint_every=10**6,
        show_progress=False,
    )
    states = []
    for run in range(2):
        dirs = [tmp_path / f"run{run}" / e.name for e in entries]
        result = train_family(entries, x[:384], x[384:], dirs, rt)
        states.append([result.model.model_state(m) for m in range(len(entries))])
    for m, (first, second) in enumerate(zip(*states, strict=True)):
        for name in first:
            assert torch.equal(first[name], second[name]), (
                f"model {m} tensor {name} differs between runs"
            )
