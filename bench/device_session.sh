#!/usr/bin/env bash
# The GPU numbers of bench/RESULTS.md on the workplace's `device` machine (Python 3.12, torch 2.11, no
# package index, at most 64 MiB carried per call, ignored paths NOT kept between calls).
#
#   bash bench/device_session.sh prepare     # here, once: the carried folders below (git-ignored)
#
# then one `device` call per mode, each naming its carry:
#
#   speed       carry [".whl"]                           SD-1.5-shape benches: LoRA training (~200 s, of it
#                                                        142 s compiling), generation (~40 s at batch 8),
#                                                        inversion + variants (~50 s at batch 8)
#   classifier  carry [".devcache"]                      derm-dev recipe (~150 s on an H200), throughput (~60 s),
#                                                        the `-m gpu` tests of the classifier
#   finetune    carry [".whl", ".devcache/derm-dev.zip"] LoRA+TI finetune of the demo base on derm-dev + its grid
#
# derm-dev travels as one stored zip: the tool counts its 12,753 small files at about 59 MiB, the zip is
# 47 MB. The lite0 ImageNet weights travel converted and in fp16 (9 MB; pooled features of the fp16 copy
# have cosine 0.9999 with the fp32 ones). Each step has its own time limit; logs land in $OUT.
set -u
mode=${1:?usage: bench/device_session.sh prepare|speed|classifier|finetune}
out=${OUT:-/tmp/device-out}
work=/tmp/lesiongen-bench
site=/tmp/lesiongen-site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LESIONGEN_CACHE=$PWD/.devcache PYTHONPATH=$site:$PWD

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name: start $(date +%T), limit ${limit}s"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? at $(date +%T)"
    grep -v '%|' "$out/$name.log" | tail -n 30
}

install_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
}

unpack_derm_dev() {
    mkdir -p .dd && python3 -m zipfile -e .devcache/derm-dev.zip .dd
}

if [ "$mode" = prepare ]; then
    python=${PYTHON:-.venv/bin/python}
    mkdir -p .whl .devcache/weights
    $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 peft==0.21.2 || exit 1
    $python - <<'EOF' || exit 1
import os, zipfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from lesiongen.classifier.weights import imagenet_weights_file

weights = load_file(str(imagenet_weights_file("tf_efficientnet_lite0")))
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
          ".devcache/weights/tf_efficientnet_lite0.in1k.safetensors")
data = Path("../shared/data")
with zipfile.ZipFile(".devcache/derm-dev.zip", "w", zipfile.ZIP_STORED) as archive:
    for path in sorted((data / "derm-dev").rglob("*")):
        if path.is_file():
            archive.write(path, path.relative_to(data).as_posix())
EOF
    du -sh .whl .devcache
    exit 0
fi

mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $mode in
speed)
    install_wheels || exit 1
    step 240 diffusion_training python3 bench/diffusion_training.py --steps 15 --warmup 5 --images 128 --workdir $work
    step 100 generation python3 bench/generation.py --batch-sizes 8 --repeats 2 --no-compile --workdir $work
    step 120 inversion_variants python3 bench/inversion_variants.py --batch-size 8 --variants 2 --repeats 1
    ;;
classifier)
    unpack_derm_dev || exit 1
    step 200 classifier_quality python3 bench/classifier_quality.py --data .dd/derm-dev --only recipe --out $work/cq
    cp $work/cq/derm-dev/recipe/eval-test/metrics.json "$out/classifier_metrics.json"
    step 60 classifier_throughput python3 bench/classifier_throughput.py --data .dd/derm-dev --load-size 128
    step 60 gpu_tests python3 -m pytest -q -m gpu tests/test_classifier_train.py
    ;;
finetune)
    install_wheels && unpack_derm_dev || exit 1
    step 150 finetune python3 - <<EOF
from lesiongen.data.index import index_dataset
from lesiongen.diffusion.finetune.config import FinetuneConfig
from lesiongen.diffusion.finetune.run import run_finetune

index_dataset(".dd/derm-dev", out="$work/manifest.csv", seed=0)
out = run_finetune(FinetuneConfig(
    base="lesiongen/assets/demo-base.safetensors", manifest="$work/manifest.csv", out="$work/ft",
    resolution=64, steps=1500, batch_size=64, lr=3e-4, compile=False, checkpoint_every=1500,
    validate_every=1500, validation_images_per_class=6), overwrite=True)
print("finetune written to", out)
EOF
    cp "$(ls $work/ft/validation/step-*.png | tail -n 1)" "$out/finetune_grid.png"
    cp $work/ft/train_log.json "$out/finetune_train_log.json"
    ;;
*)
    echo "unknown mode '$mode' (prepare, speed, classifier or finetune)" >&2
    exit 2
    ;;
esac
