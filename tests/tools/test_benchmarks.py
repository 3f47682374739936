"""The benchmarks, run as their users run them (``python -m benchmarks.<name>`` at the repository root) in their dry-run
and smallest modes on the CPU: the train-step benchmark's random LLaVA-1.5-7B checkpoint layout (dry run: index only,
nothing written to disk) and FLOP count, its tiny training path for lora-llava and TRL, the loss-head comparison, and
the data-throughput benchmark's assets folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The repository root: the folder that holds the benchmarks package (wherever this file sits under tests/).
REPO = next(p for p in Path(__file__).resolve().parents if (p / "benchmarks" / "__init__.py").is_file())
ASSETS = REPO.parent / "shared" / "assets" / "llava-samples"


def run_benchmark(name: str, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_7b_dry_run_checkpoint_layout_and_flops(tmp_path):
    out = run_benchmark("train_step", "--dry-run", "--shape", "7b", "--stage", "2", "--configs", "ours", "trl",
                        "--seq-len", "2048", "--workdir", str(tmp_path)).stdout
    line = next(x for x in out.splitlines() if x.startswith("- 7b:"))
    assert "7,063,427,072 parameters" in line  # llava-hf/llava-1.5-7b-hf
    assert "check: keys and count OK" in line  # index keys = what transformers' LlavaForConditionalGeneration has
    assert "(index only: dry run)" in line
    assert not list((tmp_path / "ckpt-7b").glob("*.safetensors"))  # a dry run writes the index, not 14 GB
    assert (tmp_path / "ckpt-7b" / "model.safetensors.index.json").is_file()
    # r=128 on q/k/v/o/gate/up/down of 32 layers, as peft counts it.
    assert "stage 2: LoRA params 319,815,680;" in out
    # 4 x (6.48e9 linear + 0.13e9 head) + 6 x 0.32e9 LoRA = 28.4e9, plus attention and one CLIP image.
    per_token = float(re.search(r"with one image ([\d.]+) GFLOP", out).group(1))
    assert 29 < per_token < 31.5
    for config in ("ours", "trl"):
        assert re.search(rf"^    {config}: planner [\d.]+ GiB at 2048 tokens", out, re.MULTILINE), out


def test_train_step_tiny_run_ours_and_trl(tmp_path):
    """The tiny CPU shape end to end: lora-llava's trainer (build_trainer with the step-recording callback) and TRL's,
    one warm-up and one timed step each, then the report."""
    results = tmp_path / "results.json"
    proc = run_benchmark("train_step", "--shape", "tiny", "--stage", "2", "--configs", "ours", "trl", "--steps", "1",
                         "--warmup", "1", "--seq-len", "700", "--workdir", str(tmp_path / "work"),
                         "--json", str(results))
    rows = {r["config"]: r for r in json.loads(results.read_text())["results"]}
    assert set(rows) == {"ours", "trl"}
    for config, r in rows.items():
        assert r["status"] == "ok", (config, r)
        assert len(r["steps"]) == 2  # warm-up + timed: every sample seen once
        assert all(s["tokens"] > 0 and s["targets"] > 0 and s["wall"] > 0 for s in r["steps"]), r["steps"]
        assert r["device"] == "cpu" and r["peak_bytes"] > 0
        # The same two samples (one text-only, one with an image) for both; TRL's chat-template rendering of the
        # prompt may differ from lora-llava's template by a token.
        assert sorted(s["images"] for s in r["steps"]) == [0, 1]
        assert sum(len(s["lengths"]) for s in r["steps"]) == 2
    assert "## shape tiny, stage 2" in proc.stdout and "ours / TRL tokens/s" in proc.stdout


def test_loss_head_small():
    out = run_benchmark("loss_head", "--batch", "2", "--steps", "1").stdout
    losses = re.findall(r"ms/step \(loss ([\d.]+)\)", out)
    assert len(losses) == 2 and losses[0] == losses[1], out  # the same loss, computed two ways
    assert "speed-up:" in out


def test_data_throughput_names_a_missing_assets_folder(tmp_path):
    proc = run_benchmark("data_throughput", "--assets", str(tmp_path / "nowhere"), check=False, timeout=120)
    assert proc.returncode == 2
    assert f"the assets folder {tmp_path / 'nowhere'} does not exist" in proc.stderr


@pytest.mark.skipif(not (ASSETS / "coco2014_val_gpt4_qa_30x3.jsonl").is_file(),
                    reason=f"needs the shared assets in {ASSETS}")
def test_data_throughput_quick():
    out = run_benchmark("data_throughput", "--quick", "--samples", "16").stdout
    assert "supervised tokens per row identical to TRL answer-only: True" in out
    assert "| padding-free (one packed row per batch) | 1.000 |" in out
