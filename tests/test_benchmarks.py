"""The train-step benchmark's pieces that a GPU run relies on, checked on the CPU: the random LLaVA-1.5-7B checkpoint
layout (dry run: index only, nothing written to disk) and its FLOP count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks"


def _train_step():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("train_step", BENCH / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_7b_checkpoint_layout_matches_llava_hf(tmp_path):
    ts = _train_step()
    info = ts.write_checkpoint(tmp_path / "7b", "7b", dry_run=True)
    assert info["params"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert ts.check_checkpoint(tmp_path / "7b", "7b", info) == []
    assert not list((tmp_path / "7b").glob("*.safetensors"))  # a dry run writes the index, not 14 GB


def test_flops_per_token_of_7b_stage_2():
    ts = _train_step()
    s = ts.shape_spec("7b")
    n = ts.param_counts(s, 2, 128)
    assert n["lora"] == 319_815_680  # r=128 on q/k/v/o/gate/up/down of 32 layers, as peft counts it
    per_token = ts.step_flops(s, 2, 128, [2048], 1) / 2048
    # 4 x (6.48e9 linear + 0.13e9 head) + 6 x 0.32e9 LoRA = 28.4e9, plus attention and one CLIP image.
    assert 29e9 < per_token < 31.5e9
