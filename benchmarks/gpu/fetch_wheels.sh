#!/usr/bin/env bash
# Fill .whl/ at the repository root (ignored by git) with what the GPU run carries to the H200 machine, which reaches
# no registry: the wheels its image lacks or has in a version lora-llava cannot use, and LLaVA's instruction texts.
#
#   bash benchmarks/gpu/fetch_wheels.sh          # then: run with carry [".whl"] and `bash benchmarks/gpu/run.sh`
#
# The image (device notes KINDS.md / H200.md): python 3.12, torch 2.11.0+cu130, transformers 5.17.0, peft,
# accelerate 1.15.0, huggingface_hub 1.33.0, tokenizers 0.23.2, pyarrow, pandas, xxhash, fsspec; no bitsandbytes, trl,
# datasets (nor its dill / multiprocess), flash-attn.
#   bitsandbytes 0.50.2  NF4 / paged 8-bit AdamW; its manylinux x86_64 wheel holds libbitsandbytes_cuda130.so (CUDA 13)
#   trl 1.16.0           SFTTrainer (lora-llava's trainer is one; the TRL baseline)
#   datasets 5.2.0       + dill 0.4.1, multiprocess 0.70.19 (py312 wheel): trl's and lora-llava's data path
#   transformers 5.24.0  the image's 5.17.0 lacks TrainingArguments.activation_checkpointing (added in 5.23.0), which
#                        lora-llava's train section uses: every recipe fails to validate on 5.17
#   peft 0.21.2, accelerate 1.16.0   the versions the CPU tests ran with (the image's peft version is unrecorded)
# These are the versions of the project's CPU test environment, so the GPU run runs the code the tests ran.
# flash-attn has no binary wheel: padding-free is measured with transformers' flex_attention (torch) instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
WHEELS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
        peft==0.21.2 accelerate==1.16.0)
rm -rf "$DEST"
mkdir -p "$DEST"
# The platform tags pip must match for the image's python 3.12 on x86_64 (bitsandbytes' wheel is manylinux_2_24).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
# LLaVA's real GPT-4 instruction texts for the synthetic training data (the shared assets stay behind on this side).
QA=../shared/assets/llava-samples/coco2014_val_gpt4_qa_30x3.jsonl
if [ -f "$QA" ]; then
    mkdir -p "$DEST/assets"
    cp "$QA" "$DEST/assets/"
else
    echo "note: $QA not found: the GPU run will use generated sentences for the training texts"
fi
"$PY" -m benchmarks.gpu.wheel_check "$DEST"
