#!/usr/bin/env bash
# The prepared GPU run of issue 20: one command on the lent H200 that installs the carried wheels and runs the whole
# measurement plan in priority order, each step under its own time budget, writing figures to $OUT as it goes (a run
# cut short still brings back what it measured).
#
#   device run: carry [".whl"], timeout_s 600, command `bash benchmarks/gpu/run.sh`
#               (.whl/ from `bash benchmarks/gpu/fetch_wheels.sh` on the development machine first)
#   CPU dry run: bash benchmarks/gpu/run.sh --dry-run       (the same steps and code paths at tiny shapes)
#
# Options: --dry-run; --budget SECONDS (the whole run; default 570 on the GPU, leaving 30 s of the 600 s command limit,
# 1800 in a dry run); --only "STEP ..." (run these steps alone). Environment: OUT (default /tmp/gpu-run/out), WORK
# (default: a folder on the disk with the most free space), PYTHON (default python3).
#
# Steps, in priority order, each with (max s, min s) on the GPU; a step gets min(max, what is left) and is skipped
# when that is under its min (dry run: 3x both):
#   env          (60, 20)   install check, versions, GPU, measured matmul / copy ceilings, bitsandbytes + flex probes
#   7b_mb1      (270,150)   (a) 7B stage 2, micro-batch 1, seq 2048, r=128: lora-llava vs TRL (writes the 7B checkpoint)
#   7b_switches (150, 60)   (b) paged 8-bit AdamW, bf16 trainables at micro-batch 1
#   7b_b4       (230, 60)   (b) padding-free at the recipe's micro-batch 4: padded sdpa, padding-free with flex attention
#                           and with sdpa, TRL (2 warm-up steps: flex attention compiles for a static, then a dynamic
#                           shape)
#   flex         (60, 30)   (b) padding-free kernels agree with padded sdpa (tiny model)
#   pytest      (120, 45)   (c) python -m pytest -m gpu tests
#   13b_mb1     (300,200)   (d) 13B stage 2, micro-batch 1: lora-llava vs TRL (writes the 13B checkpoint)
#   export       (90, 40)   (e) merged tiny export: greedy tokens in bf16 on CUDA vs the CPU
# $OUT (8 files at most come back): run.log, 7b-mb1.json, 7b-switches.json, 7b-b4.json, 13b-mb1.json (train_step
# --json), summary.md, checks.json, logs.tar.gz (rewritten after every step).
set -u -o pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

DRY=0
BUDGET_ALL=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET_ALL=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)"; exit 2 ;;
    esac
    shift
done
if [ "$DRY" = 1 ]; then SCALE=3; BUDGET_ALL=${BUDGET_ALL:-1800}; else SCALE=1; BUDGET_ALL=${BUDGET_ALL:-570}; fi
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-run/out}
if [ -z "${WORK:-}" ]; then  # checkpoints of 14 / 26 GB: the disk with the most room, not a small tmpfs
    best=/tmp
    for d in /tmp /var/tmp "$REPO"; do
        if [ -d "$d" ] && [ "$(df -Pk "$d" | awk 'NR==2{print $4}')" -gt "$(df -Pk "$best" | awk 'NR==2{print $4}')" ]
        then best=$d; fi
    done
    WORK=$best/gpu-run-work
    [ "$best" = "$REPO" ] && WORK=$REPO/.gpu-work
fi
mkdir -p "$OUT" "$WORK"
rm -f "$WORK/ledger.tsv"
# A whole run starts clean ($OUT is emptied on the device anyway); --only keeps the other steps' files.
[ -z "$ONLY" ] && rm -f "$OUT"/{run.log,7b-mb1.json,7b-switches.json,7b-b4.json,13b-mb1.json,summary.md,checks.json} \
    "$WORK"/{env,flex-check,export-check}.json "$WORK/pytest-gpu.log"
exec > >(tee -a "$OUT/run.log") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf LORA_LLAVA_CACHE=$WORK/lora-llava-cache TRANSFORMERS_VERBOSITY=error
START=$(date +%s)
RESERVE=15  # for the last summary
left() { echo $((BUDGET_ALL - ($(date +%s) - START))); }
echo "== GPU run (issue 20): $(date -u +%FT%TZ), dry run $DRY, budget ${BUDGET_ALL} s, OUT $OUT, WORK $WORK"
echo "== disk: $(df -Ph "$WORK" | awk 'NR==2{print $4" free on "$6}')"

# --- the carried wheels -------------------------------------------------------------------------------------------
WHEEL_PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
                 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
if compgen -G ".whl/*.whl" > /dev/null; then
    t0=$(date +%s)
    if [ "$DRY" = 1 ]; then
        # The image's python is 3.12: install the same set for it into a scratch folder (checks the set installs
        # together); this CPU's environment already has the same versions (fetch_wheels.sh pins them).
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site-dry" \
            --python-version 3.12 --implementation cp --only-binary=:all: "${WHEEL_PLATFORMS[@]}" .whl/*.whl \
            && echo "== wheels: the carried set installs for python 3.12 ($(($(date +%s) - t0)) s; not used here)" \
            || echo "== wheels: FAILED to install for python 3.12"
    else
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "== wheels: install FAILED: nothing can run without bitsandbytes / trl"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "== wheels: installed to /tmp/site in $(($(date +%s) - t0)) s"
    fi
else
    echo "== wheels: no .whl/ here (run benchmarks/gpu/fetch_wheels.sh and carry .whl)"
    [ "$DRY" = 1 ] || echo "== continuing: the image lacks bitsandbytes / trl / datasets, so most steps will fail"
fi
ASSETS=()
[ -f .whl/assets/coco2014_val_gpt4_qa_30x3.jsonl ] && ASSETS=(--assets .whl/assets)

# --- steps ---------------------------------------------------------------------------------------------------------
TRAIN_JSON=("$OUT/7b-mb1.json" "$OUT/7b-switches.json" "$OUT/7b-b4.json" "$OUT/13b-mb1.json")
summary() {
    "$PY" -m benchmarks.gpu.summary --work "$WORK" --out "$OUT" "${TRAIN_JSON[@]}" > "$WORK/summary.stdout" 2>&1 \
        || { echo "== summary failed:"; tail -5 "$WORK/summary.stdout"; }
}
# train_step with the step's budget (BUDGET, set by step) less a margin, so it ends on its own and writes its JSON.
train_step() {
    "$PY" -m benchmarks.train_step --workdir "$WORK/ts" --stage 2 --time-budget $((BUDGET - 12)) "${ASSETS[@]}" \
        --min-config-seconds "$MINCFG" "$@"
}
if [ "$DRY" = 1 ]; then
    SHAPE=tiny; SEQ=1024; MB1_STEPS=(--warmup 1 --steps 2); B4_STEPS=(--warmup 1 --steps 1); MINCFG=20
else  # a 7B worker needs ~40 s or more (imports, load + NF4 quantization, steps): no start with less
    SHAPE=7b; SEQ=2048; MB1_STEPS=(--warmup 2 --steps 6); B4_STEPS=(--warmup 2 --steps 3); MINCFG=40
fi

step_env() { "$PY" -m benchmarks.gpu.env_check --json "$WORK/env.json"; }
step_7b_mb1() {
    if [ "$DRY" = 1 ]; then  # the real 7B layout (index only) and planner, then the same path at the tiny shape
        train_step --dry-run --shape 7b --seq-len 2048 --configs ours trl | tail -8 || return 1
    fi
    train_step --shape $SHAPE --seq-len $SEQ --batch 1 "${MB1_STEPS[@]}" --configs ours trl --timeout 200 \
        --json "$OUT/7b-mb1.json"
}
step_7b_switches() {
    train_step --shape $SHAPE --seq-len $SEQ --batch 1 "${MB1_STEPS[@]}" --configs paged_adamw_8bit bf16_trainables \
        --timeout 120 --json "$OUT/7b-switches.json"
}
step_7b_b4() {
    train_step --shape $SHAPE --seq-len $SEQ --batch 4 "${B4_STEPS[@]}" \
        --configs no_padding_free padding_free_flex ours trl --timeout 150 --json "$OUT/7b-b4.json"
}
step_flex() { "$PY" -m benchmarks.gpu.flex_check --workdir "$WORK/flex" "${ASSETS[@]}" --json "$WORK/flex-check.json"; }
step_pytest() {
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$WORK/pytest-gpu.log" 2>&1
    local rc=$?
    tail -25 "$WORK/pytest-gpu.log"
    return $rc
}
step_13b_mb1() {
    if [ "$DRY" = 1 ]; then  # the 13B layout and planner (index only); the training path is the 7B step's
        train_step --dry-run --shape 13b --seq-len 2048 --configs ours trl
        return
    fi
    rm -rf "$WORK/ts/ckpt-7b"  # 14 GB: room for the 26 GB of the 13B checkpoint
    train_step --shape 13b --seq-len 2048 --batch 1 --warmup 2 --steps 4 --configs ours trl --timeout 200 \
        --json "$OUT/13b-mb1.json"
}
step_export() { "$PY" -m benchmarks.gpu.export_check --workdir "$WORK/export" --json "$WORK/export-check.json"; }

# step NAME MAX MIN: run step_NAME under min(MAX, what is left) seconds, or skip it; a ledger line either way.
step() {
    local name=$1 max=$(($2 * SCALE)) min=$(($3 * SCALE)) avail status rc t0 secs
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    avail=$(($(left) - RESERVE))
    BUDGET=$((max < avail ? max : avail))
    if [ "$BUDGET" -lt "$min" ]; then
        echo "== step $name: SKIPPED (${avail} s left, needs ${min} s)"
        printf '%s\t%s\t0\t-\tskipped: %s s left, needs %s s\n' "$name" "$BUDGET" "$avail" "$min" >> "$WORK/ledger.tsv"
        summary
        return
    fi
    echo "== step $name: budget $BUDGET s ($(left) s left in the run) at $(date -u +%T)"
    t0=$(date +%s)
    timeout --kill-after=10 "$BUDGET" bash -c "$(declare -f); $(declare -p DRY SCALE PY OUT WORK SHAPE SEQ ASSETS \
        MB1_STEPS B4_STEPS MINCFG BUDGET); step_$name" > >(tee "$WORK/step-$name.log") 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status=failed ;; esac
    echo "== step $name: $status (exit $rc) after $secs s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$BUDGET" "$secs" "$rc" "$status" >> "$WORK/ledger.tsv"
    summary
}

step env 60 20
step 7b_mb1 270 150
step 7b_switches 150 60
step 7b_b4 230 60
step flex 60 30
step pytest 120 45
step 13b_mb1 300 200
step export 90 40

echo
echo "== full train_step report of the JSON files written"
existing=()
for f in "${TRAIN_JSON[@]}"; do [ -f "$f" ] && existing+=("$f"); done
[ ${#existing[@]} -gt 0 ] && "$PY" -m benchmarks.train_step --from-json "${existing[@]}"
summary
cat "$OUT/summary.md"
echo "== done in $(($(date +%s) - START)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
