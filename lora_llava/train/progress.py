"""The training progress bar: one bar for the run, with the latest loss, learning rate and tokens per second."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback

__all__ = ["ProgressBar"]


class ProgressBar(TrainerCallback):
    """One bar for the run, with the latest loss and learning rate."""

    bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "learning_rate", "eval_loss") if k in logs}
            if "tokens_per_second" in logs:
                shown["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
