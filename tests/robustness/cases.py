"""The corpus: bad inputs per stage, each with the command it breaks and what the error must name.

A case's ``setup(ctx)`` damages the private workspace copy (or writes a bad input beside it) and
returns the CLI arguments; ``expect`` is a regex the single ``error:`` line must match.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from safetensors.torch import load_file, save_file

from sail.encoders.table import write_embeddings


@dataclass
class Ctx:
    ws: Path
    tmp: Path
    src: Path
    cfg: Path
    patches: list[tuple[str, Callable]] = field(default_factory=list)

    def common(self) -> list[str]:
        return ["-c", str(self.cfg), "-w", str(self.ws)]

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def config(self, extra: dict) -> list[str]:
        """The tiny config with ``extra`` merged in (one level deep)."""
        raw = yaml.safe_load(self.cfg.read_text())
        for key, value in extra.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        path = self.write("cfg-extra.yaml", yaml.safe_dump(raw))
        return ["-c", str(path), "-w", str(self.ws)]

    def sae_dir(self) -> Path:
        return next((self.ws / "sae" / "toy" / "matryoshka").iterdir())

    def source_copy(self) -> Path:
        dst = self.tmp / "src"
        shutil.copytree(self.src, dst)
        return dst

    def table(self, name: str, ids, x) -> Path:
        path = self.tmp / name
        write_embeddings(path, ids, np.asarray(x, dtype=np.float32))
        return path

    def slice_ids(self) -> np.ndarray:
        return pd.read_parquet(
            self.ws / "data" / "slices.parquet", columns=["slice_id"]
        ).slice_id.to_numpy()

    def grid(self, configs) -> str:
        return str(self.write("grid.yaml", yaml.safe_dump({"configs": configs})))


@dataclass
class Case:
    id: str
    stage: str
    setup: Callable[[Ctx], list[str]]
    expect: str


def _os_error(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code), kwargs.get("dir") or "<ws>")

    return fail


def _allocation_failure(*args, **kwargs):
    """What torch raises when the allocator cannot satisfy a request."""
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 51539607552000 bytes. Error code 12 (Cannot allocate memory)"
    )


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a parquet file" * 10)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _rewrite_weights(ctx: Ctx, edit: Callable[[dict], dict]) -> None:
    """A checkpoint edited consistently: its cfg.json hash updated, so only the content is wrong."""
    d = ctx.sae_dir()
    state = edit(load_file(str(d / "model.safetensors")))
    save_file(state, str(d / "model.safetensors"))
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "cfg.json").write_text(json.dumps(cfg))


def _nan_weights(state: dict) -> dict:
    state["W_enc"][0, 0] = float("nan")
    return state


def _drop_decoder(state: dict) -> dict:
    state.pop("W_dec")
    return state


def _meta(ctx: Ctx, edit: Callable[[str], str]) -> Path:
    src = ctx.source_copy()
    meta = src / "CT_Dataset_v201" / "meta.csv"
    meta.write_text(edit(meta.read_text(encoding="utf-8-sig")), encoding="utf-8")
    return src


def _no_images(ctx: Ctx) -> Path:
    src = ctx.source_copy()
    for image in src.glob("*/*/*.nii.gz"):
        image.unlink()
    return src


def _dup_line(text: str) -> str:
    lines = text.splitlines()
    return "\n".join([*lines, lines[1]]) + "\n"


def _empty_test_split(ctx: Ctx) -> list[str]:
    """What a dataset without institutes A, D, E gives: a test split with no scans, so test codes
    with no rows (the activations stage writes such a table)."""
    from sail.sae.activations_io import read_activations, write_activations

    for test in (ctx.ws / "activations").rglob("test.parquet"):
        ids, codes, meta = read_activations(test)
        write_activations(
            test, ids[:0], codes[:0], {k: v for k, v in meta.items() if k != "n_features"}
        )
        manifest = test.with_name(test.name + ".manifest.json")
        if (
            manifest.exists() and "integrity" in manifest.read_text()
        ):  # what the activations stage wrote
            from sail.workspace import table_integrity

            manifest.write_text(
                json.dumps({**json.loads(manifest.read_text()), "integrity": table_integrity(test)})
            )
    return [
        "interpret",
        "language",
        *ctx.config({"interpret": {"verbs": ["language"], "language": {"eligible": "all"}}}),
    ]


def _rng_x(n: int, d: int = 16) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, d))


CASES: list[Case] = [
    # --- config and the workspace itself ---------------------------------------------------------
    Case(
        "missing-config-file",
        "config",
        lambda c: ["split", "-c", str(c.tmp / "nope.yaml"), "-w", str(c.ws)],
        r"nope\.yaml",
    ),
    Case(
        "yaml-syntax",
        "config",
        lambda c: ["split", "-c", str(c.write("bad.yaml", "split: [unclosed\n")), "-w", str(c.ws)],
        r"bad\.yaml.*YAML",
    ),
    Case(
        "unknown-key",
        "config",
        lambda c: ["split", *c.config({"prepare": {"imag_size": 3}})],
        r"prepare\.imag_size",
    ),
    Case(
        "bad-fraction",
        "config",
        lambda c: ["split", *c.config({"split": {"train_fraction": 2}})],
        r"split\.train_fraction",
    ),
    Case(
        "workspace-is-a-file",
        "config",
        lambda c: ["split", "-c", str(c.cfg), "-w", str(c.write("afile", "x"))],
        r"afile: a file is in the way",
    ),
    Case(
        "read-only-workspace",
        "config",
        lambda c: (
            c.patches.append(("tempfile.mkstemp", _os_error(errno.EROFS))),
            ["split", "--force", *c.common()],
        )[1],
        r"ws: read-only file system",
    ),
    Case(
        "disk-full",
        "config",
        lambda c: (
            c.patches.append(("tempfile.mkstemp", _os_error(errno.ENOSPC))),
            ["split", "--force", *c.common()],
        )[1],
        r"ws: no space left",
    ),
    Case(
        "permission-denied",
        "config",
        lambda c: (
            c.patches.append(("tempfile.mkstemp", _os_error(errno.EACCES))),
            ["split", "--force", *c.common()],
        )[1],
        r"ws: permission denied",
    ),
    Case(
        "unknown-stage",
        "config",
        lambda c: ["run", "--from", "nosuch", *c.common()],
        r"--from 'nosuch'",
    ),
    # --- prepare ---------------------------------------------------------------------------------
    Case(
        "source-missing",
        "prepare",
        lambda c: ["prepare", "--source", str(c.tmp / "nosuch"), *c.common()],
        r"dataset folder not found: .*nosuch",
    ),
    Case(
        "source-empty",
        "prepare",
        lambda c: [
            "prepare",
            "--source",
            str((c.tmp / "empty").mkdir() or c.tmp / "empty"),
            *c.common(),
        ],
        r"empty: no CT_Dataset_v201 or MRI_Dataset_v200 folder",
    ),
    Case(
        "meta-csv-missing",
        "prepare",
        lambda c: [
            "prepare",
            "--source",
            str(
                _meta(c, lambda t: t).joinpath("CT_Dataset_v201", "meta.csv").unlink()
                or c.tmp / "src"
            ),
            *c.common(),
        ],
        r"CT_Dataset_v201/meta\.csv",
    ),
    Case(
        "meta-column-missing",
        "prepare",
        lambda c: [
            "prepare",
            "--source",
            str(_meta(c, lambda t: t.replace("gender", "sex_of_patient"))),
            *c.common(),
        ],
        r"meta\.csv: missing required column.*gender",
    ),
    Case(
        "meta-duplicate-id",
        "prepare",
        lambda c: ["prepare", "--source", str(_meta(c, _dup_line)), *c.common()],
        r"meta\.csv: duplicate image_id",
    ),
    Case(
        "every-scan-skipped",
        "prepare",
        lambda c: ["prepare", "--source", str(_no_images(c)), *c.common()],
        r"every scan was skipped; reasons in .*skipped\.failed\.csv",
    ),
    Case(
        "image-size-too-small",
        "prepare",
        lambda c: ["prepare", "--image-size", "3", *c.common()],
        r"prepare\.image_size",
    ),
    Case(
        "unknown-style",
        "prepare",
        lambda c: ["prepare", "--style", "weird", *c.common()],
        r"prepare\.style",
    ),
    # --- split -----------------------------------------------------------------------------------
    Case(
        "no-slices-table",
        "split",
        lambda c: ["split", "-c", str(c.cfg), "-w", str(c.tmp / "fresh")],
        r"slices\.parquet not found",
    ),
    Case(
        "slices-table-garbage",
        "split",
        lambda c: (_garbage(c.ws / "data" / "slices.parquet"), ["split", "--force", *c.common()])[
            1
        ],
        r"slices\.parquet: not a readable Parquet",
    ),
    Case(
        "slices-table-truncated",
        "split",
        lambda c: (_truncate(c.ws / "data" / "slices.parquet"), ["split", "--force", *c.common()])[
            1
        ],
        r"slices\.parquet",
    ),
    Case(
        "train-fraction-zero",
        "split",
        lambda c: ["split", *c.config({"split": {"train_fraction": 0}})],
        r"split\.train_fraction",
    ),
    Case(
        "test-institutes-not-list",
        "split",
        lambda c: ["split", *c.config({"split": {"test_institutes": 5}})],
        r"split\.test_institutes",
    ),
    Case(
        "seed-not-int",
        "split",
        lambda c: ["split", *c.config({"split": {"seed": "abc"}})],
        r"split\.seed",
    ),
    Case(
        "split-unknown-key",
        "split",
        lambda c: ["split", *c.config({"split": {"fraction": 0.5}})],
        r"split\.fraction",
    ),
    # --- encode / import-embeddings ---------------------------------------------------------------
    Case(
        "import-missing-file",
        "encode",
        lambda c: ["import-embeddings", str(c.tmp / "nope.parquet"), "--name", "x", *c.common()],
        r"nope\.parquet",
    ),
    Case(
        "import-duplicate-ids",
        "encode",
        lambda c: [
            "import-embeddings",
            str(
                c.table(
                    "dup.parquet",
                    np.r_[c.slice_ids(), c.slice_ids()[:1]],
                    _rng_x(len(c.slice_ids()) + 1),
                )
            ),
            "--name",
            "x",
            *c.common(),
        ],
        r"dup\.parquet: column 'slice_id' has duplicates",
    ),
    Case(
        "import-nan",
        "encode",
        lambda c: [
            "import-embeddings",
            str(
                c.table(
                    "nan.parquet",
                    c.slice_ids(),
                    np.where(
                        np.arange(len(c.slice_ids()))[:, None] == 3,
                        np.nan,
                        _rng_x(len(c.slice_ids())),
                    ),
                )
            ),
            "--name",
            "x",
            *c.common(),
        ],
        r"nan\.parquet: .*row",
    ),
    Case(
        "import-no-slice-id",
        "encode",
        lambda c: [
            "import-embeddings",
            str(c.tmp / "noid.parquet")
            if pd.DataFrame({"id": ["a"], "v": [1.0]}).to_parquet(c.tmp / "noid.parquet") is None
            else "",
            "--name",
            "x",
            *c.common(),
        ],
        r"noid\.parquet: missing column 'slice_id'",
    ),
    Case(
        "import-garbage",
        "encode",
        lambda c: [
            "import-embeddings",
            str((c.tmp / "g.parquet").write_bytes(b"junk" * 50) and c.tmp / "g.parquet"),
            "--name",
            "x",
            *c.common(),
        ],
        r"g\.parquet: not a readable Parquet",
    ),
    Case(
        "import-bad-name",
        "encode",
        lambda c: ["import-embeddings", str(c.tmp / "x.parquet"), "--name", "../evil", *c.common()],
        r"--name '\.\./evil'",
    ),
    Case(
        "encode-unknown-encoder",
        "encode",
        lambda c: ["encode", "--encoder", "nosuch", *c.common()],
        r"nosuch",
    ),
    Case(
        "encode-bad-shard",
        "encode",
        lambda c: ["encode", "--encoder", "random-dinov3", "--shard", "5/2", *c.common()],
        r"shard",
    ),
    Case(
        "merge-without-parts",
        "encode",
        lambda c: ["encode", "--merge", "--name", "ghost", *c.common()],
        r"ghost\.parts: no encoding parts",
    ),
    Case(
        "encode-bad-precision",
        "encode",
        lambda c: ["encode", "--precision", "fp8", *c.common()],
        r"encode\.precision",
    ),
    # --- train ------------------------------------------------------------------------------------
    Case(
        "train-duplicate-ids",
        "train",
        lambda c: [
            "train",
            "--embeddings",
            str(
                c.table(
                    "dup.parquet", [f"v{i // 10}/{i}" for i in range(60)] + ["v0/0"], _rng_x(61)
                )
            ),
            *c.common(),
        ],
        r"dup\.parquet: column 'slice_id' has duplicates, e\.g\. 'v0/0'",
    ),
    Case(
        "train-constant",
        "train",
        lambda c: [
            "train",
            "--embeddings",
            str(
                c.table("const.parquet", [f"v{i // 10}/{i}" for i in range(60)], np.ones((60, 16)))
            ),
            *c.common(),
        ],
        r"const\.parquet: every row holds the same direction",
    ),
    Case(
        "train-zero-row",
        "train",
        lambda c: [
            "train",
            "--embeddings",
            str(
                c.table(
                    "zero.parquet",
                    [f"v{i // 10}/{i:02d}" for i in range(60)],
                    np.where(np.arange(60)[:, None] == 5, 0.0, _rng_x(60)),
                )
            ),
            *c.common(),
        ],
        r"zero\.parquet: row 5 .*all-zero",
    ),
    Case(
        "grid-k-not-int",
        "train",
        lambda c: [
            "train",
            "--grid",
            c.grid([{"dict_sizes": [8, 16], "k_values": ["a", 8.5]}]),
            *c.common(),
        ],
        r"configs\[0\]\.k_values\[0\]: 'a' is not a positive integer",
    ),
    Case(
        "grid-size-float",
        "train",
        lambda c: [
            "train",
            "--grid",
            c.grid([{"dict_sizes": [8, 64.9], "k_values": [2, 4]}]),
            *c.common(),
        ],
        r"configs\[0\]\.dict_sizes\[1\]: 64\.9 is not a positive integer",
    ),
    Case(
        "grid-k-bool",
        "train",
        lambda c: [
            "train",
            "--grid",
            c.grid([{"dict_sizes": [8, 16], "k_values": [True, 4]}]),
            *c.common(),
        ],
        r"configs\[0\]\.k_values\[0\]: True is not a positive integer",
    ),
    Case(
        "grid-all-dropped",
        "train",
        lambda c: [
            "train",
            "--grid",
            c.grid([{"dict_sizes": [4, 8], "k_values": [5, 9]}]),
            *c.common(),
        ],
        r"every config was dropped: configs\[0\] matryoshka D_4_8_K_5_9 \(a K exceeds",
    ),
    Case(
        "grid-empty",
        "train",
        lambda c: ["train", "--grid", c.grid([]), *c.common()],
        r"'configs' is empty",
    ),
    Case(
        "grid-absurd-size",
        "train",
        lambda c: [
            "train",
            "--grid",
            c.grid([{"dict_sizes": [8, 1_000_000_000_000], "k_values": [2, 4]}]),
            *c.common(),
        ],
        r"D_8_1000000000000_K_2_4.*needs about [\d,.]+ GiB",
    ),
    Case(
        "train-group-by-missing",
        "train",
        lambda c: [
            "train",
            "--embeddings",
            str(c.table("g.parquet", [f"v{i // 10}/{i:02d}" for i in range(60)], _rng_x(60))),
            "--group-by",
            "patient",
            *c.common(),
        ],
        r"--group-by column 'patient' not found",
    ),
    Case(
        "train-embeddings-missing",
        "train",
        lambda c: ["train", "--embeddings", str(c.tmp / "nope.parquet"), *c.common()],
        r"nope\.parquet",
    ),
    Case(
        "train-allocation-failure",
        "train",
        lambda c: (
            c.patches.append(("sail.sae.train.train_family", _allocation_failure)),
            ["train", "--force", *c.common()],
        )[1],
        r"out of memory \(RuntimeError: .*can't allocate memory.*\); use smaller dictionary sizes",
    ),
    Case(
        "train-table-replaced",
        "train",
        lambda c: (
            c.table("ws/embeddings/toy.parquet", c.slice_ids(), _rng_x(len(c.slice_ids()), 8)),
            ["train", "--force", *c.common()],
        )[1],
        r"toy\.parquet: .*manifest recorded",
    ),
    # --- activations ------------------------------------------------------------------------------
    Case(
        "weights-overwritten",
        "activations",
        lambda c: (
            _overwrite_middle(c.sae_dir() / "model.safetensors"),
            ["activations", "--force", *c.common()],
        )[1],
        r"model\.safetensors: content does not match the sha256",
    ),
    Case(
        "weights-truncated-no-verify",
        "activations",
        lambda c: (
            _truncate(c.sae_dir() / "model.safetensors"),
            ["activations", "--force", "--no-verify", *c.common()],
        )[1],
        r"model\.safetensors: not a readable safetensors file",
    ),
    Case(
        "weights-empty",
        "activations",
        lambda c: (
            (c.sae_dir() / "model.safetensors").write_bytes(b""),
            ["activations", "--force", *c.common()],
        )[1],
        r"model\.safetensors: content does not match",
    ),
    Case(
        "weights-nan",
        "activations",
        lambda c: (_rewrite_weights(c, _nan_weights), ["activations", "--force", *c.common()])[1],
        r"model\.safetensors: tensor 'W_enc' holds NaN",
    ),
    Case(
        "weights-tensor-missing",
        "activations",
        lambda c: (_rewrite_weights(c, _drop_decoder), ["activations", "--force", *c.common()])[1],
        r"model\.safetensors: tensor\(s\) \['W_dec'\] missing",
    ),
    Case(
        "cfg-json-invalid",
        "activations",
        lambda c: (
            (c.sae_dir() / "cfg.json").write_text("{not json"),
            ["activations", "--force", *c.common()],
        )[1],
        r"cfg\.json: not valid JSON",
    ),
    Case(
        "activations-unknown-encoder",
        "activations",
        lambda c: ["activations", "--encoder", "nosuch", *c.common()],
        r"no trained SAE matches encoder 'nosuch'",
    ),
    Case(
        "activations-unknown-config",
        "activations",
        lambda c: ["activations", "--sae-config", "D_1_K_1", *c.common()],
        r"config 'D_1_K_1'",
    ),
    Case(
        "activations-embeddings-truncated",
        "activations",
        lambda c: (_truncate(c.ws / "embeddings" / "toy.parquet"), ["activations", *c.common()])[1],
        r"toy\.parquet: not a readable Parquet",
    ),
    # --- evaluate ---------------------------------------------------------------------------------
    Case(
        "eval-activations-truncated",
        "evaluate",
        lambda c: (
            [_truncate(p, 0.9) for p in (c.ws / "activations").rglob("valid.parquet")],
            ["evaluate", "--force", *c.common()],
        )[1],
        r"valid\.parquet: not a readable Parquet",
    ),
    Case(
        "eval-activations-garbage",
        "evaluate",
        lambda c: (
            [_garbage(p) for p in (c.ws / "activations").rglob("train.parquet")],
            ["evaluate", "--force", *c.common()],
        )[1],
        r"train\.parquet: not a readable Parquet",
    ),
    Case(
        "eval-slices-garbage",
        "evaluate",
        lambda c: (
            _garbage(c.ws / "data" / "slices.parquet"),
            ["evaluate", "--force", *c.common()],
        )[1],
        r"slices\.parquet: not a readable Parquet",
    ),
    Case(
        "eval-split-missing",
        "evaluate",
        lambda c: ((c.ws / "data" / "split.csv").unlink(), ["evaluate", "--force", *c.common()])[1],
        r"split\.csv not found",
    ),
    Case(
        "eval-probe-C",
        "evaluate",
        lambda c: ["evaluate", *c.config({"evaluate": {"probe": {"C": -1}}})],
        r"evaluate\.probe\.C",
    ),
    Case(
        "eval-unknown-task",
        "evaluate",
        lambda c: ["evaluate", *c.config({"evaluate": {"tasks": ["bogus"]}})],
        r"evaluate\.tasks",
    ),
    Case(
        "eval-embeddings-replaced",
        "evaluate",
        lambda c: (
            c.table("ws/embeddings/toy.parquet", c.slice_ids(), _rng_x(len(c.slice_ids()), 8)),
            ["evaluate", "--force", *c.common()],
        )[1],
        r"toy\.parquet: .*manifest recorded",
    ),
    # --- interpret --------------------------------------------------------------------------------
    Case(
        "interpret-empty-test-split",
        "interpret",
        _empty_test_split,
        r"test\.parquet: the test split has no slices",
    ),
    Case(
        "interpret-remote-endpoint",
        "interpret",
        lambda c: [
            "interpret",
            "autointerp",
            "--describer",
            "openai",
            *c.config(
                {"interpret": {"openai": {"base_url": "http://93.184.216.34/v1", "model": "m"}}}
            ),
        ],
        r"interpret\.openai\.base_url",
    ),
    Case(
        "interpret-no-endpoint",
        "interpret",
        lambda c: ["interpret", "autointerp", "--describer", "openai", *c.common()],
        r"interpret\.openai\.base_url",
    ),
    Case(
        "interpret-bad-describer",
        "interpret",
        lambda c: ["interpret", "autointerp", "--describer", "bogus", *c.common()],
        r"interpret\.describer",
    ),
    Case(
        "interpret-queries-file-missing",
        "interpret",
        lambda c: [
            "interpret",
            "language",
            *c.config({"interpret": {"language": {"queries_file": str(c.tmp / "q.yaml")}}}),
        ],
        r"q\.yaml not found",
    ),
    Case(
        "interpret-queries-not-list",
        "interpret",
        lambda c: [
            "interpret",
            "language",
            *c.config(
                {"interpret": {"language": {"queries_file": str(c.write("q.yaml", "a: 1\n"))}}}
            ),
        ],
        r"q\.yaml: expected a YAML list",
    ),
    Case(
        "interpret-activations-garbage",
        "interpret",
        lambda c: (
            [_garbage(p) for p in (c.ws / "activations").rglob("valid.parquet")],
            ["interpret", "fingerprint", "--force", *c.common()],
        )[1],
        r"valid\.parquet: not a readable Parquet",
    ),
    # --- figures and report -----------------------------------------------------------------------
    Case(
        "report-empty-workspace",
        "report",
        lambda c: ["report", "-c", str(c.cfg), "-w", str(c.tmp / "fresh")],
        r"slices\.parquet not found",
    ),
    Case(
        "report-bad-key",
        "report",
        lambda c: ["report", *c.config({"report": {"max_features": 0}})],
        r"report\.max_features",
    ),
    Case(
        "report-thumb-size",
        "report",
        lambda c: ["report", *c.config({"report": {"thumb_size": 4}})],
        r"report\.thumb_size",
    ),
    Case(
        "report-unknown-key",
        "report",
        lambda c: ["report", *c.config({"report": {"colour": "red"}})],
        r"report\.colour",
    ),
    Case(
        "report-weights-overwritten",
        "report",
        lambda c: (
            _overwrite_middle(c.sae_dir() / "model.safetensors"),
            ["report", "--force", *c.common()],
        )[1],
        r"model\.safetensors: content does not match",
    ),
    Case(
        "report-activations-garbage",
        "report",
        lambda c: (
            [_garbage(p) for p in (c.ws / "activations").rglob("*.parquet")],
            ["report", "--force", *c.common()],
        )[1],
        r"\.parquet: not a readable Parquet",
    ),
    Case(
        "figures-unknown-key",
        "report",
        lambda c: ["figures", *c.config({"figures": {"colour": "red"}})],
        r"figures\.colour",
    ),
]
