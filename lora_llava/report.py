"""``lora-llava report RUN_DIR``: what a finished (or checkpointed) run did, from the files it left."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "format_report", "run_report", "write_plot"]


class ReportError(ValueError):
    """A folder that holds no trainer state to report on."""


def _state_file(run_dir: Path) -> Path:
    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    # A run that was stopped before its final save: the newest complete checkpoint, the one --resume auto takes.
    from .checkpoints import last_checkpoint

    checkpoint = last_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint / "trainer_state.json"
    raise ReportError(f"'{run_dir}' holds no trainer_state.json (not a lora-llava run folder, or nothing was saved)")


def run_report(run_dir: str | Path) -> dict[str, Any]:
    """Figures of a run folder: steps, epochs, final / min loss, tokens, throughput, peak memory, wall time."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder '{run_dir}' does not exist")
    state_path = _state_file(run_dir)
    state = json.loads(state_path.read_text())
    history = state.get("log_history", [])
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    tokens = max((h.get("tokens_seen", 0) for h in history), default=0)
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    data_path = run_dir / "data_report.json"
    data = json.loads(data_path.read_text()) if data_path.is_file() else {}
    runtime = final.get("train_runtime")
    report: dict[str, Any] = {
        "run": str(run_dir),
        "from": str(state_path.relative_to(run_dir)),
        "steps": f"{state.get('global_step', 0)} / {state.get('max_steps', '?')}",
        "epochs": round(state.get("epoch") or 0.0, 3),
        "final loss": losses[-1][1] if losses else None,
        "min loss": f"{min(losses, key=lambda x: x[1])[1]:.4f} (step {min(losses, key=lambda x: x[1])[0]})"
        if losses else None,
        "final eval loss": evals[-1][1] if evals else None,
        "tokens seen": f"{tokens:,}" if tokens else None,
        "tokens / s": f"{tokens / runtime:,.0f}" if tokens and runtime else None,
        "samples / s": final.get("train_samples_per_second"),
        "wall time": _duration(runtime) if runtime else None,
        "peak GPU memory": f"{info['peak_gpu_memory_bytes'] / 1024**3:.2f} GiB ({info.get('gpu', 'GPU')})"
        if "peak_gpu_memory_bytes" in info else "not recorded (no GPU)",
        "samples kept": f"{data['kept']} / {data['total']}" if data else None,
    }
    return {k: v for k, v in report.items() if v is not None}


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def format_report(report: dict[str, Any]) -> str:
    """The report as a two-column table."""
    width = max(len(k) for k in report)
    lines = []
    for key, value in report.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


def write_plot(run_dir: str | Path) -> Path:
    """Write (or rewrite) ``loss.png`` of a run folder: loss and learning rate against step."""
    from .run_folder import plot_loss, write_atomic

    run_dir = Path(run_dir)
    state = json.loads(_state_file(run_dir).read_text())
    out = run_dir / "loss.png"
    write_atomic(out, lambda tmp: plot_loss(state.get("log_history", []), tmp))
    return out
