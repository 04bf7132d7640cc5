"""`lesiongen data ...`: index a labelled image collection, check a manifest, make the toy data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

FORMAT_CHOICES = ("auto", "ham10000", "isic2019", "imagefolder", "labels")


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the root app."""
    from lesiongen.cli.app import _Group

    group = typer.Typer(help="Index, check and make data sets (manifests with lesion-aware splits).",
                        no_args_is_help=True, cls=_Group)  # its errors and its one-process rule are the root's
    group.command("index")(index)
    group.command("check")(check)
    group.command("toy")(toy)
    app.add_typer(group, name="data")


def _fraction(value: float, flag: str) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"must be in [0, 1), got {value}", param_hint=flag)
    return value


def index(
    source: Annotated[Path, typer.Argument(help="Data folder or label CSV (HAM10000 metadata, ISIC 2019 "
                                                "GroundTruth, labels.csv) or an ImageFolder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Manifest CSV to write.",
                                             show_default="checkpoints/data/<source name>/manifest.csv")] = None,
    fmt: Annotated[str, typer.Option("--format", help=f"Layout of SOURCE: {', '.join(FORMAT_CHOICES)}.")] = "auto",
    val: Annotated[float, typer.Option(help="Fraction of each class's images for validation.")] = 0.15,
    test: Annotated[float, typer.Option(help="Fraction of each class's images for test.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the lesion shuffle.")] = 0,
    prompts: Annotated[str | None, typer.Option(help="Prompt file (name or YAML path) whose classes the labels "
                                                "map to.",
                                                show_default="isic2019 for ISIC 2019, else ham10000")] = None,
    metadata_csv: Annotated[Path | None, typer.Option(help="ISIC 2019 metadata CSV with lesion_id.",
                                                      show_default="the one beside the GroundTruth CSV")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    group_near_duplicates: Annotated[bool, typer.Option(
        help="Give near-duplicate images (256-bit pHash within 24 bits: one photo filed under several lesion "
             "ids) one lesion id, so no copy straddles splits; their own ids stay in source_group_id.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Decoding threads.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing manifest.")] = False,
) -> None:
    """Write a manifest with a lesion-aware, class-stratified train/val/test split."""
    if fmt not in FORMAT_CHOICES:
        raise typer.BadParameter(f"'{fmt}' is not one of {', '.join(FORMAT_CHOICES)}", param_hint="--format")
    _fraction(val, "--val"), _fraction(test, "--test")
    if val + test >= 1.0:
        raise typer.BadParameter(f"--val {val} + --test {test} leaves no training images", param_hint="--val/--test")
    from lesiongen.data.index import index_dataset

    if out is None:
        name = source.stem if source.is_file() else source.resolve().name
        out = Path("checkpoints") / "data" / name / "manifest.csv"
    manifest = index_dataset(source, out, fmt, fractions=(1.0 - val - test, val, test), seed=seed, strict=strict,
                             overwrite=overwrite, prompts=prompts, metadata_csv=metadata_csv, workers=workers,
                             group_near_duplicates=group_near_duplicates)
    counts = manifest.df["split"].value_counts()
    skipped = len(manifest.meta.get("skipped_unreadable", []))
    typer.echo(f"wrote {out}: {len(manifest)} images, {manifest.meta['n_groups']} lesions, "
               f"{len(manifest.classes)} classes ({manifest.meta['dataset']}, {manifest.meta['format']} layout); "
               + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in ("train", "val", "test"))
               + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    joined = manifest.meta.get("near_duplicates_joined")
    if joined is not None:
        sets = joined["sets"]
        typer.echo(f"joined {len(sets)} set(s) of near-duplicate images filed under different lesion ids into one "
                   f"lesion each" + (f", e.g. {' + '.join(sets[0])}" if sets else ""))
    alone = manifest.meta.get("images_without_lesion_id", 0)
    if alone:
        typer.echo(f"WARNING: {alone} of {len(manifest)} images have no lesion id, so each is split as a lesion of "
                   "its own: images of one lesion can land in train and test. Give the ids (a group_id or lesion_id "
                   "column; for ISIC 2019, --metadata-csv with its lesion_id)", err=True)


def check(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV to check.")],
    json_out: Annotated[Path | None, typer.Option(help="Also write the full report as JSON here.")] = None,
    phash_threshold: Annotated[int | None, typer.Option(
        min=0, max=256, show_default="24", help="Largest Hamming distance between 256-bit pHashes reported as a "
                                                "near-duplicate (the variant filters' threshold).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Decoding threads.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing JSON report.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 on warnings too (near-duplicates across splits, a class "
                                              "missing from a split, ...), e.g. to gate a pipeline.")] = False,
) -> None:
    """Class counts per split, unreadable/missing images, duplicates and lesion leakage; exit 1 on errors
    (and with --strict on warnings)."""
    from lesiongen.data.check import DEFAULT_PHASH_THRESHOLD, check_manifest, format_report
    from lesiongen.utils.atomic import write_json
    from lesiongen.utils.outdir import check_out_file

    if json_out is not None:
        check_out_file(json_out, overwrite, what="report", flag="--json-out")
    threshold = DEFAULT_PHASH_THRESHOLD if phash_threshold is None else phash_threshold
    report = check_manifest(manifest, phash_threshold=threshold, workers=workers)
    typer.echo(format_report(report))
    if json_out is not None:
        write_json(json_out, report)
        typer.echo(f"report written to {json_out}")
    if report["errors"]:
        raise typer.Exit(1)
    if strict and report["warnings"]:
        typer.echo(f"--strict: {len(report['warnings'])} warning(s) fail the check", err=True)
        raise typer.Exit(1)


def toy(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write labels.csv and images/ into.")] = Path(
        "checkpoints/data/toy"),
    n_per_class: Annotated[int, typer.Option(min=1, help="Images per class.")] = 16,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels (64 or 128 recommended).")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="Seed; the same seed gives the same images.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Make the procedural dermoscopy-like toy data set (7 HAM10000 classes, no external images)."""
    from lesiongen.data.toy import STYLES, make_toy_dataset

    labels = make_toy_dataset(out, n_per_class=n_per_class, size=size, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {labels} ({len(STYLES) * n_per_class} images, {size} px); "
               f"index it with: lesiongen data index {out}")
