"""Where a training step's time goes: the operators of a few steps of a recipe under torch.profiler, by device time.

    python benchmarks/profile_step.py RECIPE [KEY=VALUE ...] [--steps 3] [--rows 25]

Builds the recipe's trainer (finetune/stages/runner.py: the same model, data, batch and fast step as `finetune
train`), runs two warm-up steps, then profiles --steps steps and prints the --rows operators that took the most
time on the training device (self time), with their share of the profiled wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    from finetune.recipe import load_recipe
    from finetune.stages import runner

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(args.recipe, [*args.overrides, f"output_dir={out}", "overwrite=true",
                                           "data.eval_datasets=[]", f"train.max_steps={args.steps + 2}"])
        trainer = runner.build(recipe).trainer
        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        state = {"step": 0}
        profiler = torch.profiler.profile(activities=activities)

        from transformers import TrainerCallback

        class Window(TrainerCallback):
            def on_step_begin(self, *_, **__):
                if state["step"] == 2:
                    if cuda:
                        torch.cuda.synchronize()
                    state["start"] = time.perf_counter()
                    profiler.start()

            def on_step_end(self, *_, **__):
                state["step"] += 1
                if state["step"] == 2 + args.steps:
                    if cuda:
                        torch.cuda.synchronize()
                    profiler.stop()
                    state["wall"] = time.perf_counter() - state["start"]

        trainer.add_callback(Window())
        trainer.train()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    wall_us = state["wall"] * 1e6
    averages = profiler.key_averages()
    busy = ""
    if cuda:  # kernels' own time: the share of the wall time the GPU computed
        kernels = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = f"; GPU busy {kernels / wall_us:.0%} of it"
    batch = trainer.args.per_device_train_batch_size
    print(f"{args.steps} steps profiled in {state['wall']:.2f} s{busy}; batch {batch}")
    for event in sorted(averages, key=lambda e: -getattr(e, key))[: args.rows]:
        print(f"{getattr(event, key) / wall_us:6.1%}  {getattr(event, key) / 1e3 / args.steps:9.2f} ms/step  "
              f"{event.count // args.steps:6d} calls/step  {event.key[:90]}")


if __name__ == "__main__":
    sys.exit(main())
