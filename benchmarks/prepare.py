"""Slices per second of `sail prepare` on a phantom dataset (one JSON line per setting).

python benchmarks/prepare.py [--n-ct 8] [--n-mri 4] [--size 64] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from sail.config import PhantomConfig, SailConfig
from sail.data.phantom import write_phantom_dataset
from sail.data.prepare import run_prepare
from sail.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-ct", type=int, default=8)
    ap.add_argument("--n-mri", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--ct-spacing-mm", type=float, default=3.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sail-bench-"))
    try:
        t0 = time.perf_counter()
        src = write_phantom_dataset(
            tmp / "ts", PhantomConfig(n_ct=args.n_ct, n_mri=args.n_mri, size=args.size, seed=0)
        )
        phantom_s = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "what": "phantom",
                    "scans": args.n_ct + args.n_mri,
                    "size": args.size,
                    "seconds": round(phantom_s, 2),
                    "scans_per_s": round((args.n_ct + args.n_mri) / phantom_s, 2),
                }
            )
        )
        for workers in args.workers:
            ws = Workspace(tmp / f"w{workers}")
            cfg = SailConfig(
                workspace=ws.root,
                prepare={
                    "source": src,
                    "image_size": args.image_size,
                    "ct_spacing_mm": args.ct_spacing_mm,
                    "workers": workers,
                },
            )
            t0 = time.perf_counter()
            run_prepare(cfg, ws)
            seconds = time.perf_counter() - t0
            n = len(pd.read_parquet(ws.slices_table, columns=["slice_id"]))
            print(
                json.dumps(
                    {
                        "what": "prepare",
                        "config": {
                            "image_size": args.image_size,
                            "ct_spacing_mm": args.ct_spacing_mm,
                            "phantom_size": args.size,
                            "workers": workers,
                        },
                        "device": (
                            f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"
                        ),
                        "slices": n,
                        "seconds": round(seconds, 2),
                        "samples_per_s": round(n / seconds, 1),
                        "peak_rss_mb": round(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                        ),
                    }
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
