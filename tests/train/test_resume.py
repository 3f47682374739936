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
        train(load_recipe(recipe, [r for r in rest if "=" in r]), resume=resume, callbacks=[Killer()])
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
