"""The shared core of SAIL's stacked sparse autoencoders, and the registry of their variants.

A *variant* (``sail``, ``matryoshka``, ...) is a subclass of :class:`StackedSAE` registered under
the name cfg.json's ``variant`` key holds (:func:`register_variant`, :func:`variant_class`). It
owns its parameters, initialisation, inference rule, state-dict names and the checkpoint fields
it writes; everything else lives here and knows no variant: BatchTopK selection (per nested level
or one global top-k), the sparse and dense decodes, the training forward pass, evaluation and the
JumpReLU calibration machinery. docs/architecture.md shows how to add a variant.

Several SAEs with the same variant, dictionary sizes and top-k mode (a *family*, e.g. the 8 K
schedules of one dictionary) are stacked along a leading model axis M; they see the same batch and
their parameters never interact, so training them together equals training each alone.

Shape letters (docs/architecture.md): B batch rows, D input width, F latents, L levels, M stacked
models, N rows. Selections are kept sparse: flat indices into the (M, B, F) pre-activations
(``sail.sae.kernels``). The ``dense`` decode scatters them into prefix-width code matrices (fast on
GPUs); the ``sparse`` decode is an ``embedding_bag`` over the selected decoder rows with a sparse
encoder-weight gradient (fast on CPUs, where it skips most of the matmul work).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from sail.errors import SailError
from sail.sae.distributed import DistContext, global_topk_flat
from sail.sae.kernels import (
    DecoderGradTap,
    EncodeAt,
    EncodeColumns,
    dense_pre,
    flat_latent,
    flat_row,
    pack_flat,
    topk_flat_sorted,
)

TOPK_MODES = ("per_level", "global")

# ----- registry ----------------------------------------------------------------------------------
_REGISTRY: dict[str, type[StackedSAE]] = {}


def register_variant(cls: type[StackedSAE]) -> type[StackedSAE]:
    """Class decorator: make ``cls`` the implementation of cfg.json's ``variant: cls.variant``."""
    _REGISTRY[cls.variant] = cls
    return cls


def _load_builtin_variants() -> None:
    importlib.import_module("sail.sae.variants")  # importing registers sail and matryoshka


def variant_class(name: str) -> type[StackedSAE]:
    """The registered class of a variant name (a SailError listing the known names otherwise)."""
    if name not in _REGISTRY:
        _load_builtin_variants()
    if name not in _REGISTRY:
        raise SailError(f"variant {name!r} is not one of {', '.join(variant_names())}")
    return _REGISTRY[name]


def variant_names() -> tuple[str, ...]:
    _load_builtin_variants()
    return tuple(sorted(_REGISTRY))


@dataclass(frozen=True)
class SAESpec:
    """What makes one SAE: variant, nested dictionary sizes, K per level (or one K in global
    mode)."""

    variant: str
    dict_sizes: tuple[int, ...]
    k_values: tuple[int, ...]
    topk_mode: str = "per_level"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dict_sizes", tuple(int(v) for v in self.dict_sizes))
        object.__setattr__(self, "k_values", tuple(int(v) for v in self.k_values))
        where = f"SAE config {self.published_name}"
        try:
            cls = variant_class(self.variant)
        except SailError as exc:
            raise SailError(f"{where}: {exc}") from None
        if self.topk_mode not in TOPK_MODES:
            raise SailError(
                f"{where}: topk_mode {self.topk_mode!r} is not one of {', '.join(TOPK_MODES)}"
            )
        if self.topk_mode not in cls.topk_modes:
            raise SailError(
                f"{where}: the {self.variant} variant only has {' or '.join(cls.topk_modes)} top-k"
            )
        sizes = self.dict_sizes
        if (
            not sizes
            or any(s <= 0 for s in sizes)
            or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False))
        ):
            raise SailError(
                f"{where}: dict_sizes must be positive and strictly increasing, got {list(sizes)}"
            )
        want = len(sizes) if self.topk_mode == "per_level" else 1
        if len(self.k_values) != want:
            raise SailError(
                f"{where}: topk_mode {self.topk_mode} needs {want} k_values, got "
                f"{len(self.k_values)}"
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
        return all(k <= size for k, size in zip(self.k_values, sizes, strict=False))

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

    flat: Tensor  # (nnz,) int64 index into the (M, B, F) pre-activation tensor
    level: int
    model: int


@dataclass
class Calibration:
    """How one SAE's JumpReLU thresholds were set (recorded in cfg.json)."""

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
    auxk_M: Tensor  # AuxK residual FVU per model (0 without AuxK or with no dead latents)
    fired_MF: Tensor  # bool, latents selected at any level in this batch


@dataclass
class TrainBatch:
    """What a variant's ``after_selection`` hook sees of one training batch."""

    x_BD: Tensor
    acts_MBF: Tensor  # activations (sparse path: without autograd)
    sels: list[Selection]
    vals: list[Tensor]
    R_LMBD: Tensor  # reconstructions of every level
    ctx: DistContext | None = None
    B_global: int | None = None
    dead_MF: Tensor | None = None
    auxk_k: int = 0
    auxk_alpha: float = 0.0


@dataclass
class SaeLensWeights:
    """One SAE as SAELens' ``standard``/``jumprelu`` architecture sees it, on L2-normalised input:
    codes = relu(pre) (standard) or relu(pre) * (pre > threshold) (jumprelu), with
    pre = (x - b_dec) W_enc + b_enc and reconstruction codes W_dec + b_dec."""

    architecture: str  # "standard" or "jumprelu"
    W_enc_DF: Tensor
    b_enc_F: Tensor
    W_dec_FD: Tensor
    b_dec_D: Tensor
    threshold_F: Tensor | None = None
    notes: list[str] = field(default_factory=list)


def _prefix_pairs(spec_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    lo = (0,) + spec_sizes[:-1]
    return list(zip(lo, spec_sizes, strict=False))


class StackedSAE(nn.Module):
    """M SAEs of one family; ``M == 1`` is a plain single SAE (what checkpoints hold).

    ``StackedSAE(specs, d_in)`` builds the registered class of the specs' variant. A variant
    subclass sets the class attributes below and implements the hooks marked *variant*.
    """

    variant: ClassVar[str] = ""  # cfg.json's ``variant`` (the registry key)
    topk_modes: ClassVar[tuple[str, ...]] = TOPK_MODES
    nonnegative: ClassVar[bool] = True  # ReLU before top-k; zero-valued picks are dropped
    state_names: ClassVar[tuple[str, ...]] = ()  # per-model tensors in model.safetensors
    nonfinite_state: ClassVar[tuple[str, ...]] = ()  # tensors that may hold NaN/inf on disk
    default_recipe: ClassVar[str] = "auto"  # training recipe when the grid names none
    result_settings: ClassVar[tuple[str, ...] | None] = (
        None  # settings that name folders (None: all)
    )
    calibrates: ClassVar[bool] = False  # thresholds set on held-out rows after training
    uses_auxk: ClassVar[bool] = False  # AuxK loss on dead latents during training
    validation_mode: ClassVar[str] = "train"  # eval_levels mode of the per-epoch validation rows
    validation_label: ClassVar[str] = "batchtopk"  # metrics.csv ``mode`` of those rows

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is StackedSAE:  # dispatch on the specs' variant
            specs = args[0] if args else kwargs.get("specs")
            if not specs:
                raise SailError("StackedSAE needs at least one SAE config")
            cls = variant_class(specs[0].variant)
        return super().__new__(cls)

    def __init__(self, specs: list[SAESpec], d_in: int):
        super().__init__()
        if not specs:
            raise SailError("StackedSAE needs at least one SAE config")
        fam = {s.family for s in specs}
        if len(fam) != 1:
            raise SailError(
                f"configs of different families cannot be stacked: {sorted(map(str, fam))}"
            )
        if specs[0].variant != self.variant:
            raise SailError(f"{type(self).__name__} cannot hold {specs[0].variant} configs")
        self.specs = list(specs)
        _, self.dict_sizes, self.topk_mode = specs[0].family
        self.d_in = int(d_in)
        M, F, D, L = len(specs), self.dict_sizes[-1], self.d_in, len(self.dict_sizes)
        self.n_models, self.n_latents, self.n_levels = M, F, L
        # K per (model, level) as host ints: selection reads them every step, and a device
        # tensor would cost a device-to-host sync each time
        self.k_ML: list[list[int]] = [list(s.k_values) for s in specs]
        self.init_parameters(M, F, D, L)
        self.b_enc = nn.Parameter(torch.zeros(M, F))
        self.b_dec = nn.Parameter(torch.zeros(M, D))

    # ----- variant hooks -------------------------------------------------------------------------
    def init_parameters(self, M: int, F: int, D: int, L: int) -> None:
        """*variant*: register the weights and buffers besides b_enc (M, F) and b_dec (M, D)."""
        raise NotImplementedError

    @property
    def W_encoder(self) -> Tensor:
        """*variant*: (M, F, D) encoder weights."""
        raise NotImplementedError

    @property
    def W_decoder(self) -> Tensor:
        """*variant*: (M, F, D) decoder weights as the reconstruction uses them."""
        raise NotImplementedError

    def initialize(
        self, seeds: list[int], x_sample_ND: Tensor | None = None, b_dec_init: str = "zeros"
    ) -> None:
        """*variant*: initial weights, one seed per stacked model (so a model's init does not
        depend on the family it trains in)."""
        raise NotImplementedError

    def inference_codes(self, x_BD: Tensor) -> Tensor:
        """*variant*: dense (M, B, F) codes as stored, for L2-normalised rows."""
        raise NotImplementedError

    def inference_summary(self, m: int) -> dict[str, Any]:
        """*variant*: cfg.json's ``inference`` record of model m."""
        raise NotImplementedError

    def saelens_weights(self, m: int) -> SaeLensWeights:
        """*variant*: model m as SAELens' ``standard`` or ``jumprelu`` (``sail export-sae``)."""
        raise SailError(f"the {self.variant} variant has no SAELens export")

    def after_selection(self, batch: TrainBatch) -> tuple[Tensor | None, Tensor | None]:
        """*variant*: extra loss per model and AuxK metric per model (None for none) after a
        training batch's selection and decode; also where running statistics are updated."""
        return None, None

    def resolve_eval_mode(self, mode: str) -> str:
        """*variant*: map a named evaluation mode (e.g. ``published``) to
        train/sample_topk/inference."""
        return mode

    def after_load(self, m: int) -> None:
        """*variant*: derive buffers of model m after its tensors were loaded."""

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """*variant*: adjust decoder gradients before the optimiser step (default: none)."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """*variant*: re-project the decoder after the optimiser step (default: none)."""

    @classmethod
    def check_loadable(cls, cfg: dict[str, Any], where: str, allow_stale: bool) -> None:
        """*variant*: refuse a checkpoint whose stored fields mean something else now."""

    # ----- selection -----------------------------------------------------------------------------
    def _select_batch_topk(
        self,
        s_MBF: Tensor,
        level_sizes: list[int],
        k_ML: list[list[int]],
        B: int,
        ctx: DistContext | None = None,
        B_global: int | None = None,
    ) -> list[Selection]:
        """Independent BatchTopK per (level, model): the top K*B entries of the level's prefix.

        With ``ctx`` the rows are this rank's slice of a global batch of ``B_global`` rows and
        the top K*B_global entries are chosen over the whole global batch. For nonnegative
        (ReLU) codes zero-valued picks are dropped: when a prefix has fewer positive values than
        K*B, zeros fill the budget, and they must count neither as fired nor towards L0 (codes
        without a ReLU keep them, as published: their picks may be zero or negative).
        """
        M, _, F = s_MBF.shape
        out = []
        pairs = [(li, Fl, m) for li, Fl in enumerate(level_sizes) for m in range(M)]
        flats = [s_MBF[m, :, :Fl].reshape(-1) for _, Fl, m in pairs]
        if ctx is not None:
            ks = [min(k_ML[m][li] * B_global, B_global * Fl) for li, Fl, m in pairs]
            picks = global_topk_flat(flats, ks, ctx)
        else:
            picks = [
                topk_flat_sorted(f, min(k_ML[m][li] * B, f.numel()))
                for (li, _, m), f in zip(pairs, flats, strict=False)
            ]
        # each pick f indexes a (B, Fl) prefix, row-major
        for (li, Fl, m), flat, f in zip(pairs, flats, picks, strict=True):
            if self.nonnegative:
                f = f[flat[f] > 0]
            out.append(Selection(pack_flat(m, f // Fl, f % Fl, B, F), li, m))
        return out

    def _select_sample_topk(self, s_MBF: Tensor) -> list[Selection]:
        """Per-sample top-K_i per prefix (the published fallback before its threshold exists)."""
        M, B, F = s_MBF.shape
        out = []
        for li, Fl in enumerate(self.dict_sizes):
            for m in range(M):
                k = min(self.k_ML[m][li], Fl)
                j = s_MBF[m, :, :Fl].topk(k, dim=1, sorted=False).indices.sort(dim=1).values
                rows = torch.arange(B, device=j.device)[:, None]
                out.append(Selection(pack_flat(m, rows, j, B, F).reshape(-1), li, m))
        return out

    def _select_threshold(self, keep_MBF: Tensor) -> list[Selection]:
        """One code per sample (inference): level i is the prefix [0, F_i) of it."""
        M, B, F = keep_MBF.shape
        out = []
        for m in range(M):
            nz = keep_MBF[m].reshape(-1).nonzero().squeeze(1)
            latent = flat_latent(nz, F)
            for li, Fl in enumerate(self.dict_sizes):
                out.append(Selection(m * B * F + nz[latent < Fl], li, m))
        return out

    def _split_levels(self, full: list[Selection]) -> list[Selection]:
        """Each whole-dictionary selection cut into the nested prefixes [0, F_i)."""
        out = []
        for sel in full:
            latent = flat_latent(sel.flat, self.n_latents)
            for li, Fl in enumerate(self.dict_sizes):
                out.append(Selection(sel.flat[latent < Fl], li, sel.model))
        return out

    def train_selections(
        self, acts_MBF: Tensor, ctx: DistContext | None = None, B_global: int | None = None
    ) -> list[Selection]:
        """The training-time selection: BatchTopK per nested level, or one global BatchTopK."""
        B = acts_MBF.shape[1]
        if self.topk_mode == "per_level":
            return self._select_batch_topk(
                acts_MBF, list(self.dict_sizes), self.k_ML, B, ctx, B_global
            )
        full = self._select_batch_topk(
            acts_MBF, [self.n_latents], [k[:1] for k in self.k_ML], B, ctx, B_global
        )
        return self._split_levels(full)

    # ----- forward pieces ------------------------------------------------------------------------
    def pre_activations(self, x_BD: Tensor) -> Tensor:
        return dense_pre(x_BD, self.W_encoder, self.b_enc, self.b_dec)

    def activations(self, pre_MBF: Tensor, inplace: bool = False) -> Tensor:
        """What BatchTopK ranks: ReLU codes for nonnegative variants, the raw pre-activations
        else."""
        if not self.nonnegative:
            return pre_MBF
        return pre_MBF.relu_() if inplace else tnf.relu(pre_MBF)

    def decode(
        self, sels: list[Selection], vals: list[Tensor], B: int, impl: str = "dense"
    ) -> Tensor:
        """Reconstructions (L, M, B, D) of each level from its selection, decoding at prefix
        width."""
        M, F, L, D = self.n_models, self.n_latents, self.n_levels, self.d_in
        Wd = self.W_decoder
        b_dec = self.b_dec
        order = sorted(range(len(sels)), key=lambda i: (sels[i].level, sels[i].model))
        sels, vals = [sels[i] for i in order], [vals[i] for i in order]
        if impl == "sparse":
            # Bags (level, model, row) are sorted because each selection is row-major.
            rows = torch.cat([(s.level * M + s.model) * B + flat_row(s.flat, B, F) for s in sels])
            emb_idx = torch.cat([s.model * F + flat_latent(s.flat, F) for s in sels])
            v = torch.cat(vals)
            offsets = torch.searchsorted(rows, torch.arange(L * M * B, device=rows.device))
            W_flat = Wd.reshape(M * F, D)
            R = tnf.embedding_bag(
                emb_idx, W_flat.detach(), offsets, mode="sum", per_sample_weights=v.to(Wd.dtype)
            )
            if W_flat.requires_grad and torch.is_grad_enabled():
                key, order = torch.sort(emb_idx, stable=True)
                R = DecoderGradTap.apply(R, W_flat, rows[order], key, v.detach()[order])
            return R.view(L, M, B, D) + b_dec[None, :, None, :]
        out = torch.empty(L, M, B, D, device=Wd.device, dtype=torch.float32)
        for sel, v in zip(sels, vals, strict=False):
            Fl = self.dict_sizes[sel.level]
            rows, latent = flat_row(sel.flat, B, F), flat_latent(sel.flat, F)
            codes = torch.zeros(B, Fl, device=v.device, dtype=v.dtype).index_put((rows, latent), v)
            out[sel.level, sel.model] = (
                codes @ Wd[sel.model, :Fl].to(codes.dtype) + b_dec[sel.model]
            )
        return out

    def _sparse_selection(
        self, x_BD: Tensor, ctx: DistContext | None, B_global: int | None
    ) -> tuple[Tensor, list[Selection], Tensor]:
        """Selection with autograd on the selected entries only (never the (M, B, F) tensor)."""
        with torch.no_grad():
            acts = self.activations(self.pre_activations(x_BD), inplace=True)
            sels = self.train_selections(acts, ctx, B_global)
        flat_all = torch.cat([s.flat for s in sels])
        flat_u = torch.unique(flat_all)
        vals_u = EncodeAt.apply(
            acts.reshape(-1)[flat_u],
            flat_u,
            self.nonnegative,
            x_BD,
            self.W_encoder,
            self.b_enc,
            self.b_dec,
        )
        return acts, sels, vals_u[torch.searchsorted(flat_u, flat_all)]

    def _dense_selection(
        self, x_BD: Tensor, ctx: DistContext | None, B_global: int | None
    ) -> tuple[Tensor, list[Selection], Tensor]:
        acts = self.activations(self.pre_activations(x_BD))
        with torch.no_grad():
            sels = self.train_selections(acts.detach(), ctx, B_global)
        flat_all = torch.cat([s.flat for s in sels])
        return acts, sels, acts.reshape(-1)[flat_all]

    def _selection_stats(
        self, sels: list[Selection], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(l0_LM, fired_MF) of a list of selections."""
        M, F, L = self.n_models, self.n_latents, self.n_levels
        l0_LM = torch.tensor([[0] * M] * L, device=device, dtype=torch.int64)
        fired = torch.zeros(M * F, dtype=torch.bool, device=device)
        for s in sels:
            l0_LM[s.level, s.model] = s.flat.numel()
            fired[s.model * F + flat_latent(s.flat, F)] = True
        return l0_LM, fired.view(M, F)

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
        B = x_BD.shape[0]
        select = self._sparse_selection if impl == "sparse" else self._dense_selection
        acts, sels, vals_all = select(x_BD, ctx, B_global)
        vals = list(torch.split(vals_all, [s.flat.numel() for s in sels]))
        R_LMBD = self.decode(sels, vals, B, impl)
        loss = self._reconstruction_loss(R_LMBD, x_BD, B_global if ctx is not None else B)
        with torch.no_grad():
            sq = (R_LMBD.detach().float() - x_BD.float()[None, None]).pow_(2)
            sse_LM = sq.sum(dim=2).double().sum(-1)
            l0_LM, fired_MF = self._selection_stats(sels, x_BD.device)
        batch = TrainBatch(
            x_BD, acts, sels, vals, R_LMBD, ctx, B_global, dead_MF, auxk_k, auxk_alpha
        )
        extra_M, auxk_M = self.after_selection(batch)
        if extra_M is not None:
            loss = loss + extra_M.sum()
        if auxk_M is None:
            auxk_M = torch.zeros(self.n_models, device=x_BD.device)
        return ForwardOut(loss, sse_LM, l0_LM, auxk_M.detach(), fired_MF)

    def _reconstruction_loss(self, R_LMBD: Tensor, x_BD: Tensor, B_global: int) -> Tensor:
        """Sum over models of each model's mean over levels of its per-element MSE, as one fused
        ``mse_loss`` (one kernel forward and one backward: at small shapes the elementwise passes
        of an unfused loss cost more than the decode). Over ranks, each rank's share of the
        global-batch loss."""
        R = R_LMBD.float()
        scale = 1.0 / (self.n_levels * B_global * self.d_in)
        return tnf.mse_loss(R, x_BD.float()[None, None].expand_as(R), reduction="sum") * scale

    def auxk_loss(
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
        M, B, F = acts_MBF.shape
        k = min(k_aux, F)
        e_MBD = (x_BD.float()[None] - R_MBD.float()).detach()
        # Decode over the dead columns only (the union over models), as a dense bmm: k_aux is large
        # (D/2), so a gather-based sparse decode of B x k_aux rows costs more than this matmul.
        cols = dead_MF.any(0).nonzero().squeeze(1)
        W_dec = self.W_decoder
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
                codes = EncodeColumns.apply(
                    codes, cols, x_BD, self.W_encoder, self.b_enc, self.b_dec
                )
            e_hat = torch.bmm(codes.to(W_dec.dtype), W_dec[:, cols]).float()
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

    # ----- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_levels(self, x_BD: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
        """(sse_LM float64, l0_LM, fired_MF) of each level on a batch with the given selection mode.

        ``train``: BatchTopK as in training; ``inference``: the stored code's prefixes;
        ``sample_topk``: per-sample top-K per prefix; a variant may name more
        (``resolve_eval_mode``). ``fired_MF`` marks the latents nonzero in some row of the batch.
        """
        B = x_BD.shape[0]
        mode = self.resolve_eval_mode(mode)
        if mode == "train":
            acts = self.activations(self.pre_activations(x_BD))
            sels = self.train_selections(acts)
        elif mode == "sample_topk":
            acts = self.activations(self.pre_activations(x_BD))
            sels = self._select_sample_topk(acts)
        elif mode == "inference":
            acts = self.inference_codes(x_BD)
            sels = self._select_threshold(acts != 0)
        else:
            raise ValueError(mode)
        vals = [acts.reshape(-1)[s.flat] for s in sels]
        R = self.decode(sels, vals, B, "dense")
        sse = (R.float() - x_BD.float()[None, None]).pow(2).sum(dim=2).double().sum(-1)
        l0, fired = self._selection_stats(sels, x_BD.device)
        return sse, l0, fired

    # ----- JumpReLU thresholds -------------------------------------------------------------------
    def threshold_ranges(self) -> list[tuple[int, int]]:
        """Latent ranges that share one JumpReLU threshold: the nested levels' new latents
        [F_{i-1}, F_i) in per_level mode, the whole dictionary in global mode."""
        return (
            _prefix_pairs(self.dict_sizes)
            if self.topk_mode == "per_level"
            else [(0, self.n_latents)]
        )

    def expand_thresholds(self, thresholds_MR: Tensor) -> Tensor:
        """(M, F) per-latent thresholds from (M, R) per-range ones."""
        sizes = torch.tensor(
            [hi - lo for lo, hi in self.threshold_ranges()], device=thresholds_MR.device
        )
        return torch.repeat_interleave(thresholds_MR, sizes, dim=1)

    @torch.no_grad()
    def calibrate(self, x_ND: Tensor, batch_size: int = 4096) -> list[Calibration]:
        """*variant* (for ``calibrates``): set inference thresholds on held-out rows."""
        raise SailError(f"the {self.variant} variant has no calibrated thresholds")

    @torch.no_grad()
    def jumprelu_calibration(
        self, x_ND: Tensor, batch_size: int
    ) -> tuple[Tensor, list[Calibration]]:
        """(M, R) JumpReLU thresholds that make the stored code reproduce the last level's
        training selection, and how they were set.

        The stored code spans the whole dictionary. ``per_level``: the last level's BatchTopK
        (K_last, at the training batch size ``batch_size``) is run over the calibration rows and
        the selections are counted per range [F_{i-1}, F_i); range i's threshold then keeps exactly
        that many of its activations over all rows, so every range keeps its training share and
        L0 = K_last on these rows. ``global``: one range, the same rule with the single K. A range
        that never fired gets threshold ``inf`` and is reported (its latents are dead). Kept
        values are not shrunk.
        """
        N = x_ND.shape[0]
        if N == 0:
            raise SailError("cannot calibrate thresholds on an empty set of rows")
        ranges = self.threshold_ranges()
        counts_MR = self._training_selection_counts(x_ND, batch_size, ranges)
        thresholds_MR = self._thresholds_keeping(x_ND, batch_size, ranges, counts_MR)
        total_M = counts_MR.sum(1).clamp_min(1)
        found = [
            Calibration(
                rows=N,
                ranges=[list(r) for r in ranges],
                selected=counts_MR[m].tolist(),
                share=(counts_MR[m] / total_M[m]).tolist(),
                dead_ranges=[
                    list(r) for r, c in zip(ranges, counts_MR[m].tolist(), strict=False) if c == 0
                ],
            )
            for m in range(self.n_models)
        ]
        return thresholds_MR, found

    def _training_selection_counts(
        self, x_ND: Tensor, batch_size: int, ranges: list[tuple[int, int]]
    ) -> Tensor:
        """(M, R) number of the last level's BatchTopK picks per threshold range, over batches of
        x."""
        bounds = torch.tensor([hi for _, hi in ranges], device=x_ND.device)
        counts = torch.zeros(self.n_models, len(ranges), dtype=torch.int64, device=x_ND.device)
        k_last = [k[-1] for k in self.k_ML]
        for start in range(0, x_ND.shape[0], batch_size):
            acts_MBF = tnf.relu(self.pre_activations(x_ND[start : start + batch_size]))
            for m in range(self.n_models):
                flat = acts_MBF[m].reshape(-1)
                pick = topk_flat_sorted(flat, min(int(k_last[m]) * acts_MBF.shape[1], flat.numel()))
                latent = flat_latent(pick[flat[pick] > 0], self.n_latents)
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
            acts_MBF = tnf.relu(self.pre_activations(x_ND[start : start + batch_size]))
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

    # ----- per-model state -----------------------------------------------------------------------
    def model_state(self, m: int) -> dict[str, Tensor]:
        """Tensors of model m alone (what model.safetensors holds), named by ``state_names``."""
        return {n: getattr(self, n)[m].detach().clone().contiguous() for n in self.state_names}

    @torch.no_grad()
    def load_model_state(self, m: int, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            target = getattr(self, name)
            if tuple(target[m].shape) != tuple(value.shape):
                raise SailError(
                    f"tensor '{name}' has shape {tuple(value.shape)}, expected "
                    f"{tuple(target[m].shape)}"
                )
            target[m].copy_(value)
        self.after_load(m)


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
