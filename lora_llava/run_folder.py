"""What a run folder holds, written so that a reader never sees half a file: recipe, adapter, projector, processor,
trainer state, run info and the loss plot."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .checkpoints import PROJECTOR_FILE, projector_state
from .recipe import Recipe

__all__ = ["ADAPTER_DIR", "plot_loss", "save_run", "write_atomic"]

ADAPTER_DIR = "adapter"


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(final: Path, write) -> None:
    """``write(tmp)`` then rename onto ``final``: a reader never sees half a file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def save_run(output_dir: Path, recipe: Recipe, model, processor, trainer) -> None:
    """Write what a run folder holds: recipe, adapter, projector, processor, trainer state, loss plot."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "recipe.yaml", lambda p: p.write_text(recipe.to_yaml(), encoding="utf-8"))
    projector = projector_state(model)
    write_atomic(output_dir / PROJECTOR_FILE, lambda p: save_file(projector, str(p), metadata={"format": "pt"}))
    if recipe.train.stage == 2:
        with atomic_dir(output_dir / ADAPTER_DIR) as tmp:
            model.save_pretrained(str(tmp), save_embedding_layers=False)
    with atomic_dir(output_dir / "processor") as tmp:
        processor.save_pretrained(str(tmp))
    write_atomic(output_dir / "trainer_state.json", lambda p: trainer.state.save_to_json(str(p)))
    # What a merge needs to rebuild exactly what trained: the dtype the base was loaded (and quantized) in.
    info = {"dtype": str(model.get_input_embeddings().weight.dtype), "lora_llava": __version__,
            "vocab": model.get_input_embeddings().weight.shape[0]}
    if torch.cuda.is_available():
        info["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        info["gpu"] = torch.cuda.get_device_name()
    write_atomic(output_dir / "run_info.json", lambda p: p.write_text(json.dumps(info, indent=1), encoding="utf-8"))
    write_atomic(output_dir / "loss.png", lambda p: plot_loss(trainer.state.log_history, p))


def plot_loss(log_history: list[dict], path: Path) -> None:
    """Training loss (and learning rate) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    loss = [h["loss"] for h in log_history if "loss" in h]
    lr = [h.get("learning_rate") for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, color="tab:blue", label="train loss")
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any(v is not None for v in lr):
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="tab:gray", alpha=0.5, linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
