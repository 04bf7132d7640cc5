"""The output folder of `mine-and-generate` and the provenance of every synthetic image.

    OUT/config.yaml               resolved config (+ leakage warning when the test split was mined)
    OUT/hard_cases.csv            the mined cases, ranked; after the run also their round-trip scores
    OUT/records/<key>.json        one per finished source image: inversion scores, every variant, filters
    OUT/reconstructions/<label>/  invert -> regenerate of each source (for the report's gallery)
    OUT/images/<label>/           kept variants  (the manifest's images)
    OUT/rejected/<label>/         variants a filter dropped (kept for inspection, not in the manifest)
    OUT/candidates.csv            every variant with its filter scores and verdict
    OUT/manifest.csv (+ .meta.json)  the kept variants: synthetic rows with full provenance
    OUT/summary.json              counts, mean scores, warnings

A source's record is written (atomically) after its images, so a record means the source is finished:
a resumed run skips exactly those.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from lesiongen.data.manifest import REQUIRED_COLUMNS, SYNTHETIC_COLUMNS, Manifest, write_manifest
from lesiongen.utils.atomic import atomic_path, is_temporary, write_json

HARD_CASES = "hard_cases.csv"
RECORDS = "records"
MANIFEST = "manifest.csv"
CANDIDATES = "candidates.csv"
SUMMARY = "summary.json"

def source_key(image: str) -> str:
    """A file-name-safe key unique per source image path (two folders may hold the same file name)."""
    stem = Path(image).stem.replace(" ", "_")
    return f"{stem}-{hashlib.sha256(image.encode()).hexdigest()[:8]}"


def record_path(out: Path, image: str) -> Path:
    return out / RECORDS / f"{source_key(image)}.json"


def variant_path(folder: str, label: str, image: str, index: int) -> str:
    return f"{folder}/{label}/{source_key(image)}-v{index:02d}.png"


def reconstruction_path(label: str, image: str) -> str:
    return f"reconstructions/{label}/{source_key(image)}.png"


def generator_hash(base_hash: str, adapter_hash: str | None) -> str:
    """The same identity `lesiongen generate` writes: base and adapter together."""
    return hashlib.sha256(f"{base_hash}|{adapter_hash}".encode()).hexdigest()


def write_record(out: Path, record: dict) -> None:
    write_json(record_path(out, record["source"]["image"]), record)


def finished_sources(out: Path) -> set[str]:
    folder = out / RECORDS
    if not folder.is_dir():
        return set()
    # a resume deletes a killed run's temporaries first; another process may be writing one right now
    return {json.loads(p.read_text(encoding="utf-8"))["source"]["image"] for p in folder.glob("*.json")
            if not is_temporary(p)}


def load_records(out: Path, images: list[str]) -> list[dict]:
    return [json.loads(record_path(out, image).read_text(encoding="utf-8")) for image in images]


def candidate_rows(records: list[dict]) -> pd.DataFrame:
    """Every variant of every source, one row each, with its provenance and filter verdict."""
    rows = []
    for record in records:
        source, inversion = record["source"], record["inversion"]
        for variant in record["variants"]:
            rows.append({
                "image": variant["image"], "label": source["label"], "split": source["split"],
                "group_id": source["group_id"], "synthetic": 1, "source_image": source["image"],
                "method": record["method"], "strength": record["strength"], "seed": variant["seed"],
                "generator_hash": record["generator_hash"], "variant_index": variant["index"],
                "lambda": record.get("lambda"), "renoise": record["renoise"], "guidance": record["guidance"],
                "scheduler": record["scheduler"], "base_hash": record["base_hash"],
                "adapter_hash": record["adapter_hash"] or "", "source_label": source["label"],
                "source_reason": source["reason"], "recon_psnr": inversion["recon_psnr"],
                "recon_ssim": inversion["recon_ssim"], "inversion_psnr": inversion["inversion_psnr"],
                "latent_error": inversion["latent_error"], "inversion_depth": inversion.get("depth"),
                **{k: v for k, v in variant.items() if k not in ("image", "seed", "index")},
            })
    return pd.DataFrame(rows)


def write_outputs(out: Path, hard_cases: pd.DataFrame, records: list[dict], classes: list[str], *,
                  leakage_warning: str | None, summary: dict, manifest_meta: dict) -> dict:
    """Join the per-source records into candidates.csv, the synthetic manifest, hard_cases.csv, summary."""
    candidates = candidate_rows(records)
    if leakage_warning:
        candidates["leakage_warning"] = leakage_warning
    with_scores = hard_cases.merge(pd.DataFrame([{"image": r["source"]["image"], **r["inversion"],
                                                  "kept_variants": sum(v["keep"] for v in r["variants"])}
                                                 for r in records]), on="image", how="left")
    with atomic_path(out / HARD_CASES) as tmp:
        with_scores.to_csv(tmp, index=False)
    with atomic_path(out / CANDIDATES) as tmp:
        candidates.to_csv(tmp, index=False)
    if len(candidates):
        verdicts = [c for c in ("keep", "reject_reason", "off_class", "near_copy") if c in candidates]
        kept = candidates[candidates["keep"] == 1].drop(columns=verdicts)
    else:  # every reconstruction failed: an empty manifest that still has the contract's header
        kept = pd.DataFrame(columns=[*REQUIRED_COLUMNS, *SYNTHETIC_COLUMNS])
    manifest = Manifest(kept.reset_index(drop=True), out, list(classes))
    write_manifest(manifest, out / MANIFEST, **manifest_meta,
                   **({"leakage_warning": leakage_warning} if leakage_warning else {}))
    summary = {**summary, **_counts(records, candidates)}
    if leakage_warning:
        summary = {"leakage_warning": leakage_warning, **summary}
    write_json(out / SUMMARY, summary)
    return summary


def _counts(records: list[dict], candidates: pd.DataFrame) -> dict:
    recon = pd.DataFrame([r["inversion"] for r in records])
    reasons = {name: int(candidates[name].sum()) for name in ("off_class", "near_copy") if name in candidates}
    return {
        "sources": len(records),
        "failed_reconstructions": int(sum(bool(r["inversion"]["verdict"]) for r in records)),
        "variants": len(candidates),
        "kept": int(candidates["keep"].sum()) if len(candidates) else 0,
        "rejected_by": reasons,
        "recon_psnr_mean": float(recon["recon_psnr"].mean()) if len(recon) else None,
        "recon_ssim_mean": float(recon["recon_ssim"].mean()) if len(recon) else None,
        "latent_error_mean": float(recon["latent_error"].mean()) if len(recon) else None,
        "vae_psnr_mean": float(recon["vae_psnr"].mean()) if len(recon) else None,
        "inversion_psnr_mean": float(recon["inversion_psnr"].mean()) if len(recon) else None,
    }
