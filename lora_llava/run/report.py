"""``lora-llava report RUN_DIR``: what a finished (or checkpointed) run did, from the files it left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError, ReportError
from ..files import read_json
from .folder import RunFolder

__all__ = ["eval_scores", "format_report", "run_report", "write_plot"]


def _state(run: RunFolder) -> tuple[Path, dict[str, Any]]:
    path = run.state_file()
    if path is None:
        raise ReportError(f"'{run.path}' holds no trainer_state.json (not a lora-llava run folder, or nothing was "
                          "saved)")
    try:
        state = read_json(path, dict, "a trainer state (a JSON object)")
    except DataError as e:
        raise ReportError(str(e)) from None
    problem = _state_problem(state)
    if problem:
        raise ReportError(f"{path}: not a trainer state as transformers writes it ({problem}); the file is damaged")
    return path, state


_NUMBER = (int, float)
# Fields of the state and of its log entries that the report reads, and the types they must have.
_STATE_FIELDS = {"global_step": int, "max_steps": int, "epoch": _NUMBER}
_ENTRY_FIELDS = {"step": int, "loss": _NUMBER, "eval_loss": _NUMBER, "learning_rate": _NUMBER,
                 "train_runtime": _NUMBER, "tokens_seen": _NUMBER, "train_samples_per_second": _NUMBER}


def _wrong_type(value: Any, expected) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, expected))


def _state_problem(state: dict[str, Any]) -> str:
    """What in a trainer state the report cannot read ('' when nothing)."""
    for key, expected in _STATE_FIELDS.items():
        if _wrong_type(state.get(key), expected):
            return f"'{key}' is {state[key]!r}"
    history = state.get("log_history", [])
    if not isinstance(history, list):
        return f"'log_history' is not a list ({type(history).__name__})"
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            return f"log_history[{i}] is not an object ({type(entry).__name__})"
        for key, expected in _ENTRY_FIELDS.items():
            if _wrong_type(entry.get(key), expected):
                return f"log_history[{i}].{key} is {entry[key]!r}"
        if ("loss" in entry or "eval_loss" in entry) and "step" not in entry:
            return f"log_history[{i}] has a loss but no step"
    return ""


def run_report(run_dir: str | Path) -> dict[str, Any]:
    """Figures of a run folder: steps, epochs, final / min loss, tokens, throughput, peak memory, wall time, and the
    headline scores of every ``eval/*/scores.json``."""
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise ReportError(f"run folder '{run_dir}' " + ("is a file, not a folder" if run.path.exists() else
                                                        "does not exist"))
    state_path, state = _state(run)
    history = state.get("log_history", [])
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    tokens = max((h.get("tokens_seen", 0) for h in history), default=0)
    try:
        info, data = run.read_info(), run.read_data_report()
    except DataError as e:
        raise ReportError(str(e)) from None
    runtime = final.get("train_runtime")
    report: dict[str, Any] = {
        "run": str(run.path),
        "from": str(state_path.relative_to(run.path)),
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
        "samples kept": f"{data['kept']} / {data['records']}" if data else None,
    }
    report.update(eval_scores(run))
    return {k: v for k, v in report.items() if v is not None}


def eval_scores(run: RunFolder) -> dict[str, str]:
    """``{"eval <name>": "metric value (n answers)"}`` for every ``eval/*/scores.json`` of a run folder."""
    out = {}
    for path in sorted(run.path.glob("eval/*/scores.json")):
        try:
            scores = read_json(path, dict, "a scores.json object")
        except DataError as e:
            out[f"eval {path.parent.name}"] = f"unreadable ({e})"
            continue
        metrics = [(k, v) for k, v in scores.items() if k != "benchmark" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and k not in ("n", "failed_to_parse")]
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics[:3])
        out[f"eval {path.parent.name}"] = f"{shown} ({scores.get('n', '?')} answers; {path.relative_to(run.path)})"
    return out


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
    run = RunFolder(run_dir)
    _, state = _state(run)
    return run.write_loss_plot(state.get("log_history", []))
