"""Data-parallel SAE training over torch.distributed (torchrun environment variables).

Every rank holds the whole training matrix and takes its contiguous slice of each global batch,
so the union of the rank batches is the single-process batch. What a single process computes from
the whole batch is agreed across ranks: the BatchTopK threshold (k*B_global-th value per level and
model), sail's θ statistic (minimum kept value), the AuxK normalisation, fired latents (dead
counters) and the summed gradients. Ties at the global threshold are broken in global row-major
order (rank slices are contiguous), a deterministic rule where one process lets ``topk`` choose;
in practice ties only occur between zero-valued ReLU entries, which change neither the
reconstruction nor the gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_bounds(self, n: int) -> tuple[int, int]:
        """Contiguous [lo, hi) of a global batch of n rows held by this rank."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """(world_size, *t.shape): every rank's tensor, in rank order (same shape on all ranks)."""
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def barrier(self) -> None:
        dist.barrier()


def from_env(device: torch.device) -> DistContext | None:
    """The group torchrun describes (WORLD_SIZE > 1), initialised once; None for one process.

    nccl on CUDA, gloo on CPU; the caller maps ``cuda`` to ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """One GPU per rank: ``cuda`` (or any cuda index) becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def global_topk_flat(flats: list[Tensor], ks: list[int], ctx: DistContext) -> list[Tensor]:
    """Indices (sorted) into each local ``flats[i]`` of the global top ``ks[i]`` entries.

    One all_gather of every rank's local top candidates (padded with -inf) fixes each threshold;
    a second gathers the counts above and at it to share out the tied entries in rank order.
    """
    P = len(flats)
    kmax = max(ks)
    dev = flats[0].device
    cand = torch.full((P, kmax), -torch.inf, device=dev, dtype=torch.float32)
    for i, (f, k) in enumerate(zip(flats, ks, strict=False)):
        kk = min(k, f.numel())
        if kk:
            cand[i, :kk] = f.float().topk(kk, sorted=False).values
    allc = ctx.all_gather(cand).transpose(0, 1).reshape(P, -1)  # (P, world*kmax)
    thr = torch.stack([allc[i].topk(k).values[-1] for i, k in enumerate(ks)])
    counts = torch.stack(
        [
            torch.stack([(f.float() > thr[i]).sum(), (f.float() == thr[i]).sum()])
            for i, f in enumerate(flats)
        ]
    )  # (P, 2)
    allcounts = ctx.all_gather(counts)  # (world, P, 2)
    n_gt = allcounts[:, :, 0].sum(0)
    eq_before = allcounts[: ctx.rank, :, 1].sum(0)
    need_eq = torch.tensor(ks, device=dev) - n_gt
    take = (need_eq - eq_before).clamp(min=0).minimum(counts[:, 1]).tolist()
    out = []
    for i, f in enumerate(flats):
        ff = f.float()
        above = (ff > thr[i]).nonzero().squeeze(1)
        tied = (ff == thr[i]).nonzero().squeeze(1)[: int(take[i])]
        out.append(torch.cat([above, tied]).sort().values)
    return out
