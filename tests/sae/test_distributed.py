"""Data-parallel training: 2 gloo ranks on CPU equal 1 process on the same global batches."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sail.config import TrainingSettings
from sail.sae.distributed import DistContext, global_topk_flat
from sail.sae.grid import GridEntry
from sail.sae.model import SAESpec
from sail.sae.train import Runtime, train_family
from tests.sae.conftest import planted

# Ranks sum gradients and metric sums in a different order than one process does, so weights
# agree to float32 rounding (measured max |diff| <= 1.2e-7 on these configs), not bit for bit.
ATOL = 1e-5
WORLD = 2
EPOCHS = 2


def _setup():
    # 600 rows, batch 64: 10 steps per epoch, the last one 24 rows (12 per rank).
    x, _ = planted(700, 16, 24, 3, seed=1)
    settings = TrainingSettings(
        epochs=EPOCHS, batch_size=64, lr=3e-3, dead_window=200, auxk_k=8, seed=0
    )
    families = {
        "matryoshka": [
            SAESpec("matryoshka", (8, 32), (2, 4)),
            SAESpec("matryoshka", (8, 32), (3, 6)),
        ],
        "matryoshka-global": [SAESpec("matryoshka", (8, 32), (4,), "global")],
        "sail": [SAESpec("sail", (8, 32), (2, 4))],
    }
    return x[:600], x[600:], settings, families


def _train_all(rt: Runtime, root) -> dict:
    x, xv, settings, families = _setup()
    out = {}
    for name, specs in families.items():
        dirs = [root / name / str(i) for i in range(len(specs))]
        r = train_family([GridEntry(s, settings) for s in specs], x, xv, dirs, rt)
        state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        out[name] = {"state": state, "metrics": [m.copy() for m in r.metrics]}
    return out


def _worker(rank: int, port: int, root) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        rt = Runtime(
            torch.device("cpu"),
            "fp32",
            "sparse",
            log_every=5,
            show_progress=False,
            dist=DistContext(rank, WORLD),
        )
        torch.save(_train_all(rt, root / f"rank{rank}"), root / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # fork: the children skip re-importing torch and sail (spawn costs ~10 s here); they only
    # run single-threaded CPU code, so forking a process that used OpenMP is safe.
    mp.start_processes(
        _worker, args=(_free_port(), root), nprocs=WORLD, join=True, start_method="fork"
    )
    ranks = [torch.load(root / f"result{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _train_all(
        Runtime(torch.device("cpu"), "fp32", "sparse", log_every=5, show_progress=False),
        root / "single",
    )
    return single, ranks, root


def test_two_ranks_hold_bit_identical_weights(runs):
    _, (r0, r1), _ = runs
    for fam in r0:
        for k, v in r0[fam]["state"].items():
            assert torch.equal(v, r1[fam]["state"][k]), (fam, k)


@pytest.mark.parametrize("family", ["matryoshka", "matryoshka-global", "sail"])
def test_two_ranks_equal_one_process(runs, family):
    single, (r0, _), _ = runs
    a, b = single[family]["state"], r0[family]["state"]
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(
                b[k], v, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{family}.{k}: {m}"
            )
        else:
            assert torch.equal(b[k], v), (family, k)
    for ma, mb in zip(single[family]["metrics"], r0[family]["metrics"], strict=True):
        assert ma[["step", "epoch", "split", "level"]].equals(
            mb[["step", "epoch", "split", "level"]]
        )
        # BatchTopK keeps the same K*B entries, so training L0 is exact; dead_frac comes from the
        # synced counters. The final row uses calibrated thresholds, equal only to rounding.
        during = ma["epoch"] < EPOCHS
        assert (ma["l0"][during] == mb["l0"][during]).all()
        torch.testing.assert_close(
            torch.tensor(mb["l0"].to_numpy(copy=True)),
            torch.tensor(ma["l0"].to_numpy(copy=True)),
            atol=0,
            rtol=0.01,
        )
        assert (ma["dead_frac"] == mb["dead_frac"]).all()
        fa, fb = (
            torch.tensor(ma["fvu"].to_numpy(copy=True)),
            torch.tensor(mb["fvu"].to_numpy(copy=True)),
        )
        keep = torch.tensor(during.to_numpy(copy=True))
        torch.testing.assert_close(fb[keep], fa[keep], atol=1e-6, rtol=0)
        torch.testing.assert_close(fb, fa, atol=1e-3, rtol=0)


def test_only_rank_zero_writes_train_state(runs):
    _, _, root = runs
    assert list((root / "rank0").rglob("train_state.pt"))
    assert not list((root / "rank1").rglob("*"))


def test_global_topk_shares_ties_in_rank_order():
    class OneRankOfTwo(DistContext):
        """Rank 1 of 2 where rank 0 holds ``peer``: all_gather stacks (peer's, ours)."""

        def __init__(self, peer):
            super().__init__(1, 2)
            object.__setattr__(self, "peer", peer)

        def all_gather(self, t):
            return torch.stack([self.peer.pop(0), t])

    # Rank 0 holds [3, 1, 1], rank 1 holds [1, 2, 1]; top 4 = {3, 2} and the first two 1s globally,
    # both of which are rank 0's, so rank 1 keeps only its 2.
    peer = [torch.tensor([[3.0, 1.0, 1.0, -torch.inf]]), torch.tensor([[1, 2]])]
    (kept,) = global_topk_flat([torch.tensor([1.0, 2.0, 1.0])], [4], OneRankOfTwo(peer))
    assert kept.tolist() == [1]
