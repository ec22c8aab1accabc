"""Command line: parses arguments, loads the config, calls stage functions. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sail.cli_errors import SailGroup
from sail.config import load_config
from sail.console import console, setup_logging
from sail.errors import SailError

app = typer.Typer(
    cls=SailGroup,
    help=(
        "SAIL: make foundation-model embeddings of medical images interpretable with "
        "Matryoshka sparse autoencoders. Every verb reads --config FILE.yaml and --workspace DIR; "
        "stages skip themselves when their outputs are up to date (--force reruns)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts say "[default: ...]" literally; markup would eat it
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Run folder [default: ./sail-work].")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if outputs are up to date.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
DeviceOpt = Annotated[
    str | None, typer.Option(help="auto, cpu, cuda or cuda:N [default: auto = cuda if available].")
]


def _load(config: Path | None, workspace: Path | None, **sections: dict[str, Any]):
    overrides: dict[str, Any] = {k: v for k, v in sections.items() if v}
    if workspace is not None:
        overrides["workspace"] = workspace
    return load_config(config, overrides)


def _run_stage(
    stage: str, force: bool, config: Path | None, workspace: Path | None, **sections: Any
) -> None:
    """One verb = one pipeline stage with its config section overridden by the verb's options."""
    from sail.pipeline import run_pipeline

    run_pipeline(_load(config, workspace, **sections), stage, stage, force)


@app.callback()
def _main(
    verbose: VerboseOpt = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the Python traceback of an error.")
    ] = False,
) -> None:
    setup_logging(verbose)


@app.command()
def phantom(
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write CT_Dataset_v201/ and MRI_Dataset_v200/.")
    ],
    n_ct: Annotated[int | None, typer.Option(help="CT scans [default: 24].")] = None,
    n_mri: Annotated[int | None, typer.Option(help="MRI scans [default: 12].")] = None,
    size: Annotated[int | None, typer.Option(help="Voxels per side [default: 64].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: 0].")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic dataset in TotalSegmentator's exact on-disk layout (with
    phantom_truth.json)."""
    from sail.data.phantom import write_phantom_dataset

    cfg = _load(config, None, phantom={"n_ct": n_ct, "n_mri": n_mri, "size": size, "seed": seed})
    write_phantom_dataset(out_dir, cfg.phantom)
    console.print(f"phantom dataset written to {out_dir}")


@app.command()
def prepare(
    source: Annotated[
        Path | None,
        typer.Option(
            help=(
                "TotalSegmentator folder (holding CT_Dataset_v201/ and/or MRI_Dataset_v200/), or a "
                "manifest .csv/.parquet: one row per volume (image = NIfTI file or DICOM series "
                "folder; see docs/your-own-data.md)."
            )
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="PNG side in pixels [default: 224; paper: 1024].")
    ] = None,
    style: Annotated[
        str | None,
        typer.Option(help="canonical (RAS, anatomical planes) or published (paper geometry)."),
    ] = None,
    slice_stride: Annotated[
        int | None, typer.Option(help="Keep every n-th slice [default: 1].")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes [default: CPU count].")
    ] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Slice volumes into PNGs and write data/slices.parquet (+ data/skipped.csv)."""
    section = {
        "source": source,
        "image_size": image_size,
        "style": style,
        "slice_stride": slice_stride,
        "workers": workers,
    }
    _run_stage("prepare", force, config, workspace, prepare=section)


@app.command()
def split(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, force: ForceOpt = False
) -> None:
    """Split scans into train/valid/test (institutes A, D, E -> test) -> data/split.csv."""
    _run_stage("split", force, config, workspace)


@app.command()
def run(
    config_file: Annotated[
        Path | None, typer.Argument(help="YAML config (same as --config).")
    ] = None,
    start: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run every stage in order, skipping those whose outputs are up to date."""
    from sail.pipeline import run_pipeline

    if config_file is not None and config is not None and config_file != config:
        raise SailError("give the config either as an argument or with --config, not both")
    cfg = _load(config_file or config, workspace)
    run_pipeline(cfg, start, stop, force)


@app.command()
def evaluate(
    encoder: Annotated[
        list[str] | None,
        typer.Option("--encoder", help="Encoder(s) to evaluate [default: every embeddings table]."),
    ] = None,
    published_ranking: Annotated[
        bool | None,
        typer.Option(
            "--published-ranking/--no-published-ranking",
            help="Rank configs with the published choices (Table 1).",
        ),
    ] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Probes, monosemanticity, performance recovery, config ranking and concepts -> eval/."""
    section: dict[str, Any] = {"encoders": encoder or None}
    if published_ranking is not None:
        section["ranking"] = {"published": published_ranking}
    _run_stage("evaluate", force, config, workspace, evaluate=section)


@app.command()
def figures(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, force: ForceOpt = False
) -> None:
    """SAE quality vs L0 and performance recovery figures (PNG + PDF) -> figures/."""
    _run_stage("figures", force, config, workspace)


@app.command()
def encode(
    encoder: Annotated[
        str | None,
        typer.Option(
            help=(
                "dinov3, biomedparse, random-biomedparse, random-dinov3, efficientnet-lite0, "
                "timm:MODEL_NAME or hf:MODEL_ID_OR_DIR [default: the config's encode.encoders]."
            )
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Table name: embeddings/NAME.parquet [default: the encoder's name]."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Local file/folder or Hugging Face hub id [default: the published weights]."
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Model input side in pixels [default: the published size, or the model's config]."
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            help=(
                "timm:/hf: encoders: auto, cls, mean or gem "
                "[default: auto = cls if the model has a class token, else mean]."
            )
        ),
    ] = None,
    device: DeviceOpt = None,
    precision: Annotated[
        str | None,
        typer.Option(help="auto, fp32 or bf16 [default: auto = bf16 on GPU where published]."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per forward pass [default: per encoder].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="PNG-decoding worker processes [default: CPUs - 1, max 8]."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n (0-based): encode only this shard's chunks; then --merge."),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="Join the finished shard parts of --name into the final table."
        ),
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Encode every slice -> embeddings/NAME.parquet (resumable; shard with --shard i/n, join
    with --merge)."""
    from sail.pipeline import run_pipeline

    entry = {
        k: v
        for k, v in {
            "encoder": encoder,
            "name": name,
            "weights": weights,
            "image_size": image_size,
            "pooling": pooling,
        }.items()
        if v is not None
    }
    section: dict[str, Any] = {
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "workers": workers,
        "shard": shard,
    }
    if encoder is not None:
        section["encoders"] = [entry]
    elif not merge and (name or weights or image_size or pooling):
        raise SailError(
            "--name/--weights/--image-size/--pooling describe one encoder: give --encoder too"
        )
    if merge and not (name or encoder):
        raise SailError("--merge needs --name (or --encoder) of the table to join")
    cfg = _load(config, workspace, encode=section)
    if merge:
        from sail.encoders.encode import merge_parts
        from sail.workspace import Workspace

        merge_parts(Workspace(cfg.workspace), name or encoder)
    else:
        run_pipeline(cfg, "encode", "encode", force)


@app.command("import-embeddings")
def import_embeddings(
    table: Annotated[
        Path,
        typer.Argument(
            help=(
                "Parquet with slice_id + a vector (fixed-size list, list, or one column per "
                "dimension)."
            )
        ),
    ],
    name: Annotated[str, typer.Option(help="Table name: embeddings/NAME.parquet.")],
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Accept a table that covers only some slices.")
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Bring your own embeddings: validate them against data/slices.parquet ->
    embeddings/NAME.parquet."""
    from sail.encoders.imported import import_embeddings as run_import
    from sail.workspace import Workspace

    cfg = _load(config, workspace)
    run_import(Workspace(cfg.workspace), table, name, force=force, allow_missing=allow_missing)


@app.command()
def train(
    encoder: Annotated[
        list[str] | None,
        typer.Option("--encoder", help="Encoder(s) to train on [default: every embeddings table]."),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant", help="matryoshka (default) and/or sail, for grid entries naming none."
        ),
    ] = None,
    grid: Annotated[
        str | None, typer.Option(help="demo, paper or a grid YAML file [default: paper].")
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="i/n: train only part i (0-based) of n of the grid.")
    ] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(help="Train on any table (slice_id + embedding), no prepared data needed."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Encoder name for --embeddings [default: file stem].")
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(help="Column of --embeddings grouping rows for the seeded 80/10/10 split."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the grid's epochs.")] = None,
    seed: Annotated[
        list[int] | None,
        typer.Option(
            "--seed",
            help="Repeat to train each config once per seed: the first is the config's own model, "
            "the others replicates in <config>/seed-<n>/ for eval/stability.csv.",
        ),
    ] = None,
    replicate_config: Annotated[
        list[str] | None,
        typer.Option(
            "--replicate-config",
            help="Only these configs get seed replicates (variant/name or name) [default: all].",
        ),
    ] = None,
    device: DeviceOpt = None,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="Recompute thresholds and final metrics of existing checkpoints, without training "
            "(after an upgrade that changed what they mean).",
        ),
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a grid of Matryoshka SAEs (families share batches) ->
    sae/<encoder>/<variant>/<config>/."""
    section: dict[str, Any] = {
        "encoders": encoder or None,
        "variants": variant or None,
        "grid": grid,
        "shard": shard,
        "embeddings": embeddings,
        "name": name,
        "group_by": group_by,
        "device": device,
        "training": {"epochs": epochs} if epochs else None,
        "recalibrate": recalibrate or None,
        "seeds": seed or None,
        "replicate_configs": replicate_config or None,
    }
    _run_stage("train", force, config, workspace, train=section)


@app.command()
def activations(
    encoder: Annotated[
        list[str] | None,
        typer.Option("--encoder", help="Encoder(s) [default: every encoder with SAEs]."),
    ] = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="Only these variants [default: all].")
    ] = None,
    sae_config: Annotated[
        str | None, typer.Option(help="Config folder (D_.._K_..) or all [default: all].")
    ] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(help="The table SAEs were trained on with `sail train --embeddings`."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Encoder name for --embeddings [default: file stem].")
    ] = None,
    device: DeviceOpt = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Load checkpoints whose model.safetensors does not "
            "match the sha256 in their cfg.json (damaged or hand-edited).",
        ),
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Sparse codes of every split -> activations/<encoder>/<variant>/<config>/<split>.parquet."""
    section = {
        "encoders": encoder or None,
        "variants": variant or None,
        "sae_config": sae_config,
        "embeddings": embeddings,
        "name": name,
        "device": device,
        "verify_checkpoints": False if no_verify else None,
    }
    _run_stage("activations", force, config, workspace, activations=section)


@app.command("import-sae")
def import_sae(
    ckpt: Annotated[Path, typer.Argument(help="Published Lightning checkpoint (last.ckpt).")],
    hparams: Annotated[
        Path, typer.Option(help="Its hparams.yaml (input_dim, dictionary_sizes, k_values).")
    ],
    encoder: Annotated[
        str, typer.Option(help="Encoder the SAE belongs to (e.g. biomedparse, dinov3).")
    ],
    trust_checkpoint: Annotated[
        bool, typer.Option(help="Allow full unpickling if weights-only loading fails.")
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Convert a published SAIL checkpoint into sae/<encoder>/sail/<config>/ (safetensors +
    cfg.json)."""
    from sail.sae.checkpoint import import_published
    from sail.workspace import Workspace

    cfg = _load(config, workspace)
    out = import_published(
        ckpt, hparams, Workspace(cfg.workspace).root / "sae", encoder, trust_checkpoint
    )
    console.print(f"imported to {out}")


@app.command("export-sae")
def export_sae(
    sae_dir: Annotated[
        Path, typer.Argument(help="A trained SAE folder (model.safetensors + cfg.json).")
    ],
    out: Annotated[Path, typer.Argument(help="Folder to write the export to.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="saelens: SAELens' on-disk format (cfg.json + sae_weights.safetensors; loads "
            "with sae_lens.SAE.load_from_disk and encodes raw embeddings). hf: a folder for "
            "huggingface_hub.upload_folder (SAIL files, a saelens/ copy, README.md model card).",
        ),
    ] = "saelens",
    verify: Annotated[
        bool, typer.Option(help="Check the weights against the sha256 in cfg.json.")
    ] = True,
) -> None:
    """Export a trained SAE for SAELens or the Hugging Face Hub."""
    from sail.sae.export import export_sae_folder

    written = export_sae_folder(sae_dir, out, format, verify)
    console.print(f"exported {sae_dir} as {format} to {written}")


@app.command()
def report(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, force: ForceOpt = False
) -> None:
    """Write the static HTML feature browser -> report/index.html (opens from file://, no
    network).

    Per config: a feature index to search (concept, structure, description; / focuses it) and
    sort (monosemanticity, activation rate, spatial hit rate); per feature: its top slices with
    the heatmap overlays of `sail maps` (o toggles them), spatial grounding beside the
    enrichment, and its profile along whole volumes; j/k step through the features; a page per
    volume shows which features fire where along it."""
    _run_stage("report", force, config, workspace)


@app.command()
def maps(
    volume: Annotated[
        str | None,
        typer.Option(
            help="Export one volume's maps: its image_id (or modality/image_id when the id is in "
            "both modalities), as in data/slices.parquet. Needs --feature."
        ),
    ] = None,
    feature: Annotated[
        int | None,
        typer.Option(help="The SAE feature to export (0-based, as on the report's feature pages)."),
    ] = None,
    sae: Annotated[
        str | None,
        typer.Option(
            help="encoder/variant/config of the SAE [default: the interpreted config, "
            "final_rank 1 of the first interpreted encoder]."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the NIfTI files [default: maps/<sae>/volumes/]."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="The map method, for the stage and an export alike: auto (exact for mean-pooled "
            "encoders, approximate for DINOv3), exact, approximate, or occlusion (any encoder, "
            "slower) [default: auto]."
        ),
    ] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Spatial feature maps: where on a slice a feature fires (docs/spatial_maps.md).

    With --volume ID --feature F: the feature's map on every prepared slice of that volume,
    placed back into the volume's ORIGINAL voxel grid (its affine and header): one float32
    NIfTI per plane (<modality>_<id>_f<F>_<plane>.nii.gz) to open beside the scan in 3D Slicer
    or ITK-SNAP, a mask of the voxels that got a value (..._filled.nii.gz) and a JSON sidecar.
    Without them: the maps stage: maps of the reported features on their top slices -> maps/,
    and where they point in the segmentation masks -> eval/spatial_grounding.csv.
    """
    if (volume is None) != (feature is None):
        given, missing = ("--volume", "--feature") if feature is None else ("--feature", "--volume")
        raise SailError(f"{given} needs {missing}: an export is one volume and one feature")
    if volume is None:
        if sae is not None or out is not None:
            raise SailError("--sae and --out belong to an export: give --volume and --feature")
        _run_stage("maps", force, config, workspace, maps={"method": method, "device": device})
        return
    from sail.maps.nifti import export_volume_maps
    from sail.workspace import Workspace

    cfg = _load(
        config, workspace, encode={"device": device}, maps={"method": method} if method else None
    )
    written = export_volume_maps(cfg, Workspace(cfg.workspace), volume, feature, sae=sae, out=out)
    for path in written:
        console.print(str(path))


@app.command()
def demo(
    workspace: WorkspaceOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Override the packaged demo config.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Phantom dataset + the whole pipeline on the demo config: offline, about 5 minutes on 2 CPU
    cores."""
    from sail.pipeline import (
        check_phantom_defines_metrics,
        demo_config_path,
        print_summary,
        run_pipeline,
    )

    cfg = _load(config or demo_config_path(), workspace)
    check_phantom_defines_metrics(cfg)
    ws = run_pipeline(cfg, force=force)
    print_summary(ws)


interpret_app = typer.Typer(
    help="Fingerprint retrieval, autointerpretation and language retrieval -> interpret/.",
    no_args_is_help=True,
)
app.add_typer(interpret_app, name="interpret")


def _interpret(
    verb: str,
    config,
    workspace,
    force,
    sae_config,
    describer,
    judge,
    matcher,
    allow_remote,
    dry_run,
) -> None:
    from sail.interpret.stage import VERBS
    from sail.workspace import Workspace, stage_lock

    section: dict[str, Any] = {
        "describer": describer,
        "judge": judge,
        "matcher": matcher,
        "sae_configs": [sae_config] if sae_config else None,
        "allow_remote": allow_remote or None,
        "dry_run": dry_run or None,
    }
    cfg = _load(config, workspace, interpret=section)
    ws = Workspace(cfg.workspace).ensure()
    if cfg.interpret.dry_run:  # writes nothing, so needs no lock
        VERBS[verb](cfg, ws, force)
        return
    with stage_lock(ws.root, "interpret"):  # the lock `sail run` takes for the interpret stage
        VERBS[verb](cfg, ws, force)


SaeConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--sae-config",
        help=(
            "Also interpret this config (D_.._K_..) or all "
            "[default: final_rank 1 per encoder+variant]."
        ),
    ),
]
DescriberOpt = Annotated[
    str | None, typer.Option("--describer", help="metadata (offline), openai or transformers.")
]
JudgeOpt = Annotated[
    str | None,
    typer.Option("--judge", help="embedding (offline MiniLM), openai, transformers or none."),
]
MatcherOpt = Annotated[
    str | None, typer.Option("--matcher", help="embedding (offline MiniLM), lexical or llm.")
]
AllowRemoteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-remote", help="Allow a non-loopback model endpoint (images leave this machine)."
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print prompts and call counts; call and write nothing.")
]


@interpret_app.command("fingerprint")
def interpret_fingerprint(
    sae_config: SaeConfigOpt = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Sparse fingerprint retrieval vs dense baselines, K sweep, metadata precision and chance."""
    _interpret(
        "fingerprint", config, workspace, force, sae_config, None, None, None, False, dry_run
    )


@interpret_app.command("autointerp")
def interpret_autointerp(
    sae_config: SaeConfigOpt = None,
    describer: DescriberOpt = None,
    judge: JudgeOpt = None,
    allow_remote: AllowRemoteOpt = False,
    dry_run: DryRunOpt = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Describe selected features from their top slices and judge the descriptions."""
    _interpret(
        "autointerp",
        config,
        workspace,
        force,
        sae_config,
        describer,
        judge,
        None,
        allow_remote,
        dry_run,
    )


@interpret_app.command("language")
def interpret_language(
    sae_config: SaeConfigOpt = None,
    matcher: MatcherOpt = None,
    allow_remote: AllowRemoteOpt = False,
    dry_run: DryRunOpt = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Text queries -> matched features -> ranked slices, with precision@k against parsed
    constraints."""
    _interpret(
        "language", config, workspace, force, sae_config, None, None, matcher, allow_remote, dry_run
    )


def main() -> None:  # pragma: no cover - console entry for `python -m sail`
    app(prog_name="sail")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
