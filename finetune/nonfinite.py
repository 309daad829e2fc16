"""A NaN or inf loss or gradient stops the run before the optimizer step (or, with train.on_nonfinite: skip,
skips that step), and weights made non-finite by a step stop it before anything is saved.

Left alone, the Trainer logs a NaN loss as the mean of the previous ones (`logging_nan_inf_filter`), takes the
optimizer step with NaN gradients and goes on saving NaN weights. Here:

- every micro-batch's loss is checked (the trainer's `compute_loss` is wrapped; no sync until the step),
- before the optimizer step, the losses and the gradients (under fp16 mixed precision, the loss only: an inf
  gradient is the GradScaler's routine overflow, which it skips itself); all processes agree (an all-reduce), so
  every rank stops, or skips, at the same step; under DeepSpeed, whose optimizer steps inside backward, each
  micro-batch's loss before its backward (stop only),
- skip: the gradients are dropped (None), so the optimizer leaves every weight and its moments as they were;
  skipped steps are counted in the logs (`nonfinite_skips`) and the summary, and the run stops once more than
  train.max_nonfinite_skips were skipped (counted per session: a resumed run counts afresh),
- after the step, the trained weights (a finite update can still overflow; not under ZeRO-3, whose weights are
  sharded placeholders here).

Stopping raises a FinetuneError naming the step: the run is marked failed, the last checkpoint (written before
that step) and nothing later is kept.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from finetune.errors import FinetuneError


class NonFiniteGuard(TrainerCallback):
    def __init__(self, mode: str = "stop", max_skips: int = 10):
        self.mode, self.max_skips = mode, max_skips
        self.skips = 0
        self.trainer = None
        self._bad_loss = None  # a 0-dim bool tensor: some micro-batch loss since the last step was not finite
        self._step_params = None

    def install(self, trainer) -> None:
        """Wrap the trainer's loss so that each micro-batch's value is checked."""
        self.trainer = trainer
        # DeepSpeed steps its optimizer inside backward (accelerate's DeepSpeed wrapper), before any callback, and
        # keeps gradients in its own buffers: there, each micro-batch's loss is checked before its backward, and a
        # step cannot be skipped.
        self.deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False))
        if self.deepspeed and self.mode == "skip":
            raise FinetuneError("train.on_nonfinite: skip is not available under DeepSpeed (its optimizer steps inside "
                                "backward, before a step could be skipped); use on_nonfinite: stop")
        compute_loss = trainer.compute_loss

        def checked_loss(model, inputs, return_outputs=False, **kwargs):
            out = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = out[0] if return_outputs else out
            if model.training and torch.is_tensor(loss):
                bad = ~torch.isfinite(loss.detach()).all()
                self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
                if self.deepspeed:
                    flag = self._bad_loss.float().reshape(1)
                    if torch.distributed.is_available() and torch.distributed.is_initialized():
                        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    if flag.item():
                        raise FinetuneError(f"the loss was NaN/inf at step {trainer.state.global_step + 1}; the run "
                                            "stops before that step's update, so the weights and the checkpoints so "
                                            f"far are finite. {_advice(trainer.args)}")
            return out

        trainer.compute_loss = checked_loss

    def _params(self):
        return [p for p in self.trainer.model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = self._step_params = self._params()  # and after the step (on_optimizer_step): one walk of the model
        grads = [p.grad for p in params if p.grad is not None]
        flags = torch.zeros(2, device=args.device)
        if self._bad_loss is not None:
            flags[0] = self._bad_loss.to(flags.device).float()
        # Under fp16 mixed precision, an inf gradient is the GradScaler's routine overflow: it skips that step and
        # lowers its scale itself; only the loss counts then.
        if grads and getattr(self.trainer.accelerator, "scaler", None) is None:
            flags[1] = (~_all_finite([_local(g) for g in grads])).to(flags.device).float()
        self._bad_loss = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)  # one decision for all ranks
        bad_loss, bad_grad = bool(flags[0]), bool(flags[1])
        if not (bad_loss or bad_grad):
            return
        step = state.global_step + 1
        what = "the loss" if bad_loss else "a gradient"
        if self.mode == "skip" and self.skips < self.max_skips:
            self.skips += 1
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: weights and moments unchanged
            print(f"warning: {what} was NaN/inf at step {step}: step skipped ({self.skips} skipped so far, at most "
                  f"{self.max_skips})", flush=True)
            return
        if self.mode == "skip":
            raise FinetuneError(f"{what} was NaN/inf at step {step}, and {self.skips} steps were already skipped "
                                f"(train.max_nonfinite_skips = {self.max_skips}); the run stops before that step's "
                                f"update. {_advice(args)}")
        raise FinetuneError(f"{what} was NaN/inf at step {step}; the run stops before that step's update, so the "
                            f"weights and the checkpoints so far are finite. {_advice(args)}")

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Under ZeRO-3 these are empty placeholders: the loss check above still holds.
        params, self._step_params = self._step_params or self._params(), None
        finite = _all_finite([_local(p) for p in params]) if params else torch.tensor(True)
        flag = (~finite).float().to(args.device).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            raise FinetuneError(f"step {state.global_step + 1} made trained weights NaN/inf (the update overflowed); "
                                f"the run stops before saving them: the checkpoints so far are finite. {_advice(args)}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.mode == "skip" and "loss" in logs:
            logs["nonfinite_skips"] = self.skips


def _all_finite(tensors: list) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-d bool tensor: their norms (a NaN or inf element makes
    its tensor's norm NaN or inf; finite elements overflow it only beyond ~1e19), in a few multi-tensor kernels rather
    than two per tensor (on a GPU the per-tensor launches for a 1B model's adapter cost a visible share of a step)."""
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32)).isfinite().all()


def _local(tensor):
    """A DTensor's (FSDP2) shard on this process, so that checking it needs no collective."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _advice(args) -> str:
    return (f"Lower train.learning_rate (now {args.learning_rate:g}) or check the data, then resume from the last "
            "checkpoint with train.resume=true train.resume_changes=true; or set train.on_nonfinite: skip")
