"""What `bench/device_session.sh prepare` puts into the git-ignored `.devcache/` for the device calls.

- `.devcache/weights/`: the lite0 ImageNet start, converted and in fp16 (9 MB instead of 17 MB);
- `.devcache/derm-dev.zip`: derm-dev as one stored zip (the tool counts 12,753 small files at ~59 MiB);
- `.devcache/pretrain/`: the derm-dev base chain (#8): a 64 px JPEG copy of derm-dev (the base trains at
  64 px), the judge classifier in fp16 and, with `--resume-from`, the newest checkpoint of the previous
  link (a call's `$OUT/pretrain` folder).

    python bench/device_prepare.py --judge checkpoints/es-study [--resume-from FILES_AT/pretrain]
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
    if (args.judge / "model.safetensors").is_file():
        (chain / "judge").mkdir(exist_ok=True)
        shutil.copy(args.judge / "classifier.json", chain / "judge" / "classifier.json")
        save_half(args.judge / "model.safetensors", chain / "judge" / "model.safetensors")
    else:
        print(f"no judge at {args.judge}: train one on real derm-dev and pass --judge; `pretrain` needs it")
    shutil.rmtree(chain / "work", ignore_errors=True)
    if args.resume_from is not None:
        checkpoint = newest_checkpoint(args.resume_from)
        shutil.copytree(checkpoint, chain / "work" / "run-chain" / "checkpoints" / checkpoint.name)
        print(f"the next pretrain link resumes from {checkpoint}")


if __name__ == "__main__":
    main()
