"""The ``--shard i/n`` syntax, shared by ``sail encode`` and ``sail train``.

What a shard takes is each stage's own rule, named where it is applied: encode gives shard i the
chunks i, i+n, i+2n, ... of the slice list (strided, so shards finish together;
:func:`sail.encoders.encode.encode_shard` also reads torchrun's RANK/WORLD_SIZE), train gives it a
contiguous block of the grid (:func:`sail.sae.grid.shard_entries`, so families stay whole).
"""

from __future__ import annotations

import re

from sail.errors import SailError


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n (shards are numbered from 0) -> (i, n)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m:
        raise SailError(f"--shard {shard!r}: expected i/n, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if not 0 <= i < n:
        raise SailError(f"--shard {shard!r}: need 0 <= i < n (shards are numbered from 0)")
    return i, n
