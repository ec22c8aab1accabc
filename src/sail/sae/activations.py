"""Batched SAE inference over every split, written as sparse (CSR-shaped) Arrow list columns.

Each batch is encoded on the device, its nonzeros are taken in row-major order (so they are CSR
already) and only those leave the device: no dense (N, D) matrix and no per-row Python.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from sail.artifacts import SAE_CFG as CFG
from sail.artifacts import SAE_WEIGHTS as WEIGHTS
from sail.artifacts import read_cfg
from sail.config import SailConfig
from sail.device import resolve_device
from sail.errors import SailError
from sail.sae.activations_io import write_activations
from sail.sae.api import SAE, load_sae
from sail.sae.model import StackedSAE
from sail.sae.train import EmbeddingData, load_data
from sail.workspace import StageRecord, Workspace, fingerprint, hash_config, is_done, mark_done

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_csr(
    sae: SAE | StackedSAE,
    x_ND: np.ndarray,
    batch_size: int = 8192,
    device: torch.device | None = None,
) -> sp.csr_matrix:
    """Stored codes (``SAE.encode``) of raw embeddings ``x_ND`` as float32 CSR (N, F); a
    one-model stack is taken as trained (L2-normalised input)."""
    if isinstance(sae, StackedSAE):
        sae = SAE.from_stack(sae)
    device = device or sae.device
    n, F = x_ND.shape[0], sae.d_sae
    counts, cols, vals = [], [], []
    for start in range(0, n, batch_size):
        xb = torch.from_numpy(
            np.require(x_ND[start : start + batch_size], np.float32, ["C", "W"])
        ).to(device)
        codes = sae.encode(xb)
        nz = codes.nonzero()
        counts.append(torch.bincount(nz[:, 0], minlength=xb.shape[0]).cpu())
        cols.append(nz[:, 1].to(torch.int32).cpu())
        vals.append(codes[nz[:, 0], nz[:, 1]].float().cpu())
    indptr = np.zeros(n + 1, dtype=np.int64)
    if n:
        np.cumsum(torch.cat(counts).numpy(), out=indptr[1:])
    indices = torch.cat(cols).numpy() if cols else np.zeros(0, np.int32)
    data = torch.cat(vals).numpy() if vals else np.zeros(0, np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n, F))


def _sae_dirs(ws: Workspace, encoder: str, variants: list[str], sae_config: str) -> list[Path]:
    root = ws.sae_root / encoder
    dirs = sorted(p.parent for p in root.glob(f"*/*/{CFG}") if (p.parent / WEIGHTS).is_file())
    if variants:
        dirs = [d for d in dirs if d.parent.name in variants]
    if sae_config != "all":
        dirs = [d for d in dirs if d.name == sae_config]
    return dirs


def export_sae(
    ws: Workspace,
    sae_dir: Path,
    data: EmbeddingData,
    splits: list[str],
    batch_size: int,
    device: torch.device,
    force: bool = False,
    verify: bool = True,
) -> list[Path]:
    """Write activations/<encoder>/<variant>/<config>/<split>.parquet for one checkpoint."""
    variant, name = sae_dir.parent.name, sae_dir.name
    record = StageRecord(
        "activations",
        hash_config({"codes": "inference", "format": "slice_id,idx,val"}),
        {"model": fingerprint(sae_dir / WEIGHTS), "cfg": fingerprint(sae_dir / CFG), **data.inputs},
    )
    outs = [ws.activations(data.encoder, variant, name, split) for split in splits]
    if not force and all(is_done(o, record) for o in outs):
        log.info("activations %s/%s/%s: up to date", data.encoder, variant, name)
        return outs
    sae = load_sae(sae_dir, device, verify=verify)
    cfg = sae.cfg
    if sae.d_in != data.x_ND.shape[1]:
        raise SailError(
            f"{sae_dir / CFG}: d_in {sae.d_in} does not match {data.encoder} embeddings of width "
            f"{data.x_ND.shape[1]}"
        )
    for split, out in zip(splits, outs, strict=False):
        rows = data.rows(split)
        codes = encode_csr(sae, data.x_ND[rows], batch_size, device)
        meta = {
            "encoder": data.encoder,
            "variant": variant,
            "sae_config": name,
            "split": split,
            "dict_sizes": cfg["dict_sizes"],
            "inference": cfg["inference"],
        }
        write_activations(out, data.slice_ids[rows], codes, meta)
        mark_done(out, record, {"rows": int(codes.shape[0]), "nnz": int(codes.nnz)})
        log.info(
            "activations %s/%s/%s/%s: %d rows, mean L0 %.1f",
            data.encoder,
            variant,
            name,
            split,
            codes.shape[0],
            codes.nnz / max(codes.shape[0], 1),
        )
    return outs


def run_activations(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    """Pipeline stage: export the codes of every trained SAE (filtered by the section) per split."""
    ac = cfg.activations
    device = resolve_device(ac.device)
    if ac.embeddings is not None:
        name = ac.name or Path(ac.embeddings).stem
        targets = [(name, ac.embeddings)]
    elif ac.encoders:
        targets = [(e, None) for e in ac.encoders]
    else:
        targets = [(p.name, None) for p in sorted(ws.sae_root.glob("*")) if p.is_dir()]
    if not targets:
        raise SailError(f"no trained SAEs in {ws.sae_root}; run `sail train` first")
    for encoder, table in targets:
        dirs = _sae_dirs(ws, encoder, list(ac.variants), ac.sae_config)
        if not dirs:
            raise SailError(
                f"no trained SAE matches encoder {encoder!r}, variants "
                f"{list(ac.variants) or 'all'}, config {ac.sae_config!r}"
            )
        split_info = read_cfg(dirs[0]).get("split") or {}
        data = load_data(
            ws,
            encoder=None if table else encoder,
            embeddings=table,
            name=encoder,
            group_by=split_info.get("group_by") or ac.group_by,
            seed=split_info.get("seed", 42),
        )
        for sae_dir in dirs:
            export_sae(
                ws,
                sae_dir,
                data,
                list(ac.splits),
                ac.batch_size,
                device,
                force,
                ac.verify_checkpoints,
            )
