"""Matryoshka BatchTopK sparse autoencoders, stacked so a dictionary family trains in one pass.

Two variants share one module:

- ``sail``: the published model exactly (reference/spec_sae.md §1-2, §7.5): tied weights, the
  decoder is a stop-gradient copy of the encoder, an independent BatchTopK per nested prefix with
  its own K and no ReLU, mean of the level MSEs, and a soft shifted threshold at inference.
- ``matryoshka``: the corrected model: ReLU before top-k, a trained unit-norm decoder, ``per_level``
  (a K per prefix) or ``global`` (one BatchTopK, prefix reconstructions of the same code) top-k,
  AuxK for dead latents, and JumpReLU thresholds calibrated after training on held-out rows so
  the stored code is the last level's selection (``calibrate``).

Several SAEs with the same variant, dictionary sizes and top-k mode (a *family*, e.g. the 8 K
schedules of one dictionary) are stacked along a leading model axis M; they see the same batch and
their parameters never interact, so training them together equals training each alone.

Selections are kept sparse: (flat index into the (M, B, D) pre-activations, value). The ``dense``
decode scatters them into prefix-width code matrices (fast on GPUs); the ``sparse`` decode is an
``embedding_bag`` over the selected decoder rows with a sparse encoder-weight gradient (fast on
CPUs, where it skips most of the matmul work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sail.errors import SailError
from sail.sae.distributed import DistContext, global_topk_flat

VARIANTS = ("matryoshka", "sail")
TOPK_MODES = ("per_level", "global")
# The published code switches validation to its threshold once this many steps contributed.
SAIL_THRESHOLD_MIN_STEPS = 100


@dataclass(frozen=True)
class SAESpec:
    """What makes one SAE: variant, nested dictionary sizes, K per level (or one K in global mode)."""

    variant: str
    dict_sizes: tuple[int, ...]
    k_values: tuple[int, ...]
    topk_mode: str = "per_level"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dict_sizes", tuple(int(v) for v in self.dict_sizes))
        object.__setattr__(self, "k_values", tuple(int(v) for v in self.k_values))
        where = f"SAE config {self.published_name}"
        if self.variant not in VARIANTS:
            raise SailError(
                f"{where}: variant {self.variant!r} is not one of {', '.join(VARIANTS)}"
            )
        if self.topk_mode not in TOPK_MODES:
            raise SailError(
                f"{where}: topk_mode {self.topk_mode!r} is not one of {', '.join(TOPK_MODES)}"
            )
        if self.variant == "sail" and self.topk_mode != "per_level":
            raise SailError(f"{where}: the sail variant only has per_level top-k")
        sizes = self.dict_sizes
        if not sizes or any(s <= 0 for s in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise SailError(
                f"{where}: dict_sizes must be positive and strictly increasing, got {list(sizes)}"
            )
        want = len(sizes) if self.topk_mode == "per_level" else 1
        if len(self.k_values) != want:
            raise SailError(
                f"{where}: topk_mode {self.topk_mode} needs {want} k_values, got {len(self.k_values)}"
            )
        if any(k <= 0 for k in self.k_values):
            raise SailError(f"{where}: k_values must be positive, got {list(self.k_values)}")

    @property
    def published_name(self) -> str:
        return f"D_{'_'.join(map(str, self.dict_sizes))}_K_{'_'.join(map(str, self.k_values))}"

    @property
    def valid(self) -> bool:
        """The published grid skips any config whose K exceeds its level's size."""
        sizes = self.dict_sizes if self.topk_mode == "per_level" else self.dict_sizes[-1:]
        return all(k <= d for k, d in zip(self.k_values, sizes))

    @property
    def family(self) -> tuple:
        return (self.variant, self.dict_sizes, self.topk_mode)

    @property
    def n_levels(self) -> int:
        return len(self.dict_sizes)

    def to_json(self) -> dict:
        return {
            "variant": self.variant,
            "dict_sizes": list(self.dict_sizes),
            "k_values": list(self.k_values),
            "topk_mode": self.topk_mode,
        }


@dataclass
class Selection:
    """Selected entries of the stacked pre-activations for one (level, model), sorted row-major."""

    flat: Tensor  # (nnz,) int64 index into the (M, B, D) pre-activation tensor
    level: int
    model: int


@dataclass
class Calibration:
    """How one matryoshka SAE's thresholds were set (recorded in cfg.json)."""

    rows: int  # calibration rows
    ranges: list[list[int]]  # [lo, hi) latent range of each threshold
    selected: list[int]  # last-level BatchTopK picks per range over the calibration rows
    share: list[float]  # training share of each range (selected / total)
    dead_ranges: list[list[int]]  # ranges with no pick: threshold inf, every latent dead


@dataclass
class ForwardOut:
    loss: Tensor  # scalar: sum over models of each model's loss
    sse_LM: Tensor  # float64 summed squared error per level and model
    l0_LM: Tensor  # selected entries per level and model (summed over the batch)
    auxk_M: Tensor  # AuxK residual FVU per model (0 for sail or with no dead latents)
    fired_MF: Tensor  # bool, latents selected at any level in this batch


def _prefix_pairs(spec_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    lo = (0,) + spec_sizes[:-1]
    return list(zip(lo, spec_sizes))


def _encoder_grads(
    g_key: Tensor, key: Tensor, rows: Tensor, x_BD: Tensor, W_MFD: Tensor, b_dec_MD: Tensor
):
    """Gradients of pre = (x - b_dec) W^T + b_enc from gradient entries sorted by (model, latent).

    dW = G^T (x - b_dec) is a sparse-dense product: ``embedding_bag`` over the batch rows, bagged
    by latent, costs nnz*d instead of B*D*d.
    """
    M, Fd, _ = W_MFD.shape
    offsets = torch.searchsorted(key, torch.arange(M * Fd, device=key.device))
    gW = F.embedding_bag(rows, x_BD, offsets, mode="sum", per_sample_weights=g_key.to(x_BD.dtype))
    gsum_MF = (
        torch.zeros(M * Fd, device=g_key.device, dtype=W_MFD.dtype)
        .index_add_(0, key, g_key.to(W_MFD.dtype))
        .view(M, Fd)
    )
    gW_MFD = gW.view(M, Fd, -1) - gsum_MF[..., None] * b_dec_MD[:, None, :]
    g_bdec = -torch.bmm(gsum_MF[:, None, :], W_MFD).squeeze(1)
    return gW_MFD, gsum_MF, g_bdec


class _EncodeAt(torch.autograd.Function):
    """Values of the pre-activations at given flat (model, row, latent) entries, already computed.

    The forward pass only attaches the autograd edge; the backward builds the parameter gradients
    from the nnz entries alone, so no dense (M, B, D) gradient is ever formed. ``relu`` zeroes the
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
        M, Fd, _ = W_MFD.shape
        B = x_BD.shape[0]
        if ctx.relu:
            g = g * (vals > 0)
        key = (flat // (B * Fd)) * Fd + flat % Fd
        key, order = torch.sort(
            key, stable=True
        )  # flat is row-major, so rows stay ascending per latent
        rows = (flat[order] // Fd) % B
        gW, gb, gbd = _encoder_grads(g[order], key, rows, x_BD, W_MFD, b_dec_MD)
        return None, None, None, None, gW, gb, gbd


class _EncodeColumns(torch.autograd.Function):
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

    On CPUs a full top-k over B*D entries dominates the step, so a threshold from a strided
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


def _dense_pre(x_BD: Tensor, W_MFD: Tensor, b_enc_MF: Tensor, b_dec_MD: Tensor) -> Tensor:
    """(x - b_dec) W^T + b_enc, with x - b_dec formed in fp32 before the GEMM.

    Foundation-model embeddings share a large offset that b_dec learns. Folding b_dec into the
    bias would compute x.W and W.b_dec apart (in bf16 under autocast) and subtract two large
    numbers; centring first keeps the GEMM's inputs small, as the published code does. b_dec's
    gradient comes from a bias term that is exactly zero in value (s.detach() - s), so the input
    gradient of the (M, B, d) centred tensor is never needed.
    """
    dt = torch.promote_types(W_MFD.dtype, torch.float32)  # fp32 at least (fp64 models stay fp64)
    xc_MBD = x_BD.to(dt)[None] - b_dec_MD.detach().to(dt)[:, None, :]
    shift_MF = torch.bmm(W_MFD.detach(), b_dec_MD[..., None]).squeeze(-1)
    bias_MF = b_enc_MF + (shift_MF.detach() - shift_MF)
    return torch.baddbmm(bias_MF[:, None, :], xc_MBD, W_MFD.transpose(1, 2))


class _DecoderGradTap(torch.autograd.Function):
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
        gW = F.embedding_bag(
            bag_by_key,
            g_R.reshape(-1, g_R.shape[-1]),
            offsets,
            mode="sum",
            per_sample_weights=vals_by_key.to(g_R.dtype),
        )
        return g_R, gW, None, None, None


class StackedSAE(nn.Module):
    """M SAEs of one family; ``M == 1`` is a plain single SAE (what checkpoints hold)."""

    def __init__(self, specs: list[SAESpec], d_in: int):
        super().__init__()
        if not specs:
            raise SailError("StackedSAE needs at least one SAE config")
        fam = {s.family for s in specs}
        if len(fam) != 1:
            raise SailError(
                f"configs of different families cannot be stacked: {sorted(map(str, fam))}"
            )
        self.specs = list(specs)
        self.variant, self.dict_sizes, self.topk_mode = specs[0].family
        self.d_in = int(d_in)
        M, D, d, L = len(specs), self.dict_sizes[-1], self.d_in, len(self.dict_sizes)
        self.n_models, self.n_latents, self.n_levels = M, D, L
        self.register_buffer(
            "k_ML", torch.tensor([s.k_values for s in specs], dtype=torch.int64), persistent=False
        )
        if self.variant == "sail":
            self.W = nn.Parameter(torch.zeros(M, D, d))
            self.register_buffer("theta_sum", torch.zeros(M))
            self.register_buffer("theta_count", torch.zeros(M, dtype=torch.int64))
        else:
            self.W_enc = nn.Parameter(torch.zeros(M, D, d))
            self.W_dec = nn.Parameter(torch.zeros(M, D, d))
            n_thr = L if self.topk_mode == "per_level" else 1
            # NaN until calibrated; after calibration inf marks a range that never fired (dead)
            self.register_buffer("thresholds", torch.full((M, n_thr), math.nan))
            self.register_buffer("calibrated", torch.zeros(M, dtype=torch.bool))
        self.b_enc = nn.Parameter(torch.zeros(M, D))
        self.b_dec = nn.Parameter(torch.zeros(M, d))

    # ----- parameters -----------------------------------------------------------------------
    @property
    def W_encoder(self) -> Tensor:
        return self.W if self.variant == "sail" else self.W_enc

    @property
    def W_decoder(self) -> Tensor:
        # Published: the tied decoder reads the encoder's `.data`, so reconstructions train nothing.
        return self.W.detach() if self.variant == "sail" else self.W_dec

    @torch.no_grad()
    def initialize(
        self, seeds: list[int], x_sample_ND: Tensor | None = None, b_dec_init: str = "zeros"
    ) -> None:
        """Published init for sail (Xavier, unit rows, zero biases); tied unit-norm init for matryoshka.

        One seed per stacked model, so a model's init does not depend on the family it trains in.
        """
        if len(seeds) != self.n_models:
            raise ValueError(f"need {self.n_models} seeds, got {len(seeds)}")
        D, d = self.n_latents, self.d_in
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if self.variant == "sail":
            bound = math.sqrt(6.0 / (d + D))
            W = torch.stack([(torch.rand(D, d, generator=g) * 2 - 1) * bound for g in gens])
            self.W.copy_(W / (W.norm(dim=-1, keepdim=True) + 1e-8))
            self.b_enc.zero_()
            self.b_dec.zero_()
            return
        W = torch.stack([torch.randn(D, d, generator=g) for g in gens])
        W = W / W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        M = self.n_models
        if b_dec_init == "zeros" or x_sample_ND is None:
            self.b_dec.zero_()
        elif b_dec_init == "mean":
            self.b_dec.copy_(x_sample_ND.double().mean(0).float().expand(M, d))
        elif b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x_sample_ND).expand(M, d))
        else:
            raise SailError(f"b_dec_init {b_dec_init!r}: expected zeros, mean or geometric_median")

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (matryoshka)."""
        if self.variant == "sail" or self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        along = torch.matmul(g.unsqueeze(-2), W.unsqueeze(-1)).squeeze(
            -1
        )  # row-wise dot, no (M, D, d) temporary
        g.sub_(along * W)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.variant != "sail":
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ----- selection --------------------------------------------------------------------------
    def _select_batch_topk(
        self,
        s_MBF: Tensor,
        level_sizes: list[int],
        k_per_level_M: Tensor,
        B: int,
        ctx: DistContext | None = None,
        B_global: int | None = None,
    ) -> list[Selection]:
        """Independent BatchTopK per (level, model): the top K*B entries of the level's prefix.

        With ``ctx`` the rows are this rank's slice of a global batch of ``B_global`` rows and
        the top K*B_global entries are chosen over the whole global batch. For matryoshka (ReLU
        codes) zero-valued picks are dropped: when a prefix has fewer positive values than K*B,
        zeros fill the budget, and they must count neither as fired nor towards L0 (sail keeps
        them, as published: without a ReLU its picks may be zero or negative).
        """
        M, _, D = s_MBF.shape
        positive_only = self.variant != "sail"
        out = []
        k_host = k_per_level_M.tolist()
        pairs = [(li, Dl, m) for li, Dl in enumerate(level_sizes) for m in range(M)]
        flats = [s_MBF[m, :, :Dl].reshape(-1) for _, Dl, m in pairs]
        if ctx is not None:
            ks = [min(int(k_host[m][li]) * B_global, B_global * Dl) for li, Dl, m in pairs]
            picks = global_topk_flat(flats, ks, ctx)
        else:
            picks = [
                topk_flat_sorted(f, min(int(k_host[m][li]) * B, f.numel()))
                for (li, _, m), f in zip(pairs, flats)
            ]
        for (li, Dl, m), flat, f in zip(pairs, flats, picks):  # f is row-major: (row, latent)
            if positive_only:
                f = f[flat[f] > 0]
            out.append(Selection(m * B * D + (f // Dl) * D + f % Dl, li, m))
        return out

    def _select_sample_topk(self, s_MBF: Tensor) -> list[Selection]:
        """Per-sample top-K_i per prefix (the published fallback before its threshold exists)."""
        M, B, D = s_MBF.shape
        out = []
        k_host = self.k_ML.tolist()
        for li, Dl in enumerate(self.dict_sizes):
            for m in range(M):
                k = min(int(k_host[m][li]), Dl)
                j = s_MBF[m, :, :Dl].topk(k, dim=1, sorted=False).indices.sort(dim=1).values
                rows = torch.arange(B, device=j.device)[:, None]
                out.append(Selection((m * B * D + rows * D + j).reshape(-1), li, m))
        return out

    def _select_threshold(self, keep_MBF: Tensor) -> list[Selection]:
        """One code per sample (inference): level i is the prefix [0, D_i) of it."""
        M, B, D = keep_MBF.shape
        out = []
        for m in range(M):
            nz = keep_MBF[m].reshape(-1).nonzero().squeeze(1)
            latent = nz % D
            for li, Dl in enumerate(self.dict_sizes):
                out.append(Selection(m * B * D + nz[latent < Dl], li, m))
        return out

    def train_selections(
        self, acts_MBF: Tensor, ctx: DistContext | None = None, B_global: int | None = None
    ) -> list[Selection]:
        """The training-time selection of both variants (per-level or global BatchTopK)."""
        B = acts_MBF.shape[1]
        if self.topk_mode == "per_level":
            return self._select_batch_topk(
                acts_MBF, list(self.dict_sizes), self.k_ML, B, ctx, B_global
            )
        full = self._select_batch_topk(
            acts_MBF, [self.n_latents], self.k_ML[:, :1], B, ctx, B_global
        )
        D = self.n_latents
        out = []
        for sel in full:
            latent = sel.flat % D
            for li, Dl in enumerate(self.dict_sizes):
                out.append(Selection(sel.flat[latent < Dl], li, sel.model))
        return out

    # ----- forward pieces ----------------------------------------------------------------------
    def pre_activations(self, x_BD: Tensor) -> Tensor:
        return _dense_pre(x_BD, self.W_encoder, self.b_enc, self.b_dec)

    def activations(self, pre_MBF: Tensor) -> Tensor:
        return pre_MBF if self.variant == "sail" else F.relu(pre_MBF)

    def decode(
        self, sels: list[Selection], vals: list[Tensor], B: int, impl: str = "dense"
    ) -> Tensor:
        """Reconstructions (L, M, B, d) of each level from its selection, decoding at prefix width."""
        M, D, L, d = self.n_models, self.n_latents, self.n_levels, self.d_in
        Wd = self.W_decoder
        b_dec = self.b_dec
        order = sorted(range(len(sels)), key=lambda i: (sels[i].level, sels[i].model))
        sels, vals = [sels[i] for i in order], [vals[i] for i in order]
        if impl == "sparse":
            # Bags (level, model, row) are sorted because each selection is row-major.
            rows = torch.cat([(s.level * M + s.model) * B + (s.flat // D) % B for s in sels])
            emb_idx = torch.cat([s.model * D + s.flat % D for s in sels])
            v = torch.cat(vals)
            offsets = torch.searchsorted(rows, torch.arange(L * M * B, device=rows.device))
            W_flat = Wd.reshape(M * D, d)
            R = F.embedding_bag(
                emb_idx, W_flat.detach(), offsets, mode="sum", per_sample_weights=v.to(Wd.dtype)
            )
            if W_flat.requires_grad and torch.is_grad_enabled():
                key, order = torch.sort(emb_idx, stable=True)
                R = _DecoderGradTap.apply(R, W_flat, rows[order], key, v.detach()[order])
            return R.view(L, M, B, d) + b_dec[None, :, None, :]
        out = torch.empty(L, M, B, d, device=Wd.device, dtype=torch.float32)
        for sel, v in zip(sels, vals):
            Dl = self.dict_sizes[sel.level]
            local = sel.flat - sel.model * B * D
            rows, latent = local // D, local % D
            codes = torch.zeros(B, Dl, device=v.device, dtype=v.dtype).index_put((rows, latent), v)
            out[sel.level, sel.model] = (
                codes @ Wd[sel.model, :Dl].to(codes.dtype) + b_dec[sel.model]
            )
        return out

    def forward_train(
        self,
        x_BD: Tensor,
        impl: str = "dense",
        dead_MF: Tensor | None = None,
        auxk_k: int = 0,
        auxk_alpha: float = 0.0,
        ctx: DistContext | None = None,
        B_global: int | None = None,
    ) -> ForwardOut:
        """Training loss of every stacked model on one batch, plus device-side metric sums.

        With ``ctx``, ``x_BD`` is this rank's slice of a ``B_global``-row batch: selections are
        global and the loss is this slice's share of the global-batch loss (rank gradients sum
        to the single-process gradient); ``fired_MF`` stays local (the caller reduces it).
        """
        M, D, L = self.n_models, self.n_latents, self.n_levels
        B = x_BD.shape[0]
        if impl == "sparse":
            # Autograd sees only the selected entries (and AuxK's columns), never the (M, B, D) tensor.
            with torch.no_grad():
                acts = self.pre_activations(x_BD)
                acts = acts if self.variant == "sail" else acts.relu_()
                sels = self.train_selections(acts, ctx, B_global)
            flat_all = torch.cat([s.flat for s in sels])
            flat_u = torch.unique(flat_all)
            vals_u = _EncodeAt.apply(
                acts.reshape(-1)[flat_u],
                flat_u,
                self.variant != "sail",
                x_BD,
                self.W_encoder,
                self.b_enc,
                self.b_dec,
            )
            vals_all = vals_u[torch.searchsorted(flat_u, flat_all)]
        else:
            acts = self.activations(self.pre_activations(x_BD))
            with torch.no_grad():
                sels = self.train_selections(acts.detach(), ctx, B_global)
            flat_all = torch.cat([s.flat for s in sels])
            vals_all = acts.reshape(-1)[flat_all]
        vals = list(torch.split(vals_all, [s.flat.numel() for s in sels]))
        R_LMBD = self.decode(sels, vals, B, impl)
        sq = (R_LMBD.float() - x_BD.float()[None, None]).pow(2)
        mse_LM = sq.mean(dim=(2, 3)) if ctx is None else sq.sum(dim=(2, 3)) / (B_global * self.d_in)
        loss_M = mse_LM.mean(0)
        with torch.no_grad():
            sse_LM = sq.detach().sum(dim=2).double().sum(-1)
            l0_LM = torch.tensor([[0] * M] * L, device=x_BD.device, dtype=torch.int64)
            fired = torch.zeros(M * D, dtype=torch.bool, device=x_BD.device)
            for s in sels:
                l0_LM[s.level, s.model] = s.flat.numel()
                fired[s.model * D + s.flat % D] = True
            fired_MF = fired.view(M, D)
        auxk_M = torch.zeros(M, device=x_BD.device)
        if self.variant == "sail":
            self._update_theta(sels, vals, ctx)
        elif auxk_alpha > 0 and dead_MF is not None and auxk_k > 0:
            aux_loss_M, auxk_M = self._auxk_loss(
                x_BD, acts, R_LMBD[-1].detach(), dead_MF, auxk_k, ctx, B_global
            )
            loss_M = loss_M + auxk_alpha * aux_loss_M
        return ForwardOut(loss_M.sum(), sse_LM, l0_LM, auxk_M.detach(), fired_MF)

    def _auxk_loss(
        self,
        x_BD: Tensor,
        acts_MBF: Tensor,
        R_MBD: Tensor,
        dead_MF: Tensor,
        k_aux: int,
        ctx: DistContext | None = None,
        B_global: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """AuxK (Gao et al.): the top-k_aux dead latents reconstruct the residual, bias-free.

        Returns (loss term, normalised value for metrics). The loss term is an MSE in the same
        units as the main loss (as in Gao et al., where both share one normalisation), scaled down
        when fewer than k_aux latents are dead; the metric divides it by the residual's variance.
        With ``ctx`` both are normalised over the global batch (variance from all-reduced sums).
        """
        M, B, D = acts_MBF.shape
        k = min(k_aux, D)
        e_MBD = (x_BD.float()[None] - R_MBD.float()).detach()
        # Decode over the dead columns only (the union over models), as a dense bmm: k_aux is large
        # (d/2), so a gather-based sparse decode of B x k_aux rows costs more than this matmul.
        cols = dead_MF.any(0).nonzero().squeeze(1)
        if cols.numel() == 0:
            e_hat = torch.zeros_like(e_MBD)
        else:
            sub = torch.where(
                dead_MF[:, None, cols],
                acts_MBF[:, :, cols],
                torch.zeros((), dtype=acts_MBF.dtype, device=acts_MBF.device),
            )
            top = sub.topk(min(k, cols.numel()), dim=-1)
            codes = torch.zeros_like(sub).scatter_(-1, top.indices, top.values)
            if not acts_MBF.requires_grad:  # the sparse path: attach the encoder on these columns
                codes = _EncodeColumns.apply(codes, cols, x_BD, self.W_enc, self.b_enc, self.b_dec)
            e_hat = torch.bmm(codes.to(self.W_dec.dtype), self.W_dec[:, cols]).float()
        scale = (dead_MF.sum(-1).to(e_hat.dtype) / k).clamp(max=1.0)
        if ctx is not None:
            n = B_global * e_MBD.shape[-1]
            sse = (e_hat - e_MBD).pow(2).sum(dim=(1, 2))
            stats = ctx.all_reduce(
                torch.cat(
                    [
                        sse.detach().double(),
                        e_MBD.double().pow(2).sum(dim=(1, 2)),
                        e_MBD.double().sum(1).reshape(-1),
                    ]
                )
            )
            mu_MD = stats[2 * M :].view(M, -1) / B_global
            var = ((stats[M : 2 * M] - B_global * mu_MD.pow(2).sum(-1)) / n).clamp_min(1e-12)
            return scale * sse / n, (stats[:M] / n / var).to(e_hat.dtype)
        mse = (e_hat - e_MBD).pow(2).mean(dim=(1, 2))
        var = (e_MBD - e_MBD.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2)).clamp_min(1e-12)
        return scale * mse, (mse / var).detach()

    @torch.no_grad()
    def _update_theta(
        self, sels: list[Selection], vals: list[Tensor], ctx: DistContext | None = None
    ) -> None:
        """Published threshold: running mean of the smallest positive value kept at the last level.

        With ``ctx`` the minimum is taken over the global batch (all-reduced across ranks).
        """
        last = self.n_levels - 1
        lows = {}
        for s, v in zip(sels, vals):
            if s.level != last:
                continue
            pos = torch.where(
                v > 0, v.detach().float(), torch.full_like(v, math.inf, dtype=torch.float32)
            )
            lows[s.model] = pos.min() if pos.numel() else torch.tensor(math.inf, device=v.device)
        if ctx is not None:
            reduced = ctx.all_reduce(torch.stack([lows[m] for m in sorted(lows)]), "min")
            lows = dict(zip(sorted(lows), reduced))
        for m, low in lows.items():
            has = torch.isfinite(low)
            self.theta_sum[m] += torch.where(has, low, torch.zeros_like(low))
            self.theta_count[m] += has.to(torch.int64)

    # ----- inference -----------------------------------------------------------------------------
    def theta_M(self) -> Tensor:
        """sail's inference threshold θ = sum / count (0 before any step)."""
        return self.theta_sum / self.theta_count.clamp_min(1).to(self.theta_sum.dtype)

    def threshold_ranges(self) -> list[tuple[int, int]]:
        """Latent ranges that share one JumpReLU threshold: the nested levels' new latents
        [D_{i-1}, D_i) in per_level mode, the whole dictionary in global mode."""
        return (
            _prefix_pairs(self.dict_sizes)
            if self.topk_mode == "per_level"
            else [(0, self.n_latents)]
        )

    def latent_thresholds_MF(self) -> Tensor:
        """Per-latent JumpReLU threshold from the per-range thresholds."""
        sizes = torch.tensor(
            [hi - lo for lo, hi in self.threshold_ranges()], device=self.thresholds.device
        )
        return torch.repeat_interleave(self.thresholds, sizes, dim=1)

    @torch.no_grad()
    def inference_codes(self, x_BD: Tensor) -> Tensor:
        """Dense (M, B, D) codes as stored: soft threshold (sail) or calibrated JumpReLU (matryoshka)."""
        pre = _dense_pre(x_BD, self.W_encoder, self.b_enc, self.b_dec)
        if self.variant == "sail":
            return F.relu(pre - self.theta_M()[:, None, None])
        if not bool(self.calibrated.all()):
            raise SailError(
                "matryoshka SAE has no calibrated thresholds; run calibration on held-out data first"
            )
        acts = F.relu(pre)
        return acts * (acts > self.latent_thresholds_MF()[:, None, :])

    @torch.no_grad()
    def eval_levels(self, x_BD: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
        """(sse_LM float64, l0_LM, fired_MF) of each level on a batch with the given selection mode.

        ``train``: BatchTopK as in training; ``inference``: the stored code's prefixes;
        ``published``: what the published validation used (threshold after 100 steps, else per-sample top-k).
        ``fired_MF`` marks the latents that are nonzero in some row of the batch.
        """
        B = x_BD.shape[0]
        if mode == "published":
            mode = (
                "inference"
                if bool((self.theta_count >= SAIL_THRESHOLD_MIN_STEPS).all())
                else "sample_topk"
            )
        pre = _dense_pre(x_BD, self.W_encoder, self.b_enc, self.b_dec)
        if mode == "train":
            acts = self.activations(pre)
            sels = self.train_selections(acts)
        elif mode == "sample_topk":
            acts = self.activations(pre)
            sels = self._select_sample_topk(acts)
        elif mode == "inference":
            acts = self.inference_codes(x_BD)
            sels = self._select_threshold(acts != 0)
        else:
            raise ValueError(mode)
        vals = [acts.reshape(-1)[s.flat] for s in sels]
        R = self.decode(sels, vals, B, "dense")
        sse = (R.float() - x_BD.float()[None, None]).pow(2).sum(dim=2).double().sum(-1)
        l0 = torch.zeros(self.n_levels, self.n_models, dtype=torch.int64, device=x_BD.device)
        fired = torch.zeros(self.n_models * self.n_latents, dtype=torch.bool, device=x_BD.device)
        for s in sels:
            l0[s.level, s.model] = s.flat.numel()
            fired[s.model * self.n_latents + s.flat % self.n_latents] = True
        return sse, l0, fired.view(self.n_models, self.n_latents)

    @torch.no_grad()
    def calibrate(self, x_ND: Tensor, batch_size: int = 4096) -> list[Calibration]:
        """JumpReLU thresholds that make the stored code reproduce the last level's training selection.

        The stored code spans the whole dictionary. ``per_level``: the last level's BatchTopK
        (K_last, at the training batch size ``batch_size``) is run over the calibration rows and
        the selections are counted per range [D_{i-1}, D_i); range i's threshold then keeps exactly
        that many of its activations over all rows, so every range keeps its training share and
        L0 = K_last on these rows. ``global``: one range, the same rule with the single K. A range
        that never fired gets threshold ``inf`` and is reported (its latents are dead). Kept
        values are not shrunk.
        """
        if self.variant == "sail":
            raise SailError(
                "the sail variant uses the published soft threshold; it is not calibrated"
            )
        N = x_ND.shape[0]
        if N == 0:
            raise SailError("cannot calibrate thresholds on an empty set of rows")
        ranges = self.threshold_ranges()
        counts_MR = self._training_selection_counts(x_ND, batch_size, ranges)
        thresholds_MR = self._thresholds_keeping(x_ND, batch_size, ranges, counts_MR)
        self.thresholds.copy_(thresholds_MR)
        self.calibrated.fill_(True)
        total_M = counts_MR.sum(1).clamp_min(1)
        return [
            Calibration(
                rows=N,
                ranges=[list(r) for r in ranges],
                selected=counts_MR[m].tolist(),
                share=(counts_MR[m] / total_M[m]).tolist(),
                dead_ranges=[list(r) for r, c in zip(ranges, counts_MR[m].tolist()) if c == 0],
            )
            for m in range(self.n_models)
        ]

    def _training_selection_counts(
        self, x_ND: Tensor, batch_size: int, ranges: list[tuple[int, int]]
    ) -> Tensor:
        """(M, R) number of the last level's BatchTopK picks per threshold range, over batches of x."""
        bounds = torch.tensor([hi for _, hi in ranges], device=x_ND.device)
        counts = torch.zeros(self.n_models, len(ranges), dtype=torch.int64, device=x_ND.device)
        k_last = self.k_ML[:, -1].tolist()
        for start in range(0, x_ND.shape[0], batch_size):
            acts_MBF = F.relu(self.pre_activations(x_ND[start : start + batch_size]))
            for m in range(self.n_models):
                flat = acts_MBF[m].reshape(-1)
                pick = topk_flat_sorted(flat, min(int(k_last[m]) * acts_MBF.shape[1], flat.numel()))
                latent = pick[flat[pick] > 0] % self.n_latents
                counts[m] += torch.bincount(
                    torch.bucketize(latent, bounds, right=True), minlength=len(ranges)
                )
        return counts

    def _thresholds_keeping(
        self, x_ND: Tensor, batch_size: int, ranges: list[tuple[int, int]], counts_MR: Tensor
    ) -> Tensor:
        """(M, R) thresholds: the (n+1)-th largest activation of each range over all rows, so that
        ``acts > threshold`` keeps n of them (0 when the range has only n positive values)."""
        M, R = counts_MR.shape
        need = counts_MR.tolist()
        tops: list[list[Tensor]] = [
            [torch.empty(0, device=x_ND.device) for _ in range(R)] for _ in range(M)
        ]
        for start in range(0, x_ND.shape[0], batch_size):
            acts_MBF = F.relu(self.pre_activations(x_ND[start : start + batch_size]))
            for m in range(M):
                for r, (lo, hi) in enumerate(ranges):
                    if need[m][r] == 0:
                        continue
                    a, top, n = acts_MBF[m, :, lo:hi].reshape(-1), tops[m][r], need[m][r]
                    a = a[a > (top.min() if top.numel() > n else 0.0)]
                    a = torch.cat([top, a])
                    tops[m][r] = a.topk(n + 1, sorted=False).values if a.numel() > n + 1 else a
        out = torch.full((M, R), math.inf, device=x_ND.device)
        for m in range(M):
            for r in range(R):
                if need[m][r]:
                    top = tops[m][r]
                    out[m, r] = top.min() if top.numel() > need[m][r] else 0.0
        return out

    # ----- per-model state -------------------------------------------------------------------------
    def model_state(self, m: int) -> dict[str, Tensor]:
        """Tensors of model m alone (what model.safetensors holds)."""
        names = (
            ["W", "b_enc", "b_dec", "theta_sum", "theta_count"]
            if self.variant == "sail"
            else ["W_enc", "b_enc", "W_dec", "b_dec", "thresholds"]
        )
        return {n: getattr(self, n)[m].detach().clone().contiguous() for n in names}

    @torch.no_grad()
    def load_model_state(self, m: int, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            target = getattr(self, name)
            if tuple(target[m].shape) != tuple(value.shape):
                raise SailError(
                    f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(target[m].shape)}"
                )
            target[m].copy_(value)
        if self.variant != "sail":
            self.calibrated[m] = not bool(torch.isnan(self.thresholds[m]).any())


def geometric_median(x_ND: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm in float64 (a robust b_dec init, as dictionary_learning uses)."""
    x = x_ND.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < tol:
            y = y_new
            break
        y = y_new
    return y.float()
