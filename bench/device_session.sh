#!/usr/bin/env bash
# The GPU numbers of bench/RESULTS.md on the workplace's `device` machine (Python 3.12, torch 2.11, no
# package index, at most 64 MiB carried per call, ignored paths NOT kept between calls).
#
#   bash bench/device_session.sh prepare [--judge DIR] [--resume-from FILES_AT/pretrain]
#                                            # here: the carried folders below (git-ignored), see
#                                            # bench/device_prepare.py
#
# then one `device` call with one or more modes (run in the order given; the carry is the union):
#
#   mode        carry                                    what, and its time on an H100/H200
#   throughput  .devcache/derm-dev.zip                   #3 data pipeline vs synthetic-tensor ceiling (~60 s)
#   generation  .whl                                     #4 txt2img at batch 8: plain, eager, compiled (~4 min)
#   ti          .whl                                     #4 textual-inversion rows beside the script-like loop (~4 min)
#   finetune    .whl .devcache/derm-dev.zip              #4 LoRA+TI finetune of the demo base on derm-dev + grid (~150 s)
#   inversion   .whl                                     #5 inversion + variants at batch 32: eager, compiled, cached (~8 min)
#   pretrain    .whl .devcache/pretrain                  #8 the derm-dev base in a 7-minute budget, judged (~9 min)
#   speed       .whl                                     the 2026-11-26 set: LoRA training, generation, inversion at batch 8
#   classifier  .devcache/derm-dev.zip .devcache/weights derm-dev recipe (~150 s), throughput (~60 s), `-m gpu` tests
#   loop        .whl .devcache/weights .devcache/pretrain/derm-dev-64.zip
#                                                        #6 configs/derm-dev-small.yaml, one round, sized to the
#                                                        device (untimed; a second call resumes it if /tmp was kept)
#
# e.g. `throughput generation ti` with carry [".whl", ".devcache/derm-dev.zip"] fits one 600 s call.
# `.whl` holds diffusers and open_clip (9 MB); add ".whl-peft" to any carry to run with the peft the tests
# ran with (0.21.2) instead of the machine's own.
#
# derm-dev travels as one stored zip: the tool counts its 12,753 small files at about 59 MiB, the zip is
# 47 MB. The lite0 ImageNet weights travel converted and in fp16 (9 MB; pooled features of the fp16 copy
# have cosine 0.9999 with the fp32 ones). Each step has its own time limit; logs land in $OUT.
#
# The pretrain chain (#8): `prepare` puts into .devcache/pretrain a 64 px JPEG copy of derm-dev (~21 MB;
# the base trains at 64 px anyway), the judge (--judge: a `train-classifier` folder trained on real
# derm-dev, default checkpoints/es-study, trained there on the CPU first if it is missing (~10 min), weights
# in fp16) and, with --resume-from, the newest checkpoint
# of the previous link. The run's step counts are fitted to PRETRAIN_BUDGET minutes of training (default 7:
# one call trains, finishes and judges 128 samples per class); a larger budget makes it a chain of links of
# PRETRAIN_MINUTES (default 8) each, saved without the optimizer state (Adam's moments restart: the state
# would not fit the 64 MiB). A link writes the newest checkpoint to $OUT/pretrain, the last one the
# finished base as one file (derm-dev-base.safetensors), its provenance and the judged grid.
set -u
[ $# -ge 1 ] || { echo "usage: bench/device_session.sh prepare | MODE... (see the header)" >&2; exit 2; }
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

wheels_installed=no
install_wheels() {
    [ $wheels_installed = yes ] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl \
        $(ls .whl-peft/*.whl 2>/dev/null) && wheels_installed=yes
}

unzip_once() {  # unzip_once ZIP FOLDER_IT_MAKES
    [ -d "$2" ] || { mkdir -p .dd && python3 -m zipfile -e "$1" .dd; }
}

run_mode() {
    case $1 in
    throughput)
        unzip_once .devcache/derm-dev.zip .dd/derm-dev || return 1
        step 90 classifier_throughput python3 bench/classifier_throughput.py --data .dd/derm-dev --load-size 128
        ;;
    generation)
        install_wheels || return 1
        step 300 generation python3 bench/generation.py --batch-sizes 8 --repeats 2 --workdir $work
        ;;
    ti)
        install_wheels || return 1
        step 280 diffusion_training_ti python3 bench/diffusion_training.py --skip-lora --steps 15 --warmup 5 \
            --images 128 --workdir $work
        ;;
    inversion)
        install_wheels || return 1
        step 540 inversion_variants python3 bench/inversion_variants.py --batch-size 32 --variants 4 --repeats 1 --compile
        ;;
    speed)
        install_wheels || return 1
        step 240 diffusion_training python3 bench/diffusion_training.py --steps 15 --warmup 5 --images 128 --workdir $work
        step 100 generation python3 bench/generation.py --batch-sizes 8 --repeats 2 --no-compile --workdir $work
        step 120 inversion_variants python3 bench/inversion_variants.py --batch-size 8 --variants 2 --repeats 1
        ;;
    loop)
        install_wheels && unzip_once .devcache/pretrain/derm-dev-64.zip .dd/derm-dev-64 || return 1
        # The shipped study, sized to one device call: derm-dev's 64 px copy (the 128 px zip, the wheels and
        # the ImageNet weights together pass the 64 MiB), a 3-minute base, 10-epoch classifiers, no Inception
        # FID (its weights do not fit either). Report every one of these with the numbers.
        step 560 loop python3 bench/device_loop.py --config derm-dev-small --out $work/loop-run --copy-to "$out/loop" \
            --set data.source=.dd/derm-dev-64 --set classifier.load_size=64 \
            --set base.pretrain.time_budget_minutes=${LOOP_PRETRAIN_BUDGET:-3} \
            --set classifier.epochs=${LOOP_EPOCHS:-10} --set quality.inception_feature=null
        ;;
    classifier)
        unzip_once .devcache/derm-dev.zip .dd/derm-dev || return 1
        step 200 classifier_quality python3 bench/classifier_quality.py --data .dd/derm-dev --only recipe --out $work/cq
        cp $work/cq/derm-dev/recipe/eval-test/metrics.json "$out/classifier_metrics.json"
        step 60 classifier_throughput python3 bench/classifier_throughput.py --data .dd/derm-dev --load-size 128
        step 60 gpu_tests python3 -m pytest -q -m gpu tests/test_classifier_train.py
        ;;
    finetune)
        install_wheels && unzip_once .devcache/derm-dev.zip .dd/derm-dev || return 1
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
    pretrain)
        local chain=.devcache/pretrain newest
        install_wheels && unzip_once $chain/derm-dev-64.zip .dd/derm-dev-64 || return 1
        mkdir -p $work $chain/work "$out/pretrain"
        [ -f $work/manifest-64.csv ] || python3 -c "from lesiongen.data.index import index_dataset as index
index('.dd/derm-dev-64', out='$work/manifest-64.csv', seed=0)" || return 1  # uninstalled: no lesiongen.cli
        step 560 pretrain python3 bench/pretrain_quality.py --config configs/pretrain-derm-dev-gpu.yaml \
            --data $work/manifest-64.csv --judge $chain/judge --samples-per-class 192 --guidance 4 7 10 \
            --time-limit ${PRETRAIN_MINUTES:-8} --time-budget ${PRETRAIN_BUDGET:-7} \
            --work $chain/work --variant "chain:save_optimizer=false,eval_classifier=$chain/judge"
        cp $chain/work/grid-*.png $chain/work/run-chain/lesiongen_base.json "$out/pretrain/" 2>/dev/null
        if [ -f $chain/work/run-chain/model_index.json ]; then
            # the finished base as one fp16 file (files come back at most 2 folders down, 8 in all), for
            # `finetune` and the derm-dev loop (#6)
            python3 -c "from lesiongen.diffusion.loading import load_pipeline as load
from lesiongen.diffusion.single_file import export_single_file as export
export(load('$chain/work/run-chain'), '$out/pretrain/derm-dev-base.safetensors', overwrite=True)"
        else  # the newest checkpoint, for the next link (prepare --resume-from)
            newest=$(ls -d $chain/work/run-chain/checkpoints/checkpoint-* 2>/dev/null | sort -V | tail -n 1)
            [ -n "$newest" ] && cp -r "$newest" "$out/pretrain/"
        fi
        du -sh "$out/pretrain"/*
        ;;
    *)
        echo "unknown mode '$1' (see the header)" >&2
        return 2
        ;;
    esac
}

if [ "$1" = prepare ]; then
    shift
    ${PYTHON:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 || exit 1
    ${PYTHON:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: -d .whl-peft peft==0.21.2 || exit 1
    ${PYTHON:-.venv/bin/python} bench/device_prepare.py "$@" || exit 1
    du -sh .whl .whl-peft .devcache/derm-dev.zip .devcache/weights .devcache/pretrain
    exit 0
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for mode in "$@"; do
    echo "==== mode $mode: $(date +%T)"
    run_mode "$mode" || echo "==== mode $mode failed"
done
