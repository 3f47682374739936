"""Training-step benchmark: peak memory, step time, tokens/s and MFU of lora-llava against TRL's SFTTrainer, and the
recipe's speed / memory switches measured on and off (issue 7).

Models: LLaVA-1.5-7B- and 13B-shaped checkpoints with random weights (``_shared/checkpoint.py``): Vicuna and CLIP
ViT-L/14-336 shapes from ``lora_llava.planner.KNOWN_CONFIGS`` (576 image tokens), the real Vicuna tokenizer with
``<image>`` / ``<pad>`` (vocabulary 32,064). Nothing is downloaded: random bf16 tensors are written shard by shard in
the llava-hf layout next to the processor. The model is then loaded by lora-llava's own path (``model.llava:
<folder>``, ``quant.bits: 4``), so it is what ``lora-llava sft`` trains: NF4 language model, LoRA r=128 / alpha 256 on
q/k/v/o/gate/up/down and the projector trained in stage 2, the projector alone in stage 1, CLIP frozen. ``tiny``
(Llama hidden 256 x 2 layers, a 2-layer CLIP tower of width 64, still 336 px / patch 14 = 576 image tokens) is the
CPU shape.

Data (``_shared/synthetic_data.py``): LLaVA-format records with random RGB JPEGs (300x225 to 1280x720) and real GPT-4
instruction text (LLaVA's coco2014_val_gpt4_qa in the assets folder, ``--assets``; else generated sentences). Stage 2:
multi-turn image conversations of ~650 tokens up to the sequence length (the first at the full length, so that the
peak covers it), 10% text-only. Stage 1: image + one short caption (~600-650 tokens, the plain template). One epoch
of exactly (warm-up + timed) x batch samples, so every sample is seen once.

Configurations, each in its own subprocess (``_shared/train_worker.py``: a clean peak), side by side with ratios to
``ours``:
  ours              lora_llava.train.trainer.build_trainer (LlavaSFTTrainer, LlavaCollator) at the recipe settings:
                    QLoRA r=128, activation checkpointing, group_by_modality_length, data.padding_free, attention
                    ``auto`` (flash_attention_2 with flash-attn on CUDA, else sdpa), optimizer SFTConfig's default
  trl               trl.SFTTrainer + DataCollatorForVisionLanguageModeling (padding, its default labels: every non-pad
                    token), on the same model (lora-llava's build_model: same NF4 model, LoRA, trainable projector),
                    same batch, data, attention; the vicuna_v1 (stage 2) / plain (stage 1) prompt as a chat template
  no_padding_free   ours with data.padding_free: false
  liger             ours with train.use_liger_kernel: true (needs liger-kernel and CUDA)
  paged_adamw_8bit  ours with train.optim: paged_adamw_8bit
  bf16_trainables   ours with model.dtype + train.trainable_dtype: bfloat16 (GPU only)
  workers           ours with train.dataloader_num_workers: 2 + train.dataloader_pin_memory: true
  padding_free_flex ours (data.padding_free) with the language model on transformers' flex_attention: an exact
                    kernel whose packed-sequence block mask skips the blocks between samples, for GPUs without
                    flash-attn (``benchmarks/gpu/flex_check.py`` checks it against padded sdpa); not in the default
                    list (compiled by torch.compile: tens of seconds the first time)

Per step (a TrainerCallback given to the trainer, ``_shared/timing.py``; torch.cuda.synchronize on a GPU): wall time
from one on_step_end to the next (data loading and logging included), the optimizer step, and the batch's non-pad
tokens (attention-mask sums, or the padding-free sample lengths). Step time = median over the timed steps; tokens/s =
timed tokens / timed wall time. Peak memory = torch.cuda.max_memory_allocated after reset_peak_memory_stats at
on_train_begin (weights, optimizer state, activations); on the CPU the peak RSS of the whole worker process instead
(getrusage), not comparable. MFU: model FLOPs (``_shared/flops.py`` gives the formula; LoRA and frozen NF4 weights
counted as such, activation-checkpointing recompute not counted) against the GPU's dense bf16 peak.

Goals (issue 7; GPU, stage 2, micro-batch 1, seq 2048, r=128): 13B peak <= 16 GiB, 7B peak <= 10 GiB, tokens/s >= 2x
TRL, MFU >= 40% on an H100. Also printed: the planner's estimate (lora_llava.planner.plan at the longest measured row)
against each measured peak (goal: within 15%), and the wall time of the full LLaVA-1.5-7B recipe (558,128 stage-1 +
665,298 stage-2 samples) projected from the measured time per sample, the optimizer step spread over the recipe's
global batch (256 / 128).

Run from the repository root:

    python -m benchmarks.train_step [--shape tiny|7b|13b ...] [--stage 1 2] [--batch 1] [--seq-len 2048]
        [--steps N] [--warmup N] [--configs NAME ...] [--json OUT] [--workdir DIR] [--assets DIR] [--dry-run]
        [--timeout S] [--time-budget S]
    python -m benchmarks.train_step --from-json A.json B.json     # one report from several (partial) runs

Defaults: with CUDA shapes 7b and 13b, seq 2048, 3 warm-up + 10 timed steps; without, shape tiny, seq 1024, 2 + 5
steps and one thread per worker (about 3.5 minutes on 2 shared CPU cores). The CPU figures time a tiny model and say
little about a GPU; they check that every path runs. A full GPU run is up to 28 workers, each loading its model;
split it with --shape / --stage / --configs, keep the checkpoints and data between the parts with --workdir (7b 14 GB,
13b 27 GB of disk), write each part with --json (rewritten after every configuration) and print them together with
--from-json, e.g.:

    python -m benchmarks.train_step --workdir /tmp/ts --shape 7b --stage 2 --configs ours trl --json 7b-2a.json
    python -m benchmarks.train_step --workdir /tmp/ts --shape 7b --stage 2 --configs workers --json 7b-2b.json
    python -m benchmarks.train_step --from-json 7b-2a.json 7b-2b.json

--time-budget S bounds the whole invocation (data and checkpoints included): each worker gets at most what is left
(and --timeout), and a configuration that would start with less than --min-config-seconds left is recorded as
skipped, so a run under a hard limit (the GPU run, ``benchmarks/gpu/run.sh``) ends with its JSON written.

--dry-run writes config, processor and shard index (no tensor data; real shards for tiny), checks the parameter count
(7b: llava-hf's 7,063,427,072) and key names against transformers, validates every configuration's recipe and prints
the planner's estimate, without training.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._shared import train_worker
from ._shared.assets import DEFAULT_ASSETS, QA_FILE, missing_assets
from ._shared.checkpoint import check_checkpoint, shape_spec, write_checkpoint
from ._shared.flops import param_counts, step_flops
from ._shared.machine import REPO_ROOT, GiB, command_line, machine_line
from ._shared.step_report import report, summarise
from ._shared.synthetic_data import make_data

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
    "padding_free_flex": ("data.padding_free with flex_attention (language model)", {}),
}
LABELS = {name: label for name, (label, _) in CONFIGS.items()}
ATTENTION = {"padding_free_flex": "flex_attention"}  # kernels a recipe cannot name: the worker switches to them
DEFAULT_CONFIGS = [name for name in CONFIGS if name not in ATTENTION]


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def recipe_dict(ckpt: Path, data: Path, run: Path, stage: int, args, config: str) -> dict:
    """The recipe of ``config`` (as a dict) on checkpoint ``ckpt`` and the data folder ``data``."""
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
    from lora_llava.config.sections import TrainSection

    if config == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install liger-kernel)"
        if not cuda:
            return "liger-kernel's Triton kernels need a CUDA GPU"
    if config == "bf16_trainables":
        if "trainable_dtype" not in {f.name for f in dataclasses.fields(TrainSection)}:
            return "this lora-llava has no train.trainable_dtype"
        if not cuda:
            return "GPU only: needs model.dtype bfloat16, and a CPU run computes in fp32"
    if ATTENTION.get(config) == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            return "this torch has no flex attention"
        if not cuda:
            return "GPU only: torch's flex attention has no backward on the CPU (benchmarks.gpu.flex_check runs its " \
                   "forward here)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Runs


def run_worker(workdir: Path, tag: str, spec: dict, timeout: float | None, threads: int | None) -> dict:
    """Run one configuration (``spec``) in a ``train_worker`` process; its result, or why it failed."""
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
        proc = subprocess.Popen([sys.executable, "-m", train_worker.__name__, str(spec_path)], cwd=REPO_ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also when this process is stopped (SIGTERM, see main): no worker outlives it holding the GPU
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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


def dry_run_report(ckpt: Path, shape: str, info: dict, args, cuda: bool) -> None:
    """Checkpoint check, FLOPs per token and every configuration's planner estimate, without training."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.planner import plan

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


def measure(args, cuda: bool, workdir: Path, temp: bool, results: list[dict], save, deadline: float) -> None:
    """Data, checkpoints and one worker per (shape, stage, configuration); ``save()`` after each result. A worker gets
    at most the time left before ``deadline`` (``time.monotonic()``; ``inf``: none)."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.planner import plan

    data = {}
    for stage in args.stage:
        n = (args.warmup + args.steps) * args.batch
        data[stage] = workdir / f"data-stage{stage}-seq{args.seq_len}-n{n}"
        stats = make_data(data[stage], stage, n, args.seq_len, seed=0, assets=args.assets)
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
                left = deadline - time.monotonic()
                if not why and left < args.min_config_seconds:
                    why = f"time budget spent ({max(left, 0):.0f} s of --time-budget {args.time_budget:.0f} s left)"
                if why:
                    results.append({**row, "status": "skipped", "reason": why})
                    print(f"  {shape} stage {stage} {config}: skipped: {why}", flush=True)
                    save()
                    continue
                raw = recipe_dict(ckpt, data[stage], workdir / "run", stage, args, config)
                spec = {"config": config, "recipe": raw, "records": str(data[stage] / "records.json"),
                        "attention": ATTENTION.get(config)}
                t_config = time.monotonic()
                try:
                    result = {**row, **run_worker(workdir, f"{shape}-s{stage}-{config}", spec,
                                                  min(args.timeout, left), args.threads)}
                except SystemExit:  # SIGTERM (main): keep a record of the configuration it stopped
                    results.append({**row, "status": "failed", "reason": "stopped by SIGTERM (an outer time "
                                    f"limit) after {time.monotonic() - t_config:.0f} s of this configuration"})
                    save()
                    raise
                if result["status"] == "ok" and len(result["steps"]) <= args.warmup:
                    result = {**row, "status": "failed", "reason": f"only {len(result['steps'])} steps ran (data "
                              f"dropped?), none timed after {args.warmup} warm-up steps"}
                if result["status"] == "ok":
                    m = result["summary"] = summarise(result, args.peak_tflops)
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


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=["tiny", "7b", "13b"])
    ap.add_argument("--stage", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (per_device_train_batch_size)")
    ap.add_argument("--seq-len", type=int, help="data.max_length (default 2048 on CUDA, 1024 on CPU)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, help="warm-up steps, not timed (default 3 on CUDA, 2 on CPU)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                    help=f"default: all but {', '.join(ATTENTION)}")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table by name)")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--workdir", type=Path, help="keep checkpoints, data and logs here and reuse them (default: a "
                                                 "temporary folder, removed at the end)")
    ap.add_argument("--assets", type=Path, help=f"folder with LLaVA's {QA_FILE} for the texts (default: "
                                                f"<repository>/../shared/assets/llava-samples when it is there, "
                                                f"else generated sentences)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--time-budget", type=float, help="seconds for the whole invocation: workers get at most what is "
                                                      "left; configurations that cannot start are recorded as skipped")
    ap.add_argument("--min-config-seconds", type=float, default=30,
                    help="with --time-budget: skip a configuration when less than this is left (default 30)")
    ap.add_argument("--threads", type=int, help="CPU threads of each worker (default 1 without CUDA: on a shared "
                                                "machine, OpenMP threads that outnumber the free cores make step "
                                                "times 10x slower at random; torch's default with CUDA)")
    ap.add_argument("--dry-run", action="store_true", help="write config / processor / index only, check shapes, "
                                                           "validate recipes, print planner estimates; no training")
    ap.add_argument("--from-json", nargs="+", type=Path, help="print the report of earlier --json files, run nothing")
    args = ap.parse_args()
    if args.assets is not None:
        why = missing_assets(args.assets, (QA_FILE,))
        if why:
            ap.error(f"--assets: {why}")
        args.assets = args.assets.resolve()
    elif missing_assets(DEFAULT_ASSETS, (QA_FILE,)) is None:
        args.assets = DEFAULT_ASSETS
    return args


def main() -> None:
    # SIGTERM (``timeout``, a stopped job) as an exception, so that run_worker ends its worker on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args()
    if args.from_json:
        results = [r for p in args.from_json for r in json.loads(p.read_text())["results"]]
        for p in args.from_json:
            head = json.loads(p.read_text())
            print(f"from {p}: command: {head['command']}\n  machine: {head['machine']}")
        return report(results, LABELS, args.peak_tflops)

    import torch

    cuda = torch.cuda.is_available()
    args.shape = args.shape or (["7b", "13b"] if cuda else ["tiny"])
    args.seq_len = args.seq_len or (2048 if cuda else 1024)
    args.steps = args.steps or (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.threads = args.threads or (None if cuda else 1)
    command = command_line(__spec__.name)
    mline = machine_line(cuda)
    print(f"command: {command}\nmachine: {mline}")
    print(f"settings: shapes {args.shape}, stages {args.stage}, micro-batch {args.batch}, seq {args.seq_len}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, worker threads {args.threads or 'default'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    temp = args.workdir is None
    # Absolute: the workers run in the repository root, and the recipes name the checkpoint and data by path.
    workdir = Path(tempfile.mkdtemp(prefix="train_step.")) if temp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    t_all = time.perf_counter()
    deadline = time.monotonic() + args.time_budget if args.time_budget else float("inf")
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
        measure(args, cuda, workdir, temp, results, save, deadline)
        save()
        report(results, LABELS, args.peak_tflops)
        print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s; load average now {os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} cores; a higher load means other jobs shared the machine)")
        if args.json:
            print(f"results written to {args.json}")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
