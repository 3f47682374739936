"""Multi-process training: 2-process DDP over gloo equals one process at the same global batch; launch checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import LaunchError
from lora_llava.train.launch import Launch, check_launch, detect_launch, device_map

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def _compare_ddp_with_one_process(raw: dict, tmp_path: Path, one: dict, two: dict) -> list[float]:
    """Train ``raw`` in this process with the ``one`` train settings and under torchrun (2 CPU processes, gloo)
    with ``two``; assert equal losses and equal adapter and projector. Returns the losses."""
    from lora_llava.train.sft import train

    raw = {**raw, "train": {**raw["train"], "dataloader_num_workers": 0}}
    single = train(recipe_from_dict({**raw, "train": {**raw["train"], **one, "output_dir": str(tmp_path / "one")}}))

    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], **two, "output_dir": str(tmp_path / "two")}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lora_llava", "sft", str(recipe)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    per_device = two.get("per_device_train_batch_size", raw["train"]["per_device_train_batch_size"])
    accumulation = two.get("gradient_accumulation_steps", 1)
    assert (f"global batch = {per_device} per device x {accumulation} accumulation x 2 processes = "
            f"{per_device * accumulation * 2} samples") in out
    # Only rank 0 prints its results and writes the run folder.
    assert done.stdout.count("run folder:") == 1
    assert out.count("model: 4,") == 1  # the start-of-run summary, once

    assert len(single.losses) == raw["train"]["max_steps"]
    assert _losses(tmp_path / "two") == pytest.approx(single.losses, rel=1e-5)
    assert single.losses[-1] < single.losses[0] - 0.5  # it trained: the match is not of two untouched models
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(single.output_dir / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")
    return single.losses


def test_two_process_ddp_matches_one_process(tiny_recipe, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 samples each == 1 process with 4: same losses, same adapter."""
    _compare_ddp_with_one_process(tiny_recipe, tmp_path, {}, {"per_device_train_batch_size": 2})


def test_ddp_with_accumulation_and_text_only_batches(tiny_recipe, shapes_data, tmp_path):
    """LLaVA-1.5's stage-2 setting: image and text-only samples, modality-grouped batches, gradient accumulation.
    Text-only steps leave the projector without gradients on every process (DDP must allow unused parameters).
    2 processes x 2 samples x 2 accumulation == 1 process x 2 samples x 4 accumulation."""
    folder, train_json, _ = shapes_data
    records = json.loads(Path(train_json).read_text())
    for i in range(16):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": f"Count to {i % 5 + 2} in words."},
            {"from": "gpt", "value": " ".join(["one", "two", "three", "four", "five", "six"][: i % 5 + 2]) + "."}]})
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records))
    raw = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(mixed)},
           "train": {**tiny_recipe["train"], "group_by_modality_length": True, "max_steps": 8,
                     "per_device_train_batch_size": 2}}
    # 8 steps of 8 samples = the whole epoch, so both text-only megabatches (16 samples) are among them.
    _compare_ddp_with_one_process(raw, tmp_path, {"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2})


def _recipe(tiny_recipe, **quant):
    raw = {**tiny_recipe, "quant": {**tiny_recipe["quant"], **quant}}
    return recipe_from_dict(raw)


def test_launch_is_read_from_the_launchers_environment(tiny_recipe, monkeypatch, tmp_path):
    recipe = _recipe(tiny_recipe)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert detect_launch(recipe) == Launch()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch = detect_launch(recipe)
    assert (launch.engine, launch.world_size, launch.rank, launch.local_rank, launch.is_main) == ("ddp", 4, 3, 1, False)
    # Each process's model goes on its own GPU (GPU 0 for all was the trap), or the CPU.
    assert device_map(launch, cuda=True) == {"": 1}
    assert device_map(launch, cuda=False) == {"": "cpu"}

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert (detect_launch(recipe).engine, detect_launch(recipe).zero_stage) == ("deepspeed", 2)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    # A DeepSpeed JSON named in the recipe: its stage is read from the file.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    raw = {**tiny_recipe, "train": {**tiny_recipe["train"], "deepspeed": str(ds)}}
    assert detect_launch(recipe_from_dict(raw)).zero_stage == 3
    raw["train"]["deepspeed"] = str(tmp_path / "missing.json")
    with pytest.raises(LaunchError, match=r"train.deepspeed: '.*missing.json' does not exist"):
        detect_launch(recipe_from_dict(raw))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert detect_launch(recipe).engine == "fsdp"


def test_combinations_that_cannot_work_are_named(tiny_recipe):
    four = _recipe(tiny_recipe)
    sixteen = _recipe(tiny_recipe, bits=16)
    assert check_launch(four, Launch(2, 0, 0, "ddp"), cuda=False) == []
    zero3 = Launch(2, 0, 0, "deepspeed", 3)
    (problem,) = [p for p in check_launch(four, zero3, cuda=True) if "ZeRO-3" in p]
    assert "bitsandbytes' packed 4-/8-bit weights cannot be partitioned" in problem
    assert "recipes/accelerate/zero2.yaml" in problem
    assert any("ZeRO-3 partitions every weight" in p for p in check_launch(sixteen, zero3, cuda=True))
    assert any(p.startswith("FSDP shards every weight") for p in check_launch(four, Launch(2, 0, 0, "fsdp")))
    zero2 = check_launch(four, Launch(2, 0, 0, "deepspeed", 2), cuda=False)
    assert "DeepSpeed needs CUDA GPUs; on the CPU launch with torchrun (DDP) instead" in zero2
    if not _has("deepspeed"):
        assert "DeepSpeed is configured but not installed: pip install deepspeed" in zero2
    assert any("ZeRO stage could not be read" in p for p in check_launch(four, Launch(2, 0, 0, "deepspeed", None)))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_refused_launch_stops_the_cli_before_loading(tiny_recipe, tmp_path, monkeypatch, capsys):
    """`lora-llava sft` under FSDP: exit 2 with the reason, nothing loaded, nothing written."""
    import lora_llava.model.stage as stage
    from lora_llava.cli.main import main

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(stage, "load_model", no_load)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"error: FSDP cannot run recipe {recipe}:" in err
    assert "use DDP (recipes/accelerate/ddp.yaml)" in err
    assert not Path(tiny_recipe["train"]["output_dir"]).exists()


def test_shipped_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {}
    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        config = ClusterConfig.from_yaml_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
    assert kinds.keys() == {"ddp", "zero2"}
    assert "MULTI_GPU" in kinds["ddp"] and "DEEPSPEED" in kinds["zero2"]
    assert ClusterConfig.from_yaml_file(str(ROOT / "recipes/accelerate/zero2.yaml")).deepspeed_config["zero_stage"] == 2


def test_ddp_sigkill_then_resume_auto_continues_exactly(tiny_recipe, tmp_path):
    """2 processes: rank 0 SIGKILLed at step 5 (torchrun stops rank 1), `--resume auto` under torchrun again: the
    later losses and the final weights equal an uninterrupted 2-process run's exactly."""
    from test_resume import KILLER

    script = tmp_path / "killer.py"
    script.write_text(KILLER.replace("if kill_step and", "if os.environ.get('RANK') == '0' and kill_step and"))
    raw = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 8, "per_device_train_batch_size": 2,
                                    "save_strategy": "steps", "save_steps": 2, "dataloader_num_workers": 0}}

    def run(name: str, *extra: str, kill: int = 0):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "output_dir": str(tmp_path / name)}}))
        env = {**os.environ, "PYTHONPATH": f"{ROOT}", "OMP_NUM_THREADS": "1", "KILL_STEP": str(kill)}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), "sft", str(recipe), *extra],
                              capture_output=True, text=True, env=env, timeout=600)

    ref = run("ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run("crash", kill=5)
    assert killed.returncode != 0
    assert (tmp_path / "crash" / "checkpoint-4" / "lora_llava_complete.json").is_file()
    assert not (tmp_path / "crash" / "checkpoint-6").exists()
    resumed = run("crash", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    ref_losses, got = _losses(tmp_path / "ref"), _losses(tmp_path / "crash")
    assert len(got) == 8 and got[4:] == ref_losses[4:]  # steps 5-8, exactly
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "crash" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
