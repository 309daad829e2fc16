"""The console while a run trains: transformers' progress bar, and one compact line per logging step.

transformers' Trainer writes every log as a raw dict (its ProgressCallback, or PrinterCallback under
`train.disable_tqdm`); the runner replaces that printer with ConsoleLine, which keeps the bar and writes:

    step 12/40 | loss 1.2345 | lr 2.00e-04 | 186 tok/s | ETA 3:20
    step 20/40 | eval loss 1.1876
"""

from __future__ import annotations

import time

from transformers.trainer_callback import PrinterCallback, ProgressCallback


def use_console_line(trainer, tokens_per_second) -> None:
    """Replace the Trainer's printer of raw log dicts (its progress bar, or PrinterCallback) with ConsoleLine."""
    for cls in (ProgressCallback, PrinterCallback):
        if any(type(cb) is cls for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(cls)
            trainer.add_callback(ConsoleLine(bar=cls is ProgressCallback, tokens_per_second=tokens_per_second))


class ConsoleLine(ProgressCallback):
    """transformers' progress bar (when `bar`), writing one compact line per logging step instead of the dict."""

    def __init__(self, bar: bool, tokens_per_second=lambda: None):
        super().__init__()
        self.bar = bar
        self.tokens_per_second = tokens_per_second
        self.begin: tuple[float, int] | None = None  # (time, step) when training began; None outside training

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = (time.time(), state.global_step)
        if self.bar:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.bar:
            super().on_prediction_step(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.begin = None
        if self.bar:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.begin is None:
            return
        line = self.line(state, logs)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def line(self, state, logs: dict) -> str | None:
        """The line for one log: a training step's, an evaluation's, or None (e.g. the end-of-training totals)."""
        step = f"step {state.global_step}/{state.max_steps}"
        if "eval_loss" in logs:
            return f"{step} | eval loss {logs['eval_loss']:.4f}"
        if "loss" not in logs:
            return None
        parts = [step, f"loss {logs['loss']:.4f}"]
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "reward" in logs:  # grpo, rloo
            parts.append(f"reward {logs['reward']:.3f}")
        rate = self.tokens_per_second()
        if rate:
            parts.append(f"{rate:,.0f} tok/s")
        started, first_step = self.begin
        done = state.global_step - first_step
        if done > 0 and state.max_steps > 0:
            parts.append(f"ETA {_clock((time.time() - started) / done * (state.max_steps - state.global_step))}")
        return " | ".join(parts)


def _clock(seconds: float) -> str:
    """1:02:03 or 2:03 (minutes:seconds)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
