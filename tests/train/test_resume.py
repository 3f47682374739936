"""Resume after SIGKILL: the later steps' losses and the final weights equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

# Trains in a child process that kills itself (SIGKILL, no clean-up of any kind) at a chosen point, through a
# TrainerCallback given to train().
KILLER = textwrap.dedent("""
    import logging, os, signal, sys
    from transformers import TrainerCallback
    from lora_llava.config.recipe import load_recipe
    from lora_llava.errors import LoraLlavaError
    from lora_llava.train.sft import train

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lora_llava").setLevel(logging.INFO)

    kill_step, kill_in_save = int(os.environ.get("KILL_STEP", "0")), os.environ.get("KILL_IN_SAVE")

    class Killer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if kill_step and state.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save(self, args, state, control, **kwargs):
            # Runs before the checkpoint is marked complete: weights and state written, the marker not.
            if kill_in_save and f"checkpoint-{state.global_step}" == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

    recipe, *rest = sys.argv[2:]
    resume = rest[rest.index("--resume") + 1] if "--resume" in rest else None
    try:
        train(load_recipe(recipe, [r for r in rest if "=" in r]), resume=resume, callbacks=[Killer()],
              overwrite="--overwrite" in rest)
    except LoraLlavaError as e:  # as the lora-llava command reports it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
""")



@pytest.fixture(scope="module")
def setup(make_recipe, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    raw = make_recipe(train={"max_steps": 8, "save_strategy": "steps", "save_steps": 2, "dataloader_num_workers": 0})

    def run(name, *extra, **env):
        recipe = tmp_path / f"{name}.yaml"
        raw["train"]["output_dir"] = str(tmp_path / name)
        recipe.write_text(yaml.safe_dump(raw))
        child_env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        return subprocess.run([sys.executable, str(script), "sft", str(recipe), *extra], env=child_env,
                              capture_output=True, text=True, timeout=600)

    ref = run("ref")  # the uninterrupted run both tests compare with
    assert ref.returncode == 0, ref.stderr[-2000:]
    return run, tmp_path


def _losses(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}, max(h.get("tokens_seen", 0) for h in history)


def _weights(folder):
    out = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    out.update(load_file(str(folder / "projector.safetensors")))
    return out


def test_sigkill_then_resume_auto_continues_exactly(setup):
    run, tmp = setup
    ref_losses, ref_tokens = _losses(tmp / "ref")
    killed = run("crash", KILL_STEP=5)  # steps 1-5 done, checkpoints 2 and 4 complete
    assert killed.returncode == -9
    assert (tmp / "crash" / "checkpoint-4" / "lora_llava_complete.json").is_file()
    resumed = run("crash", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses, tokens = _losses(tmp / "crash")
    assert sorted(losses) == list(range(1, 9))
    assert [losses[s] for s in range(5, 9)] == [ref_losses[s] for s in range(5, 9)]  # exact, not approximate
    assert tokens == ref_tokens  # every sample seen once: none twice, none skipped
    ref_w, got = _weights(tmp / "ref"), _weights(tmp / "crash")
    assert ref_w.keys() == got.keys() and all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_kill_while_saving_resumes_from_the_last_complete_checkpoint(setup):
    run, tmp = setup
    killed = run("crash2", KILL_IN_SAVE="checkpoint-6")
    assert killed.returncode == -9
    assert (tmp / "crash2" / "checkpoint-6" / "projector.safetensors").is_file()  # half a checkpoint ...
    assert not (tmp / "crash2" / "checkpoint-6" / "lora_llava_complete.json").exists()  # ... never marked complete
    assert (tmp / "crash2" / "checkpoint-4" / "lora_llava_complete.json").is_file()
    # Naming the incomplete checkpoint explicitly is refused.
    bad = run("crash2", "--resume", str(tmp / "crash2" / "checkpoint-6"))
    assert bad.returncode == 1 and "is incomplete" in bad.stderr
    resumed = run("crash2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    ref_w, got = _weights(tmp / "ref"), _weights(tmp / "crash2")
    assert all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_killed_run_is_usable_guarded_and_resumed_only_with_a_fitting_recipe(setup, tmp_path):
    from lora_llava.errors import MergeError
    from lora_llava.export.merge import merge
    from lora_llava.infer.load import load_for_inference

    run, tmp = setup
    folder = tmp / "killed"
    assert run("killed", KILL_STEP=3).returncode == -9  # checkpoint-2 complete, no final save
    checkpoint = folder / "checkpoint-2"
    assert (folder / "recipe.yaml").is_file() and (folder / "processor").is_dir()  # written at the start
    assert not (folder / "projector.safetensors").exists()
    # The run folder itself says which checkpoint to use; the checkpoint merges and loads.
    with pytest.raises(MergeError, match="newest complete checkpoint is '.*checkpoint-2': give that folder"):
        merge(folder, tmp_path / "e", progress=False)
    result = merge(checkpoint, tmp_path / "e", dtype="fp32", progress=False)
    assert result.merged_modules > 0
    loaded = load_for_inference(checkpoint)
    saved = load_file(str(checkpoint / "projector.safetensors"))
    projector = loaded.model.get_base_model().model.multi_modal_projector.state_dict()
    assert saved and all(torch.equal(projector[k.split("multi_modal_projector.")[-1]], v) for k, v in saved.items())
    # sft without --resume would replace the checkpoints: refused, nothing touched.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir())
    again = run("killed")
    assert again.returncode == 2 and "holds the checkpoints of an unfinished run" in again.stderr
    assert "--resume auto to continue it" in again.stderr and f"'{folder}'" in again.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir()) == before
    # --resume with the run folder instead of a checkpoint names the way.
    wrong = run("killed", "--resume", str(folder))
    assert wrong.returncode == 1 and "is a run folder, not a checkpoint" in wrong.stderr
    # A recipe the checkpoint cannot take is refused, naming the key; a schedule change is a warning.
    changed = run("killed", "--resume", "auto", "lora.r=4")
    assert changed.returncode == 2 and "lora.r: 8 -> 4" in changed.stderr, changed.stderr[-2000:]
    resumed = run("killed", "--resume", "auto", "train.learning_rate=0.001")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changed recipe" in resumed.stderr and "train.learning_rate: 0.01 -> 0.001" in resumed.stderr
    # The finished run is not replaced by a new sft, unless --overwrite.
    adapter = (folder / "adapter" / "adapter_model.safetensors").read_bytes()
    refused = run("killed")
    assert refused.returncode == 2 and "holds a finished run" in refused.stderr
    assert (folder / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    replaced = run("killed", "--overwrite", "train.max_steps=2")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 2
    assert not (folder / "checkpoint-8").exists() and not list(tmp.glob(".killed.replaced-*"))
