"""Shared numerical kernels of the stacked SAEs: BatchTopK selection, the fp32-centred
pre-activations, the sparse autograd functions and packed flat indices.

Nothing here knows a variant. Shape letters follow docs/architecture.md: B batch rows, D input
width, F latents, L levels, M stacked models, N rows of a table.

A selection is a 1-D tensor of *flat* indices into the stacked (M, B, F) pre-activations, in
row-major order; ``flat_model``/``flat_row``/``flat_latent`` unpack them and ``pack_flat`` builds
them, so no caller decodes the packing by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tnf
from torch import Tensor


# ----- packed flat indices into (M, B, F) --------------------------------------------------------
def pack_flat(model: Tensor | int, row: Tensor, latent: Tensor, B: int, F: int) -> Tensor:
    """Flat index of entries (model, row, latent) of an (M, B, F) tensor."""
    return model * B * F + row * F + latent


def flat_latent(flat: Tensor, F: int) -> Tensor:
    return flat % F


def flat_row(flat: Tensor, B: int, F: int) -> Tensor:
    return (flat // F) % B


def flat_model(flat: Tensor, B: int, F: int) -> Tensor:
    return flat // (B * F)


def model_latent_key(flat: Tensor, B: int, F: int) -> Tensor:
    """Index into the (M, F) parameters (model * F + latent) of each flat entry."""
    return flat_model(flat, B, F) * F + flat_latent(flat, F)


def encoder_grads(
    g_key: Tensor, key: Tensor, rows: Tensor, x_BD: Tensor, W_MFD: Tensor, b_dec_MD: Tensor
):
    """Gradients of pre = (x - b_dec) W^T + b_enc from gradient entries sorted by (model, latent).

    dW = G^T (x - b_dec) is a sparse-dense product: ``embedding_bag`` over the batch rows, bagged
    by latent, costs nnz*D instead of B*F*D.
    """
    M, F, _ = W_MFD.shape
    offsets = torch.searchsorted(key, torch.arange(M * F, device=key.device))
    gW = tnf.embedding_bag(rows, x_BD, offsets, mode="sum", per_sample_weights=g_key.to(x_BD.dtype))
    gsum_MF = (
        torch.zeros(M * F, device=g_key.device, dtype=W_MFD.dtype)
        .index_add_(0, key, g_key.to(W_MFD.dtype))
        .view(M, F)
    )
    gW_MFD = gW.view(M, F, -1) - gsum_MF[..., None] * b_dec_MD[:, None, :]
    g_bdec = -torch.bmm(gsum_MF[:, None, :], W_MFD).squeeze(1)
    return gW_MFD, gsum_MF, g_bdec


class EncodeAt(torch.autograd.Function):
    """Values of the pre-activations at given flat (model, row, latent) entries, already computed.

    The forward pass only attaches the autograd edge; the backward builds the parameter gradients
    from the nnz entries alone, so no dense (M, B, F) gradient is ever formed. ``relu`` zeroes the
    gradient where the value is not positive (matryoshka's ReLU).
    """

    @staticmethod
    def forward(
        ctx,
        vals: Tensor,
        flat: Tensor,
        relu: bool,
        x_BD: Tensor,
        W_MFD: Tensor,
        b_enc_MF: Tensor,
        b_dec_MD: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(vals, flat, x_BD, W_MFD, b_dec_MD)
        ctx.relu = relu
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, flat, x_BD, W_MFD, b_dec_MD = ctx.saved_tensors
        M, F, _ = W_MFD.shape
        B = x_BD.shape[0]
        if ctx.relu:
            g = g * (vals > 0)
        # flat is row-major, so a stable sort by (model, latent) keeps rows ascending per latent
        key, order = torch.sort(model_latent_key(flat, B, F), stable=True)
        rows = flat_row(flat[order], B, F)
        gW, gb, gbd = encoder_grads(g[order], key, rows, x_BD, W_MFD, b_dec_MD)
        return None, None, None, None, gW, gb, gbd


class EncodeColumns(torch.autograd.Function):
    """Codes (M, B, C) on a few latent columns, already computed; dense gradient on those columns.

    AuxK's codes fill a large share of the dead columns, so their encoder gradient is one dense
    matmul G^T (x - b_dec) over C columns instead of a gather per entry.
    """

    @staticmethod
    def forward(
        ctx,
        codes_MBC: Tensor,
        cols: Tensor,
        x_BD: Tensor,
        W_MFD: Tensor,
        b_enc_MF: Tensor,
        b_dec_MD: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(codes_MBC, cols, x_BD, W_MFD, b_dec_MD)
        return codes_MBC.clone()

    @staticmethod
    def backward(ctx, g_MBC: Tensor):
        codes_MBC, cols, x_BD, W_MFD, b_dec_MD = ctx.saved_tensors
        G = g_MBC * (codes_MBC > 0)
        gsum_MC = G.sum(1)
        gW_MCD = (
            torch.matmul(G.transpose(1, 2), x_BD.to(G.dtype))
            - gsum_MC[..., None] * b_dec_MD[:, None, :]
        )
        gW = torch.zeros_like(W_MFD)
        gW[:, cols] = gW_MCD.to(gW.dtype)
        gb = torch.zeros(W_MFD.shape[:2], device=G.device, dtype=W_MFD.dtype)
        gb[:, cols] = gsum_MC.to(gb.dtype)
        g_bdec = -torch.bmm(gsum_MC[:, None, :].to(W_MFD.dtype), W_MFD[:, cols]).squeeze(1)
        return None, None, None, gW, gb, g_bdec


def topk_flat_sorted(v: Tensor, k: int) -> Tensor:
    """Ascending indices of the k largest entries of a 1-D tensor (BatchTopK's selection).

    On CPUs a full top-k over B*F entries dominates the step, so a threshold from a strided
    sample keeps a candidate set slightly larger than k, and the exact top-k is taken among those;
    anything unusual (ties at the boundary, too few candidates) falls back to the plain top-k.
    """
    n = v.numel()
    if v.is_cuda or n < (1 << 16) or 4 * k > n:
        return v.topk(k, sorted=False).indices.sort().values
    stride = n // 32768
    sample = v[::stride]
    s = sample.numel()
    expect = k * s / n
    rank = int(expect * 1.1 + 5 * math.sqrt(expect) + 16)  # ~5 sigma above the expected count
    if rank >= s:
        return v.topk(k, sorted=False).indices.sort().values
    t = sample.kthvalue(s - rank + 1).values
    cand = (v >= t).nonzero().squeeze(1)
    c = cand.numel()
    if c == k:
        return cand
    if c < k or c > 4 * k:
        return v.topk(k, sorted=False).indices.sort().values
    cv = v[cand]
    kth = cv.kthvalue(c - k + 1).values
    keep = cv >= kth
    if int(keep.sum()) != k:  # a tie at the boundary: let topk break it
        return v.topk(k, sorted=False).indices.sort().values
    return cand[keep]


def dense_pre(x_BD: Tensor, W_MFD: Tensor, b_enc_MF: Tensor, b_dec_MD: Tensor) -> Tensor:
    """(x - b_dec) W^T + b_enc, with x - b_dec formed in fp32 before the GEMM.

    Foundation-model embeddings share a large offset that b_dec learns. Folding b_dec into the
    bias would compute x.W and W.b_dec apart (in bf16 under autocast) and subtract two large
    numbers; centring first keeps the GEMM's inputs small, as the published code does. b_dec's
    gradient comes from a bias term that is exactly zero in value (s.detach() - s), so the input
    gradient of the (M, B, D) centred tensor is never needed.
    """
    dt = torch.promote_types(W_MFD.dtype, torch.float32)  # fp32 at least (fp64 models stay fp64)
    xc_MBD = x_BD.to(dt)[None] - b_dec_MD.detach().to(dt)[:, None, :]
    shift_MF = torch.bmm(W_MFD.detach(), b_dec_MD[..., None]).squeeze(-1)
    bias_MF = b_enc_MF + (shift_MF.detach() - shift_MF)
    return torch.baddbmm(bias_MF[:, None, :], xc_MBD, W_MFD.transpose(1, 2))


class DecoderGradTap(torch.autograd.Function):
    """Identity on sparse-decode output whose backward adds the decoder-weight gradient.

    ``embedding_bag``'s own weight gradient is a slow scatter on CPUs; the same gradient is an
    ``embedding_bag`` over the output-gradient rows bagged by latent (entries pre-sorted by latent).
    """

    @staticmethod
    def forward(
        ctx, R: Tensor, W_flat: Tensor, bag_by_key: Tensor, key: Tensor, vals_by_key: Tensor
    ) -> Tensor:
        ctx.save_for_backward(bag_by_key, key, vals_by_key)
        ctx.n_rows = W_flat.shape[0]
        return R.view_as(R)

    @staticmethod
    def backward(ctx, g_R: Tensor):
        bag_by_key, key, vals_by_key = ctx.saved_tensors
        offsets = torch.searchsorted(key, torch.arange(ctx.n_rows, device=key.device))
        gW = tnf.embedding_bag(
            bag_by_key,
            g_R.reshape(-1, g_R.shape[-1]),
            offsets,
            mode="sum",
            per_sample_weights=vals_by_key.to(g_R.dtype),
        )
        return g_R, gW, None, None, None


# On the CPU the sparse path (autograd over the selected entries only) wins from here on; below
# it the dense (B, F) GEMMs are cheaper than the sparse path's index bookkeeping. Measured per
# training step, one thread, batch 512, global top-k: d 64 / F 128 dense 14 ms vs sparse 18 ms;
# d 128 / F 256 sparse 17 vs dense 24; d 768 / F 4096 sparse 235 vs dense 720.
SPARSE_MIN_WEIGHTS = 2**15


def decode_path(requested: str, device: torch.device, d_in: int, n_latents: int) -> str:
    """The training path for one family: ``requested`` unless "auto", then a static rule from
    the device and the shapes (never timed at run time, so runs and resumes stay bit-identical):
    dense on GPUs, sparse on the CPU once the encoder has ``SPARSE_MIN_WEIGHTS`` weights."""
    if requested != "auto":
        return requested
    if device.type != "cpu":
        return "dense"
    return "sparse" if d_in * n_latents >= SPARSE_MIN_WEIGHTS else "dense"
