"""The loss plot of a run: training loss (and eval loss, learning rate) against step."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_loss"]


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
