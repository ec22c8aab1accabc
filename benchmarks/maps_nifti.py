"""Placing one volume's feature maps back into its voxel grid (`sail maps --volume --feature`):
seconds and peak memory of the inverse geometry and the NIfTI writes, per plane (JSON lines).

No model runs here (the maps are random grids): this measures what the export adds on top of one
encoder pass over the volume's slices. Default: a paper-sized CT (512 x 512 x 300 voxels at
0.8 x 0.8 x 1.5 mm, canonical style, resampled to 1.5 mm, stride 1) and BiomedParse's 32 x 32 grid.

python benchmarks/maps_nifti.py [--shape 512 512 300] [--spacing 0.8 0.8 1.5] [--grid 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from sail.data.slicing import PLANES, square_box
from sail.maps.nifti import PlaneLayout, place_slices, prepared_axes, write_nifti


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    ap.add_argument("--ct-spacing-mm", type=float, default=1.5)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--stride", type=int, default=1)
    args = ap.parse_args()
    shape = tuple(args.shape)
    affine = np.diag([*args.spacing, 1.0])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="sail-bench-") as tmp:
        for axis, plane in enumerate(PLANES):
            axes = prepared_axes(affine, shape, "ct", axis, "canonical", args.ct_spacing_mm)
            p_ax, q_ax = (axes[a] for a in range(3) if a != axis)
            r0, c0, side = square_box(q_ax.size, p_ax.size, "canonical", True)
            kept = np.arange(0, axes[axis].size, args.stride)
            layout = PlaneLayout(axis, kept, r0, c0, side, True, args.stride)
            maps = rng.standard_normal((len(kept), args.grid, args.grid)).astype(np.float32)
            t0 = time.perf_counter()
            values, filled = place_slices(axes, layout, maps)
            placed = time.perf_counter() - t0
            t0 = time.perf_counter()
            write_nifti(Path(tmp) / f"{plane}.nii.gz", values, affine, None, "bench")
            written = time.perf_counter() - t0
            print(
                json.dumps(
                    {
                        "what": "maps_nifti",
                        "plane": plane,
                        "shape": list(shape),
                        "spacing_mm": args.spacing,
                        "slices": len(kept),
                        "grid": args.grid,
                        "device": f"cpu x{os.cpu_count()} ({platform.machine()})",
                        "place_s": round(placed, 3),
                        "write_s": round(written, 3),
                        "filled_fraction": round(float(filled.mean()), 4),
                        "peak_rss_mb": round(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                        ),
                    }
                )
            )


if __name__ == "__main__":
    main()
