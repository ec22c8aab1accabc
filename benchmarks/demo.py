"""Wall time per stage of `sail demo` (one JSON line per stage, then the total).

python benchmarks/demo.py [--workspace DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from sail.config import load_config
from sail.pipeline import STAGES, demo_config_path, run_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="default: a temporary folder, removed afterwards",
    )
    args = ap.parse_args()
    root = args.workspace or Path(tempfile.mkdtemp(prefix="sail-demo-bench-"))
    cfg = load_config(demo_config_path(), {"workspace": root})
    total = 0.0
    try:
        for stage in STAGES:
            t0 = time.perf_counter()
            run_pipeline(cfg, stage.name, stage.name, force=True)
            seconds = time.perf_counter() - t0
            total += seconds
            print(
                json.dumps(
                    {
                        "what": "demo_stage",
                        "stage": stage.name,
                        "device": f"cpu x{os.cpu_count()}",
                        "seconds": round(seconds, 2),
                    }
                ),
                flush=True,
            )
        print(
            json.dumps(
                {
                    "what": "demo_total",
                    "device": f"cpu x{os.cpu_count()}",
                    "seconds": round(total, 2),
                    "peak_rss_mb": round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                    ),
                }
            )
        )
    finally:
        if args.workspace is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
