"""Command line: parses arguments, loads the config, calls stage functions. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sail.config import load_config
from sail.console import console, setup_logging
from sail.errors import SailError

app = typer.Typer(
    help=(
        "SAIL: make foundation-model embeddings of medical images interpretable with "
        "Matryoshka sparse autoencoders. Every verb reads --config FILE.yaml and --workspace DIR; "
        "stages skip themselves when their outputs are up to date (--force reruns)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
WorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Run folder [default: ./sail-work].")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if outputs are up to date.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _load(config: Path | None, workspace: Path | None, **sections: dict[str, Any]):
    overrides: dict[str, Any] = {k: v for k, v in sections.items() if v}
    if workspace is not None:
        overrides["workspace"] = workspace
    return load_config(config, overrides)


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: VerboseOpt = False) -> None:
    setup_logging(verbose)


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Where to write CT_Dataset_v201/ and MRI_Dataset_v200/.")],
    n_ct: Annotated[Optional[int], typer.Option(help="CT scans [default: 24].")] = None,
    n_mri: Annotated[Optional[int], typer.Option(help="MRI scans [default: 12].")] = None,
    size: Annotated[Optional[int], typer.Option(help="Voxels per side [default: 64].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [default: 0].")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic dataset in TotalSegmentator's exact on-disk layout (with phantom_truth.json)."""
    from sail.data.phantom import write_phantom_dataset

    try:
        cfg = _load(config, None, phantom={"n_ct": n_ct, "n_mri": n_mri, "size": size, "seed": seed})
        write_phantom_dataset(out_dir, cfg.phantom)
    except SailError as exc:
        _fail(exc)
    console.print(f"phantom dataset written to {out_dir}")


@app.command()
def prepare(
    source: Annotated[Optional[Path], typer.Option(help="TotalSegmentator folder (holding CT_Dataset_v201/ and/or MRI_Dataset_v200/).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="PNG side in pixels [default: 224; paper: 1024].")] = None,
    style: Annotated[Optional[str], typer.Option(help="canonical (RAS, anatomical planes) or published (paper geometry).")] = None,
    slice_stride: Annotated[Optional[int], typer.Option(help="Keep every n-th slice [default: 1].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes [default: CPU count].")] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Slice volumes into PNGs and write data/slices.parquet (+ data/skipped.csv)."""
    from sail.pipeline import run_pipeline

    section = {"source": source, "image_size": image_size, "style": style, "slice_stride": slice_stride, "workers": workers}
    try:
        cfg = _load(config, workspace, prepare=section)
        run_pipeline(cfg, "prepare", "prepare", force)
    except SailError as exc:
        _fail(exc)


@app.command()
def split(config: ConfigOpt = None, workspace: WorkspaceOpt = None, force: ForceOpt = False) -> None:
    """Split scans into train/valid/test (institutes A, D, E -> test) -> data/split.csv."""
    from sail.pipeline import run_pipeline

    try:
        cfg = _load(config, workspace)
        run_pipeline(cfg, "split", "split", force)
    except SailError as exc:
        _fail(exc)


@app.command()
def run(
    config_file: Annotated[Optional[Path], typer.Argument(help="YAML config (same as --config).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="First stage to run.")] = None,
    stop: Annotated[Optional[str], typer.Option("--to", help="Last stage to run.")] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run every stage in order, skipping those whose outputs are up to date."""
    from sail.pipeline import run_pipeline

    if config_file is not None and config is not None and config_file != config:
        _fail(SailError("give the config either as an argument or with --config, not both"))
    try:
        cfg = _load(config_file or config, workspace)
        run_pipeline(cfg, start, stop, force)
    except SailError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry for `python -m sail`
    app(prog_name="sail")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
