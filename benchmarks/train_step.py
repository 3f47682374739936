"""Training-step benchmark: peak memory, step time, tokens/s and MFU of lora-llava against TRL's SFTTrainer, and the
recipe's speed / memory switches measured on and off (issue 7).

Models: LLaVA-1.5-7B- and 13B-shaped checkpoints with random weights: Vicuna shapes from
``lora_llava.planner.KNOWN_SHAPES``, the CLIP ViT-L/14-336 tower (576 image tokens), the real Vicuna tokenizer with
``<image>`` / ``<pad>`` (vocabulary 32,064). Nothing is downloaded: the names and shapes of the weights come from a
``LlavaForConditionalGeneration`` built on the meta device, and random bf16 tensors (std 0.02; norms 1, biases 0) are
written shard by shard in the llava-hf layout next to the processor. The model is then loaded by lora-llava's own path
(``model.llava: <folder>``, ``quant.bits: 4``), so it is what ``lora-llava sft`` trains: NF4 language model, LoRA
r=128 / alpha 256 on q/k/v/o/gate/up/down and the projector trained in stage 2, the projector alone in stage 1, CLIP
frozen. ``tiny`` (Llama hidden 256 x 2 layers, a 2-layer CLIP tower of width 64, still 336 px / patch 14 = 576 image
tokens) is the CPU shape.

Data: LLaVA-format records with random RGB JPEGs (smooth noise, 300x225 to 1280x720) and real GPT-4 instruction text
(LLaVA's coco2014_val_gpt4_qa in /work/shared/assets, else generated sentences). Stage 2: multi-turn image
conversations whose token counts (576 image tokens included, measured with lora-llava's tokenizer path) spread from
~650 to the sequence length (60% up to 900, 30% up to 1,400, 10% beyond; the first one at the full length so that the
peak covers it), 10% text-only conversations. Stage 1: image + one short caption (~600-650 tokens, the plain
template). One epoch of exactly (warm-up + timed) x batch samples, so every sample is seen once.

Configurations, each in its own subprocess (a clean peak), side by side with ratios to ``ours``:
  ours              lora_llava.training.train (LlavaSFTTrainer, LlavaCollator) at the recipe settings: QLoRA r=128,
                    activation checkpointing, group_by_modality_length, data.padding_free, attention ``auto``
                    (flash_attention_2 with flash-attn on CUDA, else sdpa), optimizer SFTConfig's default
  trl               trl.SFTTrainer + DataCollatorForVisionLanguageModeling (padding, its default labels: every non-pad
                    token), on the same model (lora-llava's build_model: same NF4 model, LoRA, trainable projector),
                    same batch, data, attention; the vicuna_v1 (stage 2) / plain (stage 1) prompt as a chat template
  no_padding_free   ours with data.padding_free: false
  liger             ours with train.use_liger_kernel: true (needs liger-kernel and CUDA)
  paged_adamw_8bit  ours with train.optim: paged_adamw_8bit
  bf16_trainables   ours with model.dtype + train.trainable_dtype: bfloat16 (GPU only)
  workers           ours with train.dataloader_num_workers: 2 + train.dataloader_pin_memory: true

Per step (a TrainerCallback, torch.cuda.synchronize on a GPU): wall time from one on_step_end to the next (data
loading and logging included), the optimizer step, and the batch's non-pad tokens (attention-mask sums, or the
padding-free sample lengths). Step time = median over the timed steps; tokens/s = timed tokens / timed wall time.
Peak memory = torch.cuda.max_memory_allocated after reset_peak_memory_stats at on_train_begin (weights, optimizer
state, activations); on the CPU the peak RSS of the whole worker process instead (getrusage), not comparable.

FLOPs, the same formula for every configuration, model FLOPs (activation-checkpointing recompute NOT counted, so the
MFU here is model-FLOPs utilisation, below hardware utilisation) against the GPU's dense bf16 peak:
  per sample of S tokens (its 576 image tokens included), language model, frozen NF4 weights:
      (4 * (N_lin + V * d) + 6 * N_lora) * S  +  6 * L * d * S^2
    N_lin = L * (2 d^2 + 2 d d_kv + 3 d I) linear weights, V * d the LM head (counted at every position),
    4 = forward 2 + input-gradient 2 (frozen weights need no weight gradient); 6 * N_lora: LoRA forward, input- and
    weight-gradient (stage 2; 0 in stage 1); 6 L d S^2: causal attention, forward 2 L d S^2 + backward 4 L d S^2.
  per image: frozen CLIP forward over P = 577 positions for the L_v - 1 layers LLaVA uses (feature layer -2):
      2 * P * (L_v - 1) * (4 dv^2 + 2 dv Iv)  +  4 * (L_v - 1) * dv * P^2  +  2 * 576 * (3 * 14^2 * dv)
  plus the trained projector: 576 * (4 * dv * d + 6 * d^2) (forward + weight gradients, input gradient of linear_2).
  With the 6 * N convention of full fine-tuning the language-model part would be 1.5x larger.

Goals (issue 7; GPU, stage 2, micro-batch 1, seq 2048, r=128): 13B peak <= 16 GiB, 7B peak <= 10 GiB, tokens/s >= 2x
TRL, MFU >= 40% on an H100. Also printed: the planner's estimate (lora_llava.planner.plan at the longest measured row)
against each measured peak (goal: within 15%), and the wall time of the full LLaVA-1.5-7B recipe (558,128 stage-1 +
665,298 stage-2 samples) projected from the measured time per sample, the optimizer step spread over the recipe's
global batch (256 / 128).

    python benchmarks/train_step.py [--shape tiny|7b|13b ...] [--stage 1 2] [--batch 1] [--seq-len 2048]
        [--steps N] [--warmup N] [--configs NAME ...] [--json OUT] [--workdir DIR] [--dry-run]
    python benchmarks/train_step.py --from-json A.json B.json     # one report from several (partial) runs

Defaults: with CUDA shapes 7b and 13b, seq 2048, 3 warm-up + 10 timed steps; without, shape tiny, seq 1024, 2 + 5
steps and one thread per worker (about 3.5 minutes on 2 shared CPU cores). The CPU figures time a tiny model and say
little about a GPU; they check that every path runs. A full GPU run is up to 28 workers, each loading its model;
split it with --shape / --stage / --configs, keep the checkpoints and data between the parts with --workdir (7b 14 GB,
13b 27 GB of disk), write each part with --json (rewritten after every configuration) and print them together with
--from-json, e.g.:

    python benchmarks/train_step.py --workdir /tmp/ts --shape 7b --stage 2 --configs ours trl --json 7b-2a.json
    python benchmarks/train_step.py --workdir /tmp/ts --shape 7b --stage 2 --configs workers --json 7b-2b.json
    python benchmarks/train_step.py --from-json 7b-2a.json 7b-2b.json

--dry-run writes config, processor and shard index (no tensor data; real shards for tiny), checks the parameter count
(7b: llava-hf's 7,063,427,072) and key names against transformers, validates every configuration's recipe and prints
the planner's estimate, without training.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import ASSETS, CHAT_TEMPLATE, machine, read_qa  # noqa: E402 - the sibling benchmark's TRL setup

GiB = 1024**3
# The shapes of lora_llava.planner.KNOWN_SHAPES, plus what a checkpoint needs beyond the planner's fields.
SHAPE_SOURCES = {"7b": "llava-hf/llava-1.5-7b-hf", "13b": "llava-hf/llava-1.5-13b-hf"}
TINY = {"hidden": 256, "intermediate": 688, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 32064,
        "vision_hidden": 64, "vision_intermediate": 256, "vision_layers": 2, "image_size": 336, "patch_size": 14}
KNOWN_PARAMS = {"7b": 7_063_427_072}  # llava-hf/llava-1.5-7b-hf, as its model card counts it
PEAK_TFLOPS = [(("H200",), 989), (("H100", "PCIe"), 756), (("H100",), 989), (("A100",), 312), (("L40S",), 362),
               (("4090",), 165), (("3090",), 71)]  # dense bf16, no sparsity
STAGE_SAMPLES = {1: 558_128, 2: 665_298}  # blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json
GLOBAL_BATCH = {1: 256, 2: 128}  # recipes/llava15_7b_pretrain.yaml, recipes/llava15_7b.yaml
GOAL_PEAK_GIB = {"7b": 10, "13b": 16}
CONFIGS = {
    "ours": ("lora-llava at the recipe settings", {}),
    "trl": ("TRL SFTTrainer + DataCollatorForVisionLanguageModeling", {"data": {"padding_free": False},
                                                                        "train": {"group_by_modality_length": False}}),
    "no_padding_free": ("data.padding_free: false", {"data": {"padding_free": False}}),
    "liger": ("train.use_liger_kernel: true", {"train": {"use_liger_kernel": True}}),
    "paged_adamw_8bit": ("train.optim: paged_adamw_8bit", {"train": {"optim": "paged_adamw_8bit"}}),
    "bf16_trainables": ("train.trainable_dtype: bfloat16", {"model": {"dtype": "bfloat16"},
                                                            "train": {"trainable_dtype": "bfloat16"}}),
    "workers": ("dataloader_num_workers: 2 + pin_memory", {"train": {"dataloader_num_workers": 2,
                                                                     "dataloader_pin_memory": True}}),
}
PLAIN_TEMPLATE = (  # LLaVA's stage-1 "plain" prompt, "<s><image>{caption}\n", as a chat template for TRL
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% else %}{% generation %}{% for p in m['content'] %}"
    "{{ p['text'] }}{% endfor %}\n{% endgeneration %}{% endif %}{% endfor %}"
)
STAGE1_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                  "Share a concise interpretation of the image provided.", "Summarize the visual content of the image.")
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (1024, 768), (375, 500), (612, 612),
               (640, 360), (800, 533), (336, 448), (1280, 720), (300, 225), (640, 512))


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs


def shape_spec(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    from lora_llava.loading import padded_vocab
    from lora_llava.planner import KNOWN_SHAPES

    spec = dict(KNOWN_SHAPES[SHAPE_SOURCES[name]])
    spec["vocab"] = padded_vocab(spec["vocab"] + 2)  # + <image>, <pad>, padded to 64 as llava-hf: 32,064
    return spec


def param_counts(s: dict, stage: int, r: int) -> dict:
    d, i, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    dv, iv = s["vision_hidden"], s["vision_intermediate"]
    lora = s["layers"] * r * (2 * (d + d) + 2 * (d + kv) + 2 * (d + i) + (i + d)) if stage == 2 else 0
    return {"lin": s["layers"] * (2 * d * d + 2 * d * kv + 3 * d * i), "head": s["vocab"] * d, "lora": lora,
            "vision_layer": 4 * dv * dv + 2 * dv * iv, "projector": dv * d + d * d}


def step_flops(s: dict, stage: int, r: int, lengths: list[int], images: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    n = param_counts(s, stage, r)
    d, dv = s["hidden"], s["vision_hidden"]
    tokens = (s["image_size"] // s["patch_size"]) ** 2
    per_token = 4 * (n["lin"] + n["head"]) + 6 * n["lora"]
    llm = sum(per_token * x + 6 * s["layers"] * d * x * x for x in lengths)
    p, lv = tokens + 1, s["vision_layers"] - 1
    vision = 2 * p * lv * n["vision_layer"] + 4 * lv * dv * p * p + 2 * tokens * 3 * s["patch_size"] ** 2 * dv
    projector = tokens * (4 * dv * d + 6 * d * d)
    return llm + images * (vision + projector)


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    for keys, tflops in PEAK_TFLOPS:
        if all(k.lower() in device.lower() for k in keys):
            return tflops
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Random-weight checkpoint in the llava-hf layout


def llava_hf_config(s: dict):
    from transformers import CLIPVisionConfig, LlamaConfig

    from lora_llava.loading import llava_config

    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
                              num_hidden_layers=s["vision_layers"],
                              num_attention_heads=max(1, s["vision_hidden"] // 64),
                              image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return llava_config(text, vision, 32000, pad_token_id=32001, tie_word_embeddings=False)


def write_checkpoint(folder: Path, shape: str, dry_run: bool, shard_bytes: int = 2 * 10**9) -> dict:
    """Config, processor and bf16 safetensors shards + index of a random LLaVA of ``shape`` (tensor data skipped
    when ``dry_run``). Returns what was written. A folder written before for the same shape is reused."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from lora_llava.data.images import CLIP_MEAN
    from lora_llava.demo import vicuna_tokenizer
    from lora_llava.loading import add_llava_tokens
    from lora_llava.shards import to_hf, write_safetensors

    s = shape_spec(shape)
    marker = folder / "benchmark_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"shape": s, "dry_run": dry_run}:
        return json.loads((folder / "benchmark_info.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = llava_hf_config(s)
    with torch.device("meta"):
        names = {k: (tuple(v.shape), v.numel()) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    total = sum(n for _, n in names.values())
    need = 2 * total
    free = shutil.disk_usage(folder).free
    if not dry_run and free < need + GiB:
        sys.exit(f"error: the {shape} checkpoint needs {need / 1e9:.1f} GB, {folder} has {free / 1e9:.1f} GB free; "
                 "use --workdir on a larger disk or --dry-run")
    config.save_pretrained(folder)
    tok = vicuna_tokenizer()
    add_llava_tokens(tok)
    size = s["image_size"]
    clip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=[0.26862954, 0.26130258, 0.27577711])
    LlavaProcessor(image_processor=clip, tokenizer=tok, patch_size=s["patch_size"], num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", image_token="<image>").save_pretrained(folder)  # noqa: S106

    shards: list[list[str]] = [[]]
    used = 0
    for name, (_, n) in names.items():
        if shards[-1] and used + 2 * n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += 2 * n
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    t = time.perf_counter()
    if not dry_run:
        # Values from one pool of N(0, 0.02) numbers at random offsets: drawing 13B normals one by one takes minutes
        # and the values play no part in speed or memory.
        gen = torch.Generator().manual_seed(0)
        pool = (torch.randn(2**24 + 7, generator=gen) * 0.02).to(torch.bfloat16)
        for file, members in zip(files, shards):
            tensors = {}
            for name in members:
                shape_, n = names[name]
                if name.endswith("bias"):
                    tensors[to_hf(name)] = torch.zeros(shape_, dtype=torch.bfloat16)
                elif "norm" in name.rsplit(".", 2)[-2] or "layrnorm" in name:
                    tensors[to_hf(name)] = torch.ones(shape_, dtype=torch.bfloat16)
                else:
                    off = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                    reps = -(-(off + n) // pool.numel())
                    flat = pool.repeat(reps)[off:off + n] if reps > 1 else pool[off:off + n]
                    tensors[to_hf(name)] = flat.clone().reshape(shape_)
            write_safetensors(folder / file, tensors, metadata={"format": "pt"})
            del tensors
    weight_map = {to_hf(name): file for file, members in zip(files, shards) for name in members}
    index = {"metadata": {"total_size": 2 * total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    groups = {"language model": 0, "vision tower": 0, "projector": 0, "lm_head": 0}
    for name, (_, n) in names.items():
        key = ("vision tower" if ".vision_tower." in name else "projector" if "multi_modal_projector" in name
               else "lm_head" if name.startswith("lm_head") else "language model")
        groups[key] += n
    info = {"shape": shape, "params": total, "bytes": 2 * total, "shards": len(files), "groups": groups,
            "seconds": round(time.perf_counter() - t, 1), "tensors": len(names), "dry_run": dry_run}
    (folder / "benchmark_info.json").write_text(json.dumps(info))
    marker.write_text(json.dumps({"shape": s, "dry_run": dry_run}))
    return info


def check_checkpoint(folder: Path, shape: str, info: dict) -> list[str]:
    """Parameter count and key names against what transformers expects; for real shards also a load of the tiny one
    with transformers' loading report (a key it did not find would be silently random-initialised)."""
    import torch
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from lora_llava.shards import to_hf

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    problems = []
    config = LlavaConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {to_hf(k) for k in LlavaForConditionalGeneration(config).state_dict()}
    index = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    if index != expected:
        problems.append(f"index keys differ from the model's: {sorted(index ^ expected)[:4]}")
    if shape in KNOWN_PARAMS and info["params"] != KNOWN_PARAMS[shape]:
        problems.append(f"{info['params']:,} parameters, llava-hf has {KNOWN_PARAMS[shape]:,}")
    if not info["dry_run"] and info["params"] < 10**9:
        _, report = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        bad = {k: v for k, v in report.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            problems.append(f"transformers' loading report: {bad}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data


def _sentences(rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs: the real GPT-4 instruction data when at hand, else generated sentences."""
    if (ASSETS / "coco2014_val_gpt4_qa_30x3.jsonl").is_file():
        return [p for g in read_qa().values() for p in g]
    words = ("the a man woman dog cat street table window red blue green large small two three people car tree "
             "building sign water sky standing sitting holding next to near behind in on with of and is are "
             "picture image scene shows appears likely because while background foreground").split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [(sentence(rng.randint(6, 14)).rstrip(".") + "?", " ".join(sentence(rng.randint(8, 22))
                                                                     for _ in range(rng.randint(2, 9))))
            for _ in range(200)]


def make_data(folder: Path, stage: int, n: int, seq_len: int, seed: int) -> dict:
    """Write ``n`` LLaVA-format records (``records.json``) and their JPEGs to ``folder``; see the module docstring."""
    import numpy as np
    from PIL import Image

    from lora_llava.data import Sample, encode_sample, get_template
    from lora_llava.demo import vicuna_tokenizer
    from lora_llava.loading import add_llava_tokens

    rng = random.Random(seed * 10 + stage)
    nrng = np.random.default_rng(seed * 10 + stage)
    tok = vicuna_tokenizer()
    add_llava_tokens(tok)
    template = get_template("plain" if stage == 1 else "vicuna_v1")
    image_id = tok.convert_tokens_to_ids("<image>")

    def length(turns: list[tuple[str, str]], image: bool) -> int:
        return len(encode_sample(Sample("x", turns, ["x"] if image else []), tok, template, image_id, 576).input_ids)

    pairs = _sentences(rng)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n_text = 0 if stage == 1 else max(1, round(0.1 * n))
    records, lengths = [], []
    for k in range(n):
        image = k >= n_text
        if stage == 1:
            caption = rng.choice(pairs)[1].split(". ")[0].rstrip(".") + "."
            turns = [("human", "<image>\n" + rng.choice(STAGE1_PROMPTS)), ("gpt", caption)]
        else:
            u = rng.random()
            lo, hi = (650, 900) if u < 0.6 else (900, 1400) if u < 0.9 else (1400, seq_len)
            target = seq_len - 8 if k == n_text else rng.randint(min(lo, seq_len - 64), min(hi, seq_len - 8))
            if not image:
                target = rng.randint(min(200, seq_len // 2), seq_len - 8)
            turns = []
            for q, a in rng.sample(pairs, len(pairs)):
                turns += [("human", ("<image>\n" + q) if image and not turns else q), ("gpt", a)]
                if length(turns, image) >= target:
                    words = a.split()
                    lo_w, hi_w = 1, len(words)  # the longest answer prefix that keeps the sample <= target
                    while lo_w < hi_w:
                        mid = (lo_w + hi_w + 1) // 2
                        turns[-1] = ("gpt", " ".join(words[:mid]))
                        lo_w, hi_w = (mid, hi_w) if length(turns, image) <= target else (lo_w, mid - 1)
                    turns[-1] = ("gpt", " ".join(words[:lo_w]))
                    break
        rec = {"id": f"s{stage}-{k}", "conversations": [{"from": r, "value": v} for r, v in turns]}
        if image:
            w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
            noise = nrng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
            rec["image"] = f"images/s{stage}_{k:04d}.jpg"
            Image.fromarray(noise).resize((w, h), Image.BICUBIC).save(folder / rec["image"], quality=90)
        records.append(rec)
        lengths.append(length(turns, image))
    rng.shuffle(records)
    (folder / "records.json").write_text(json.dumps(records))
    return {"n": n, "text_only": n_text, "min": min(lengths), "median": statistics.median(lengths),
            "max": max(lengths), "tokens": sum(lengths)}


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def recipe_dict(ckpt: Path, data: Path, run: Path, stage: int, args, config: str) -> dict:
    base = {
        "model": {"llava": str(ckpt), "attn_implementation": "auto", "dtype": "auto"},
        "quant": {"bits": 4},
        "lora": {"r": 128, "lora_alpha": 256, "lora_dropout": 0.05},
        "data": {"image_folder": str(data), "max_length": args.seq_len, "padding_free": True, "cache": False,
                 "template": "auto"},
        "train": {"stage": stage, "output_dir": str(run), "max_steps": args.warmup + args.steps,
                  "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
                  "learning_rate": 1e-3 if stage == 1 else 2e-4, "activation_checkpointing": True,
                  "group_by_modality_length": True, "logging_steps": 10, "save_strategy": "no", "report_to": "none",
                  "seed": 0},
    }
    return deep_merge(base, CONFIGS[config][1])


def skip_reason(config: str, cuda: bool) -> str | None:
    """Why a configuration cannot run here, or None."""
    from lora_llava.recipe import TrainSection

    if config == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install liger-kernel)"
        if not cuda:
            return "liger-kernel's Triton kernels need a CUDA GPU"
    if config == "bf16_trainables":
        if "trainable_dtype" not in {f.name for f in __import__("dataclasses").fields(TrainSection)}:
            return "this lora-llava has no train.trainable_dtype"
        if not cuda:
            return "GPU only: needs model.dtype bfloat16, and a CPU run computes in fp32"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration in its own process


def _instrument(base):
    """``base`` (a Trainer class) recording per-step times, tokens and the peak memory."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.pending = {"lengths": [], "images": 0, "rows": 0, "padded": 0, "targets": 0}
            self.info: dict = {}
            self.last = self.begin = self.opt_start = 0.0
            self.opt = 0.0

        def batch(self, inputs: dict) -> None:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            if mask is not None:
                lengths = mask.sum(1).tolist()
            elif "position_ids" in inputs:  # padding-free: one row, positions restart at 0 for each sample
                pos = inputs["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
                lengths = [b - a for a, b in zip(starts, starts[1:])]
            else:
                lengths = [ids.shape[1]] * ids.shape[0]
            p = self.pending
            p["lengths"] += [int(x) for x in lengths]
            p["images"] += int(inputs["pixel_values"].shape[0]) if inputs.get("pixel_values") is not None else 0
            p["rows"] += ids.shape[0]
            p["padded"] += ids.numel()
            p["targets"] += int((inputs["labels"][:, 1:] != -100).sum())

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.last = now()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.opt_start = now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.opt = now() - self.opt_start

        def on_step_end(self, args, state, control, **kwargs):
            t = now()
            p = self.pending
            self.steps.append({"wall": t - self.last, "compute": t - self.begin, "optimizer": self.opt,
                               "tokens": sum(p["lengths"]), **p})
            self.pending = {"lengths": [], "images": 0, "rows": 0, "padded": 0, "targets": 0}
            self.last = t

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if cuda:
                self.info.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_kind="cuda max_memory_allocated",
                                 reserved_bytes=torch.cuda.max_memory_reserved())
            else:
                self.info.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 peak_kind="peak RSS of the process")
            base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = getattr(optimizer, "optimizer", optimizer)
            self.info.update(
                attention=getattr(base_model.config, "_attn_implementation", "?"),
                compute_dtype=str(base_model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                trainable_dtype=",".join(sorted({str(p.dtype).removeprefix("torch.") for p in trainable})),
                trainable_params=sum(p.numel() for p in trainable),
                optimizer=f"{args.optim.value if hasattr(args.optim, 'value') else args.optim} "
                          f"({type(opt).__name__})",
            )

    class Benchmarked(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.recorder = Recorder()
            self.add_callback(self.recorder)
            RECORDERS.append(self.recorder)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.recorder.batch(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    return Benchmarked


RECORDERS: list = []


def trl_dataset(records: list[dict], image_folder: Path):
    """The records as TRL's conversational vision dataset: ``messages`` + ``images`` (decoded lazily, as a
    ``datasets`` Image column is in a real TRL run)."""
    import datasets

    messages, images = [], []
    for r in records:
        messages.append([{"role": "user" if t["from"] == "human" else "assistant",
                          "content": t["value"].replace("<image>\n", "")} for t in r["conversations"]])
        images.append([str(image_folder / r["image"])] if "image" in r else [])
    ds = datasets.Dataset.from_dict({"messages": messages, "images": images})
    return ds.cast_column("images", datasets.List(datasets.Image()))


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import dataclasses
    import logging

    import datasets
    import torch
    import transformers

    from lora_llava import training
    from lora_llava.recipe import recipe_from_dict

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe = recipe_from_dict(spec["recipe"])
    records = json.loads(Path(spec["records"]).read_text())
    notes = []
    t = time.perf_counter()
    if spec["config"] == "trl":
        from trl import SFTTrainer

        from lora_llava.modeling import build_model

        model, processor = build_model(recipe)  # the same NF4 model, LoRA and trainable projector as ours
        processor.chat_template = PLAIN_TEMPLATE if recipe.train.stage == 1 else CHAT_TEMPLATE
        dtype = model.get_input_embeddings().weight.dtype
        args = dataclasses.replace(training.sft_config(recipe, dtype), remove_unused_columns=True,
                                   dataset_kwargs=None, max_length=recipe.data.max_length)
        trainer = _instrument(SFTTrainer)(model=model, args=args, processing_class=processor,
                                          train_dataset=trl_dataset(records, Path(recipe.data.image_folder)))
        cast = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
        if dtype == torch.float32 and cast != ["torch.float32"]:
            # TRL casts the trainable weights of a quantized model to bf16, which an fp32 (CPU) model cannot run
            # (the projector's matmul gets fp32 inputs): put them back in fp32 here only.
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            notes.append("TRL's bf16 cast of the trainables undone (fp32 CPU model)")
        trainer.train()
    else:
        original = training._trainer_class
        training._trainer_class = lambda: _instrument(original())
        training.save_run = lambda *a, **k: None  # the run folder is not part of the measurement
        training.train(recipe, train_records=records)
    if "paged" in str(recipe.train.optim) and not torch.cuda.is_available():
        notes.append("bitsandbytes: paged optimizers fall back to non-paged on the CPU")
    rec = RECORDERS[-1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    out = {"status": "ok", "steps": rec.steps, **rec.info, "device": device, "gpu_bytes": gpu_bytes, "notes": notes,
           "seconds": time.perf_counter() - t}
    Path(spec["out"]).write_text(json.dumps(out))


def run_worker(workdir: Path, tag: str, spec: dict, timeout: float | None, threads: int | None) -> dict:
    spec_path, log = workdir / f"{tag}.spec.json", workdir / f"{tag}.log"
    spec["out"] = str(workdir / f"{tag}.result.json")
    Path(spec["out"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    with open(log, "w") as f:
        # A session of its own, so that a timeout also ends the worker's DataLoader processes.
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    wall = time.perf_counter() - t
    if code == 0 and Path(spec["out"]).is_file():
        result = json.loads(Path(spec["out"]).read_text())
    else:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        err = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
        result = {"status": "failed", "reason": f"{why}: {err.strip()[:300]} (log: {log})"}
    result["process_seconds"] = wall
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report


def summarise(r: dict, args) -> dict:
    """Step time, tokens/s, MFU, time per sample from a worker's step records."""
    timed = r["steps"][r["warmup"]:]
    wall = sum(x["wall"] for x in timed)
    s = shape_spec(r["shape"])
    flops = sum(step_flops(s, r["stage"], 128, x["lengths"], x["images"]) for x in timed)
    samples = sum(len(x["lengths"]) for x in timed)
    opt = statistics.median(x["optimizer"] for x in timed)
    peak = peak_tflops(r["device"], args.peak_tflops) if r["device"] != "cpu" else None
    return {"step_s": statistics.median(x["wall"] for x in timed), "tokens_s": sum(x["tokens"] for x in timed) / wall,
            "mfu": flops / wall / (peak * 1e12) if peak else None, "peak_tflops": peak, "tflops": flops / wall / 1e12,
            "sample_s": (wall - sum(x["optimizer"] for x in timed)) / samples + opt / GLOBAL_BATCH[r["stage"]],
            # The planner's sequence: the padded row, or (padding-free) the row's tokens per sample.
            "samples": samples, "max_row": max(-(-x["padded"] // len(x["lengths"])) for x in r["steps"]),
            "padding": 1 - sum(x["tokens"] for x in timed) / sum(x["padded"] for x in timed)}


def planner_check(r: dict, m: dict) -> tuple[str, str]:
    plan_bytes = r.get("plan_bytes")
    if plan_bytes is None:
        return "-", "-"
    est = f"{plan_bytes / GiB:.2f}"
    if r["device"] == "cpu":
        return est, "n/a (CPU RSS)"
    ratio = plan_bytes / r["peak_bytes"]
    return est, f"{ratio:.2f} ({'within' if abs(ratio - 1) <= 0.15 else 'outside'} 15%)"


def report(results: list[dict], args) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["shape"], r["stage"]), []).append(r)
    summaries = {}
    for (shape, stage), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        first = ok[0] if ok else rs[0]
        attn = ", ".join(sorted({r["attention"] for r in ok})) or "?"
        on_cpu = first.get("device") == "cpu"
        mem = "peak RSS GiB (CPU, whole process)" if on_cpu else "peak GPU GiB (max_memory_allocated)"
        print(f"\n## shape {shape}, stage {stage}: micro-batch {first['batch']}, seq {first['seq_len']}, "
              f"{first['timed_steps']} timed steps after {first['warmup']} warm-up, attention {attn}, "
              f"device {first.get('device', '?')}")
        print(f"| config | step s (median) | tokens/s | vs ours | {mem} | vs ours | MFU | planner GiB | "
              f"plan / measured | notes |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        base = next((r for r in ok if r["config"] == "ours"), None)
        bm = summarise(base, args) if base else None
        for r in sorted(rs, key=lambda r: list(CONFIGS).index(r["config"])):
            label = f"{r['config']}: {CONFIGS[r['config']][0]}"
            if r["status"] != "ok":
                print(f"| {label} | {r['status']}: {r['reason']} | | | | | | | | |")
                continue
            m = summarise(r, args)
            summaries[(shape, stage, r["config"])] = (r, m)
            mfu = "n/a (CPU)" if on_cpu else f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else \
                "n/a (unknown GPU peak; --peak-tflops)"
            vs_t = f"{m['tokens_s'] / bm['tokens_s']:.2f}x" if bm else "-"
            vs_m = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "-"
            est, ratio = planner_check(r, m)
            notes = [f"optim {r['optimizer']}", f"trainables {r['trainable_dtype']}",
                     f"padding {100 * m['padding']:.0f}%", f"{m['tflops']:.3g} TFLOP/s"] + r.get("notes", [])
            if r["config"] == "trl":
                notes.append("the planner models lora-llava's loss and fp32 trainables, not TRL's")
            print(f"| {label} | {m['step_s']:.3f} | {m['tokens_s']:,.0f} | {vs_t} | {r['peak_bytes'] / GiB:.2f} | "
                  f"{vs_m} | {mfu} | {est} | {ratio} | {'; '.join(notes)} |")
    derived(summaries, results)


def derived(summaries: dict, results: list[dict]) -> None:
    print("\n## Derived")
    for (shape, stage, config), (r, m) in sorted(summaries.items()):
        if config != "ours" or (shape, stage, "trl") not in summaries:
            continue
        tr, tm = summaries[(shape, stage, "trl")]
        print(f"- {shape} stage {stage}: ours / TRL tokens/s {m['tokens_s'] / tm['tokens_s']:.2f}x, "
              f"peak memory {r['peak_bytes'] / tr['peak_bytes']:.2f}x")
    on_gpu = any(r.get("device", "cpu") != "cpu" for r in results if r["status"] == "ok")
    print("\nGoals (issue 7: GPU, stage 2, micro-batch 1, seq 2048, r=128):")
    if not on_gpu:
        print("- not evaluated: no GPU measurement in these results (the goals are for a GPU)")
    for shape in ("7b", "13b"):
        got = summaries.get((shape, 2, "ours"))
        if not got or got[0]["device"] == "cpu":
            print(f"- {shape}: not measured in this run")
            continue
        r, m = got
        setting = "" if (r["batch"], r["seq_len"]) == (1, 2048) else \
            f" (measured at micro-batch {r['batch']}, seq {r['seq_len']}: not the goal's setting)"
        peak, goal = r["peak_bytes"] / GiB, GOAL_PEAK_GIB[shape]
        print(f"- {shape} peak <= {goal} GiB: {peak:.2f} GiB, " + (
            "met" if peak <= goal else f"missed by {peak - goal:.2f} GiB ({100 * (peak / goal - 1):.0f}%)") + setting)
        if (shape, 2, "trl") in summaries:
            x = m["tokens_s"] / summaries[(shape, 2, "trl")][1]["tokens_s"]
            print(f"- {shape} tokens/s >= 2x TRL: {x:.2f}x, " + ("met" if x >= 2 else
                                                                f"missed by {100 * (1 - x / 2):.0f}%"))
        if "H100" in r["device"] and m["mfu"] is not None:
            print(f"- {shape} MFU >= 40% on an H100: {100 * m['mfu']:.1f}%, " + (
                "met" if m["mfu"] >= 0.4 else f"missed by {40 - 100 * m['mfu']:.1f} points"))
        else:
            print(f"- {shape} MFU >= 40% on an H100: not evaluated ({r['device']})")
    for shape in ("7b", "tiny"):
        s1, s2 = summaries.get((shape, 1, "ours")), summaries.get((shape, 2, "ours"))
        if not (s1 and s2):
            continue
        hours = {st: STAGE_SAMPLES[st] * x[1]["sample_s"] / 3600 for st, x in ((1, s1), (2, s2))}
        what = "" if shape == "7b" else " (tiny shape: shows the computation only, not a LLaVA-1.5-7B figure)"
        print(f"\nProjected full LLaVA-1.5-7B recipe on {s2[0]['device']}{what}: stage 1 {STAGE_SAMPLES[1]:,} samples "
              f"x {s1[1]['sample_s'] * 1000:.1f} ms = {hours[1]:.1f} h, stage 2 {STAGE_SAMPLES[2]:,} x "
              f"{s2[1]['sample_s'] * 1000:.1f} ms = {hours[2]:.1f} h, total {hours[1] + hours[2]:.1f} h "
              f"(micro-batch {s1[0]['batch']} / {s2[0]['batch']} as measured, optimizer step once per global batch "
              f"{GLOBAL_BATCH[1]} / {GLOBAL_BATCH[2]}; the stage-1 recipe's micro-batch 16 would be faster per sample)")
        break
    else:
        print("\nProjected full LLaVA-1.5-7B recipe: needs the 7b shape measured in stages 1 and 2 (ours)")


def versions() -> str:
    out = []
    for mod in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "flash_attn", "liger_kernel"):
        if importlib.util.find_spec(mod) is None:
            out.append(f"{mod} -")
            continue
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 - a broken optional install is reported, not fatal
            out.append(f"{mod} (import failed: {type(e).__name__})")
    return ", ".join(out)


def machine_line(cuda: bool) -> str:
    line = f"{machine()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM"
    if cuda:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = "nvidia-smi not available"
        line += f"; GPU {gpu}"
    else:
        line += "; no GPU"
    return f"{line}; python {platform.python_version()}, {versions()}"


def dry_run_report(ckpt: Path, shape: str, info: dict, args, cuda: bool) -> None:
    from lora_llava.planner import plan
    from lora_llava.recipe import recipe_from_dict

    problems = check_checkpoint(ckpt, shape, info)
    g = info["groups"]
    print(f"- {shape}: {info['params']:,} parameters ({', '.join(f'{k} {v:,}' for k, v in g.items())}); "
          f"{info['bytes'] / 1e9:.2f} GB bf16 in {info['shards']} shards"
          f"{' (index only: dry run)' if info['dry_run'] else ''}; "
          f"{info['tensors']} tensors; check: {'; '.join(problems) or 'keys and count OK'}")
    s = shape_spec(shape)
    for stage in args.stage:
        n = param_counts(s, stage, 128)
        per_token = step_flops(s, stage, 128, [args.seq_len], 1) / args.seq_len
        print(f"  stage {stage}: LoRA params {n['lora']:,}; model FLOPs per token at seq {args.seq_len} with one "
              f"image {per_token / 1e9:.1f} GFLOP")
        for config in args.configs:
            why = skip_reason(config, cuda)
            try:
                raw = recipe_dict(ckpt, Path("data"), Path("run"), stage, args, config)
                recipe = recipe_from_dict(raw, check_files=False)
                est = f"planner {plan(recipe, 80).peak / GiB:.2f} GiB at {args.seq_len} tokens"
            except Exception as e:  # noqa: BLE001 - report any recipe problem and go on
                est = f"recipe error: {e}"
            print(f"    {config}: {est}" + (f" (would be skipped here: {why})" if why else ""))


def measure(args, cuda: bool, workdir: Path, temp: bool, results: list[dict], save) -> None:
    """Data, checkpoints and one worker per (shape, stage, configuration); ``save()`` after each result."""
    from lora_llava.planner import plan
    from lora_llava.recipe import recipe_from_dict

    data = {}
    for stage in args.stage:
        n = (args.warmup + args.steps) * args.batch
        data[stage] = workdir / f"data-stage{stage}-seq{args.seq_len}-n{n}"
        stats = make_data(data[stage], stage, n, args.seq_len, seed=0)
        print(f"data stage {stage}: {stats['n']} samples ({stats['text_only']} text-only), tokens min "
              f"{stats['min']} / median {stats['median']:.0f} / max {stats['max']} (576 image tokens each)")
    for shape in args.shape:
        ckpt = workdir / f"ckpt-{shape}"
        info = write_checkpoint(ckpt, shape, dry_run=False)
        problems = check_checkpoint(ckpt, shape, info)
        print(f"checkpoint {shape}: {info['params']:,} parameters, {info['bytes'] / 1e9:.2f} GB in {info['shards']} "
              f"shards ({info['seconds']:.0f} s); check: {'; '.join(problems) or 'OK'}")
        for stage in args.stage:
            for config in args.configs:
                row = {"shape": shape, "stage": stage, "config": config, "batch": args.batch,
                       "seq_len": args.seq_len, "timed_steps": args.steps, "warmup": args.warmup}
                why = skip_reason(config, cuda)
                if why:
                    results.append({**row, "status": "skipped", "reason": why})
                    print(f"  {shape} stage {stage} {config}: skipped: {why}", flush=True)
                    continue
                raw = recipe_dict(ckpt, data[stage], workdir / "run", stage, args, config)
                spec = {"config": config, "recipe": raw, "records": str(data[stage] / "records.json")}
                result = {**row, **run_worker(workdir, f"{shape}-s{stage}-{config}", spec, args.timeout,
                                              args.threads)}
                if result["status"] == "ok" and len(result["steps"]) <= args.warmup:
                    result = {**row, "status": "failed", "reason": f"only {len(result['steps'])} steps ran (data "
                              f"dropped?), none timed after {args.warmup} warm-up steps"}
                if result["status"] == "ok":
                    m = result["summary"] = summarise(result, args)
                    result["plan_bytes"] = plan(recipe_from_dict(raw, check_files=False),
                                                (result["gpu_bytes"] or 24 * GiB) / GiB, seq_len=m["max_row"]).peak
                    print(f"  {shape} stage {stage} {config}: {m['step_s']:.3f} s/step, {m['tokens_s']:,.0f} "
                          f"tokens/s, peak {result['peak_bytes'] / GiB:.2f} GiB ({result['peak_kind']}), "
                          f"attention {result['attention']} ({result['process_seconds']:.0f} s)", flush=True)
                else:
                    print(f"  {shape} stage {stage} {config}: {result['status']}: {result['reason']}", flush=True)
                results.append(result)
                save()  # after every configuration: a long GPU run that stops keeps what it measured
        if temp:
            shutil.rmtree(ckpt, ignore_errors=True)  # 14 / 27 GB: one shape on disk at a time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=["tiny", "7b", "13b"])
    ap.add_argument("--stage", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (per_device_train_batch_size)")
    ap.add_argument("--seq-len", type=int, help="data.max_length (default 2048 on CUDA, 1024 on CPU)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, help="warm-up steps, not timed (default 3 on CUDA, 2 on CPU)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table by name)")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--workdir", type=Path, help="keep checkpoints, data and logs here and reuse them (default: a "
                                                 "temporary folder, removed at the end)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--threads", type=int, help="CPU threads of each worker (default 1 without CUDA: on a shared "
                                                "machine, OpenMP threads that outnumber the free cores make step "
                                                "times 10x slower at random; torch's default with CUDA)")
    ap.add_argument("--dry-run", action="store_true", help="write config / processor / index only, check shapes, "
                                                           "validate recipes, print planner estimates; no training")
    ap.add_argument("--from-json", nargs="+", type=Path, help="print the report of earlier --json files, run nothing")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.from_json:
        results = [r for p in args.from_json for r in json.loads(p.read_text())["results"]]
        for p in args.from_json:
            head = json.loads(p.read_text())
            print(f"from {p}: command: {head['command']}\n  machine: {head['machine']}")
        return report(results, args)

    import torch

    cuda = torch.cuda.is_available()
    args.shape = args.shape or (["7b", "13b"] if cuda else ["tiny"])
    args.seq_len = args.seq_len or (2048 if cuda else 1024)
    args.steps = args.steps or (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.threads = args.threads or (None if cuda else 1)
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    mline = machine_line(cuda)
    print(f"command: {command}\nmachine: {mline}")
    print(f"settings: shapes {args.shape}, stages {args.stage}, micro-batch {args.batch}, seq {args.seq_len}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, worker threads {args.threads or 'default'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="train_step.")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    t_all = time.perf_counter()
    try:
        if args.dry_run:
            print("\n## Dry run: checkpoint layout, recipes, planner")
            for shape in args.shape:
                ckpt = workdir / f"ckpt-{shape}"
                info = write_checkpoint(ckpt, shape, dry_run=shape != "tiny")
                dry_run_report(ckpt, shape, info, args, cuda)
            return
        save = (lambda: args.json.write_text(json.dumps({"command": command, "machine": mline, "results": results},
                                                        indent=1))) if args.json else (lambda: None)
        measure(args, cuda, workdir, temp, results, save)
        save()
        report(results, args)
        print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s; load average now {os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} cores; a higher load means other jobs shared the machine)")
        if args.json:
            print(f"results written to {args.json}")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
