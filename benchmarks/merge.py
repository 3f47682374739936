"""Peak memory and wall time of ``lora-llava merge`` (streamed, shard by shard) against peft's ``merge_and_unload``.

The script writes a random LLaVA-shaped model of about 1B parameters (llava-hf layout, bf16, 500 MB safetensors
shards; Llama text model, small CLIP tower, GELU projector, the real Vicuna tokenizer) and a synthetic stage-2 run
folder for it (LoRA r=64 on q/k/v/o/gate/up/down with random non-zero B, a random projector), without training. Each
merge then runs in a fresh subprocess, which reports its own peak RSS (VmHWM):

- ours: ``lora_llava.export.merge.merge(run, out, dtype="bf16")`` (output shards default to the largest input shard's
  size), and once more with ``max_shard_size`` set to it explicitly;
- baseline: ``LlavaForConditionalGeneration.from_pretrained`` + ``PeftModel.from_pretrained`` + the run's projector
  + ``merge_and_unload()`` + ``save_pretrained``.

All tensors of both exports are then compared, and ours is checked against the bound
peak RSS <= 2 x largest input shard + adapter size (+ the RSS of an idle child that imports torch and transformers).

Run from the repository root:

    python -m benchmarks.merge [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._shared.machine import REPO_ROOT, command_line

SIZES = {  # text: hidden, layers, intermediate, heads; vision: hidden, layers, intermediate, heads; shard size
    "full": ((2048, 16, 5504, 16), (1024, 4, 4096, 16), "500MB"),
    "quick": ((1024, 8, 2752, 16), (512, 2, 2048, 8), "100MB"),
}


def build(workdir: Path, size: str) -> tuple[Path, Path]:
    """Write the random base model (``workdir/base``) and a synthetic stage-2 run folder (``workdir/run``)."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from lora_llava import __version__
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.llava.tokenizer import add_llava_tokens, vicuna_tokenizer
    from lora_llava.model.stage import lora_config

    base, run = workdir / "base", workdir / "run"
    if (run / "run_info.json").is_file():
        return base, run
    (th, tl, ti, tn), (vh, vl, vi, vn), shard = SIZES[size]
    tok = vicuna_tokenizer()
    add_llava_tokens(tok)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vn,
                              image_size=336, patch_size=14, projection_dim=vh)
    text = LlamaConfig(vocab_size=32064, hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                       num_attention_heads=tn, num_key_value_heads=tn, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=576, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")  # noqa: S106 - a token
    model.save_pretrained(base, max_shard_size=shard)
    processor.save_pretrained(base)

    run.mkdir(parents=True)
    recipe = recipe_from_dict({"model": {"llava": str(base)}, "quant": {"bits": 16},
                               "lora": {"r": 64, "lora_alpha": 128}, "train": {"stage": 2, "output_dir": str(run)}},
                              check_files=False)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    # A "trained" projector: random, unlike the base's, in fp32 as save_run writes it.
    projector = {"multi_modal_projector." + n: torch.randn(p.shape) * 0.02
                 for n, p in model.model.multi_modal_projector.named_parameters()}
    save_file(projector, str(run / "projector.safetensors"), metadata={"format": "pt"})
    peft_model = get_peft_model(model, lora_config(recipe))  # injects LoRA into `model`: the base is saved already
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(run / "adapter"), save_embedding_layers=False)
    processor.save_pretrained(run / "processor")
    info = {"dtype": "torch.bfloat16", "lora_llava": __version__, "vocab": 32064}
    (run / "run_info.json").write_text(json.dumps(info, indent=1))
    return base, run


def child(mode: str, base: Path, run: Path, out: Path, shard_bytes: int) -> None:
    """One measured job; prints {"rss": peak bytes, "seconds": work time} as the last line."""
    import torch
    import transformers  # noqa: F401 - the idle child's imports

    if mode == "idle-export":
        import lora_llava.export.merge  # noqa: F401 - what ours imports before it starts
    t = time.perf_counter()
    if mode in ("ours", "ours-shard"):
        from lora_llava.export.merge import merge

        kwargs = {"max_shard_size": shard_bytes} if mode == "ours-shard" else {}
        merge(run, out, dtype="bf16", progress=False, **kwargs)
    elif mode == "peft":
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(base), dtype=torch.bfloat16)
        projector = load_file(str(run / "projector.safetensors"))
        model.model.multi_modal_projector.load_state_dict(
            {k.removeprefix("multi_modal_projector."): v for k, v in projector.items()})
        model = PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload()
        model.save_pretrained(str(out))
    seconds = time.perf_counter() - t
    status = Path("/proc/self/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps({"rss": rss, "seconds": seconds}))


def measure(mode: str, base: Path, run: Path, out: Path, shard_bytes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", __spec__.name, "--child", mode, str(base), str(run), str(out),
                           str(shard_bytes)], capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(result, wall=wall)


def compare(out_a: Path, out_b: Path, base: Path) -> tuple[int, int, float, dict[str, float]]:
    """(tensors, exactly equal, max |a - b| over all, {named tensor: max |a - b|}); both sides by internal name."""
    from safetensors import safe_open

    from lora_llava.export.safetensors_io import shard_files
    from lora_llava.llava.layouts import to_internal

    def index(folder: Path) -> dict:
        handles = [safe_open(str(f), framework="pt") for f in shard_files(folder)]
        return {to_internal(k, "llava-hf"): (h, k) for h in handles for k in h.keys()}  # noqa: SIM118

    a, b, src = index(out_a), index(out_b), index(base)
    if set(a) != set(b):
        sys.exit(f"the exports differ in tensor names: {sorted(set(a) ^ set(b))[:6]}")
    named = {"model.language_model.layers.0.self_attn.q_proj.weight": "merged q_proj (layer 0)",
             "model.language_model.layers.3.mlp.down_proj.weight": "merged down_proj (layer 3)",
             "model.multi_modal_projector.linear_1.weight": "projector linear_1.weight",
             "model.multi_modal_projector.linear_2.bias": "projector linear_2.bias",
             "lm_head.weight": "lm_head"}
    equal, worst, picks = 0, 0.0, {}
    for name, (h, k) in a.items():
        x, y = h.get_tensor(k), b[name][0].get_tensor(b[name][1])
        if x.shape != y.shape or x.dtype != y.dtype:
            sys.exit(f"{name}: {x.dtype}{tuple(x.shape)} in ours, {y.dtype}{tuple(y.shape)} in the baseline")
        diff = float((x.float() - y.float()).abs().max())
        equal += diff == 0
        worst = max(worst, diff)
        if name in named:
            picks[named[name]] = diff
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    lora = float((a[q][0].get_tensor(a[q][1]).float() - src[q][0].get_tensor(src[q][1]).float()).abs().max())
    picks["(LoRA change of q_proj vs base)"] = lora
    return len(a), equal, worst, picks


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, base, run, out, shard = sys.argv[2:7]
        return child(mode, Path(base), Path(run), Path(out), int(shard))
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~200M-parameter model instead of ~1B")
    ap.add_argument("--workdir", type=Path, help="keep the model, run and exports here (default: a temp folder)")
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    print(f"command: {command_line(__spec__.name)}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    print(f"machine: {cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, {torch.get_num_threads()} torch threads; "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    # Absolute: the measured jobs run in the repository root.
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        base, run = build(workdir, "quick" if args.quick else "full")
        from lora_llava.export.safetensors_io import shard_files

        shards = [f.stat().st_size for f in shard_files(base)]
        adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_size
        largest = max(shards)
        print(f"model: ~{sum(shards) / 2e9:.2f}B parameters (bf16) in {len(shards)} shards, largest "
              f"{largest / 1e6:.0f} MB; adapter {adapter / 1e6:.0f} MB (LoRA r=64 on q/k/v/o/gate/up/down, "
              f"fp32); built in {time.perf_counter() - t:.0f} s in {workdir}")
        jobs = {"idle (import torch, transformers)": ("idle", None),
                "idle (import lora_llava.export.merge)": ("idle-export", None),
                "ours: merge(), default output shards": ("ours", workdir / "out_ours"),
                "ours: merge(max_shard_size=largest input shard)": ("ours-shard", workdir / "out_ours_shard"),
                "peft: from_pretrained + merge_and_unload + save_pretrained": ("peft", workdir / "out_peft")}
        results = {}
        for label, (mode, out) in jobs.items():
            results[mode] = measure(mode, base, run, out or workdir / "none", largest)
            r = results[mode]
            print(f"{label:60s} peak RSS {r['rss'] / 1e9:6.2f} GB   work {r['seconds']:6.1f} s   "
                  f"process {r['wall']:6.1f} s")
        peft_r = results["peft"]
        for mode in ("ours", "ours-shard"):
            r = results[mode]
            print(f"ratio {mode}/peft: peak RSS {r['rss'] / peft_r['rss']:.2f}x, work time "
                  f"{r['seconds'] / peft_r['seconds']:.2f}x, process time {r['wall'] / peft_r['wall']:.2f}x")
        bound = 2 * largest + adapter
        idle, idle_x = results["idle"]["rss"], results["idle-export"]["rss"]
        print(f"bound 2 x {largest / 1e9:.2f} GB shard + {adapter / 1e9:.2f} GB adapter = {bound / 1e9:.2f} GB; "
              f"+ idle torch/transformers {idle / 1e9:.2f} GB: {(bound + idle) / 1e9:.2f} GB; "
              f"+ idle lora_llava.export.merge {idle_x / 1e9:.2f} GB: {(bound + idle_x) / 1e9:.2f} GB")
        for mode in ("ours", "ours-shard"):
            rss = results[mode]["rss"]
            verdicts = ["within" if rss <= b else "OVER" for b in (bound, bound + idle, bound + idle_x)]
            print(f"  {mode:10s} {rss / 1e9:.2f} GB: {verdicts[0]} the bound alone, {verdicts[1]} with idle "
                  f"torch/transformers, {verdicts[2]} with idle lora_llava.export.merge")
        for mode in ("ours", "ours-shard"):
            out = jobs[next(k for k, v in jobs.items() if v[0] == mode)][1]
            n, equal, worst, picks = compare(out, workdir / "out_peft", base)
            print(f"{out.name} vs out_peft: {n} tensors, {equal} bit-identical, max |diff| {worst:.3g}")
        for name, diff in picks.items():
            print(f"  {name:34s} max |diff| {diff:.3g}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
