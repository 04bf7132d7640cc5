"""What `bench/device_session.sh prepare` puts into the git-ignored `.devcache/` for the device calls.

- `.devcache/weights/`: the lite0 ImageNet start, converted and in fp16 (9 MB instead of 17 MB);
- `.devcache/derm-dev.zip`: derm-dev as one stored zip (the tool counts 12,753 small files at ~59 MiB);
- `.devcache/pretrain/`: the derm-dev base chain (#8): a 64 px JPEG copy of derm-dev (the base trains at
  64 px), the judge classifier in fp16 and, with `--resume-from`, the newest checkpoint of the previous
  link (a call's `$OUT/pretrain` folder).

    python bench/device_prepare.py --judge checkpoints/es-study [--resume-from FILES_AT/pretrain]

A judge folder that does not exist yet is trained here first, on the CPU (`train_judge`: the derm-dev
recipe at 64 px for 12 epochs without early stopping, the judge of RESULTS.md's CPU pretraining tables;
about 10 minutes on 2 cores), so a fresh checkout needs nothing but this script before its device calls.
"""

from __future__ import annotations

import argparse
import io
import shutil
import zipfile
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / ".devcache"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def save_half(source: Path, target: Path) -> None:
    tensors = load_file(str(source))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(target))


def zip_derm_dev(target: Path, size: int | None) -> None:
    """Stored zip of derm-dev; with `size`, every image resized to size x size and saved as JPEG q85 without chroma
    subsampling (4:2:0 at 64 px costs the 64 px judge 0.03 balanced accuracy on the test split, 4:4:4 0.016)."""
    source = DATA / "derm-dev"
    root = "derm-dev" if size is None else f"derm-dev-{size}"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            name = f"{root}/{path.relative_to(source).as_posix()}"
            if size is None or path.suffix.lower() not in IMAGE_SUFFIXES:
                archive.write(path, name)
                continue
            buffer = io.BytesIO()
            image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
            image.save(buffer, "JPEG", quality=85, subsampling=0)
            archive.writestr(str(Path(name).with_suffix(".jpg")), buffer.getvalue())


def train_judge(out: Path) -> None:
    """The 64 px derm-dev judge: the shipped recipe at 64 px, 12 epochs, no early stopping, no TTA."""
    from dataclasses import replace

    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.train import train_classifier
    from lesiongen.config import from_dict, load_yaml
    from lesiongen.data.index import index_dataset

    manifest = ROOT / "checkpoints" / "derm-dev" / "manifest.csv"
    if not manifest.is_file():
        index_dataset(DATA / "derm-dev", manifest, seed=0)
    recipe = from_dict(TrainConfig, load_yaml(ROOT / "configs" / "derm-dev-classifier.yaml"), where="recipe")
    config = replace(recipe, manifest=str(manifest), img_size=64, load_size=64, epochs=12, tta="none",
                     early_stopping_patience=None)
    print(f"no judge at {out}: training one on the CPU (about 10 minutes)")
    train_classifier(config, out, resume="latest")


def newest_checkpoint(folder: Path) -> Path:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise SystemExit(f"{folder}: no checkpoint-N folder to resume from")
    return found[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", type=Path, default=ROOT / "checkpoints" / "es-study",
                        help="a `train-classifier` folder trained on real derm-dev (64 px is enough)")
    parser.add_argument("--resume-from", type=Path, default=None, help="the previous pretrain link's $OUT/pretrain")
    args = parser.parse_args()
    from lesiongen.classifier.weights import imagenet_weights_file

    (CACHE / "weights").mkdir(parents=True, exist_ok=True)
    lite0 = CACHE / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    save_half(imagenet_weights_file("tf_efficientnet_lite0"), lite0)
    zip_derm_dev(CACHE / "derm-dev.zip", None)

    chain = CACHE / "pretrain"
    chain.mkdir(exist_ok=True)
    zip_derm_dev(chain / "derm-dev-64.zip", 64)
    if not (args.judge / "model.safetensors").is_file():
        train_judge(args.judge)
    (chain / "judge").mkdir(exist_ok=True)
    shutil.copy(args.judge / "classifier.json", chain / "judge" / "classifier.json")
    save_half(args.judge / "model.safetensors", chain / "judge" / "model.safetensors")
    shutil.rmtree(chain / "work", ignore_errors=True)
    if args.resume_from is not None:
        checkpoint = newest_checkpoint(args.resume_from)
        shutil.copytree(checkpoint, chain / "work" / "run-chain" / "checkpoints" / checkpoint.name)
        print(f"the next pretrain link resumes from {checkpoint}")


if __name__ == "__main__":
    main()
