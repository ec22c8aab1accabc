"""The slice identity ``modality/image_id/plane/slice_idx`` and the volume it belongs to.

Slices of one volume are not independent samples: held-out rows, p-values and enrichment count
volumes, and every such count takes the volume from here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

VOLUME_ID = r"^([^/]+/[^/]+)/[^/]+/[^/]+$"  # modality/image_id of modality/image_id/plane/slice_idx


def volume_ids(slice_ids) -> np.ndarray:
    """The volume (``modality/image_id``) of each slice_id; an id of another shape is its own
    volume."""
    ids = pd.Series(np.asarray(slice_ids, dtype=object), dtype=object).astype(str)
    return ids.str.extract(VOLUME_ID, expand=False).fillna(ids).to_numpy(dtype=object)


def volume_codes(rows: pd.DataFrame) -> np.ndarray:
    """An integer per row, shared by the rows of one volume ((modality, image_id): CT and MRI
    reuse ids), numbered in order of first appearance."""
    keys = pd.MultiIndex.from_frame(rows[["modality", "image_id"]].astype(str))
    return keys.factorize()[0].astype(np.int64)
