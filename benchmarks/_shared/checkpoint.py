"""Random-weight LLaVA-1.5-shaped checkpoints in the llava-hf layout, written shard by shard without building the model.

The names and shapes of the weights come from a ``LlavaForConditionalGeneration`` on the meta device; random bf16
tensors (std 0.02; norms 1, biases 0) are written next to a processor with the real Vicuna tokenizer. Shapes: ``7b`` /
``13b`` (Vicuna-7B / 13B v1.5 + CLIP ViT-L/14-336, from ``lora_llava.planner.KNOWN_CONFIGS``) and ``tiny`` (a CPU
shape that keeps the 576 image tokens).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .machine import GiB

# The text and vision checkpoints of each LLaVA-1.5 shape, as named in lora_llava.planner.KNOWN_CONFIGS.
SHAPE_SOURCES = {"7b": ("lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"),
                 "13b": ("lmsys/vicuna-13b-v1.5", "openai/clip-vit-large-patch14-336")}
TINY = {"hidden": 256, "intermediate": 688, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 32064,
        "vision_hidden": 64, "vision_intermediate": 256, "vision_layers": 2, "image_size": 336, "patch_size": 14}
KNOWN_PARAMS = {"7b": 7_063_427_072}  # llava-hf/llava-1.5-7b-hf, as its model card counts it


def shape_spec(name: str) -> dict:
    """The shape ``name`` (``tiny``, ``7b``, ``13b``) in the fields of :data:`TINY`."""
    if name == "tiny":
        return dict(TINY)
    from lora_llava.llava.constants import padded_vocab
    from lora_llava.planner import KNOWN_CONFIGS

    text_name, vision_name = SHAPE_SOURCES[name]
    t, v = KNOWN_CONFIGS[text_name], KNOWN_CONFIGS[vision_name]
    return {"hidden": t["hidden_size"], "intermediate": t["intermediate_size"], "layers": t["num_hidden_layers"],
            "heads": t["num_attention_heads"], "kv_heads": t.get("num_key_value_heads") or t["num_attention_heads"],
            # + <image>, <pad>, padded to 64 as llava-hf: 32,064
            "vocab": padded_vocab(t["vocab_size"] + 2),
            "vision_hidden": v["hidden_size"], "vision_intermediate": v["intermediate_size"],
            "vision_layers": v["num_hidden_layers"], "image_size": v["image_size"], "patch_size": v["patch_size"]}


def llava_hf_config(s: dict):
    """The ``LlavaConfig`` of shape ``s`` as llava-hf writes it (``<image>`` 32000, ``<pad>`` 32001)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from lora_llava.llava.spec import llava_config

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


def _shard_names(names: dict[str, tuple[tuple, int]], shard_bytes: int) -> list[list[str]]:
    """The weight names in bf16 shards of at most ``shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, (_, n) in names.items():
        if shards[-1] and used + 2 * n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += 2 * n
    return shards


def _write_shards(folder: Path, files: list[str], shards: list[list[str]], names: dict) -> None:
    import torch

    from lora_llava.export.safetensors_io import write_safetensors
    from lora_llava.llava.layouts import to_hf

    # Values: contiguous slices, at random offsets, of one pool of N(0, 0.02) numbers as large as the largest tensor.
    # Drawing 13B normals one by one takes minutes, and copying each slice costs a page fault per 4 KiB of 14 / 26 GB
    # (most of a minute on a VM); a slice is a view, written from the pool's memory. The values play no part in
    # speed or memory.
    gen = torch.Generator().manual_seed(0)
    largest = max(n for _, n in names.values())
    pool = (torch.randn(max(largest, 2**24) + 2**20, generator=gen) * 0.02).to(torch.bfloat16)
    for file, members in zip(files, shards):
        tensors = {}
        for name in members:
            shape_, n = names[name]
            if name.endswith("bias"):
                tensors[to_hf(name)] = torch.zeros(shape_, dtype=torch.bfloat16)
            elif "norm" in name.rsplit(".", 2)[-2] or "layrnorm" in name:
                tensors[to_hf(name)] = torch.ones(shape_, dtype=torch.bfloat16)
            else:
                off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
                tensors[to_hf(name)] = pool[off:off + n].view(shape_)
        write_safetensors(folder / file, tensors, metadata={"format": "pt"})
        del tensors


def write_checkpoint(folder: Path, shape: str, dry_run: bool, shard_bytes: int = 2 * 10**9) -> dict:
    """Config, processor and bf16 safetensors shards + index of a random LLaVA of ``shape`` (tensor data skipped
    when ``dry_run``). Returns what was written. A folder written before for the same shape is reused."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from lora_llava.llava.layouts import to_hf

    from .llava_inputs import llava_processor, llava_tokenizer

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
    llava_processor(llava_tokenizer(), s["image_size"], s["patch_size"]).save_pretrained(folder)

    shards = _shard_names(names, shard_bytes)
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    t = time.perf_counter()
    if not dry_run:
        _write_shards(folder, files, shards, names)
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

    from lora_llava.llava.layouts import to_hf

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
