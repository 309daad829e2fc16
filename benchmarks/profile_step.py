"""Where a training step's time goes: the operators of a few steps of a recipe under torch.profiler, by device time.

    python benchmarks/profile_step.py RECIPE [KEY=VALUE ...] [--steps 3] [--rows 25] [--trace FILE.json.gz]
                                      [--compile-layers] [--shapes]

Builds the recipe's trainer (finetune/stages/runner.py: the same model, data, batch and fast step as `finetune
train`, with the batch fitted on CUDA as a run fits it), times every step (synchronised), then profiles --steps
steps after two warm-up steps and prints the --rows operators that took the most time on the training device (self
time) with their share of the profiled wall time, and on CUDA also the host's (CPU self time), the kernel launches
and host-device synchronisations per step. --trace writes one profiled step's Chrome trace (gzipped).
--compile-layers compiles each decoder layer (torch.compile, dynamic shapes) before training, an experiment.
--shapes ranks operators by (name, input shapes): which mul, which copy.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
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
    parser.add_argument("--trace", help="write the last profiled step's Chrome trace here (.json.gz)")
    parser.add_argument("--compile-layers", action="store_true")
    parser.add_argument("--shapes", action="store_true", help="rank operators by their input shapes too")
    args = parser.parse_args()
    from finetune import memory
    from finetune.recipe import load_recipe
    from finetune.stages import runner

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(args.recipe, [*args.overrides, f"output_dir={out}", "overwrite=true",
                                           "data.eval_datasets=[]", f"train.max_steps={args.steps + 2}"])
        built = runner.build(recipe)
        trainer = built.trainer
        fitted = memory.fit_cuda_batch(trainer, recipe, built.prepared, recipe.train.gpu_tokens_per_step)
        if fitted:
            print(fitted, flush=True)
        if args.compile_layers:
            layers = [m for m in trainer.model.modules() if type(m).__name__.endswith("DecoderLayer")]
            for layer in layers:
                layer.compile(dynamic=True)
            print(f"compiling {len(layers)} decoder layers", flush=True)
        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        state = {"step": 0, "times": [], "tokens": []}
        traced = args.steps if args.trace else None
        profiler = torch.profiler.profile(activities=activities, record_shapes=args.shapes)
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        from transformers import TrainerCallback

        class Window(TrainerCallback):
            def on_step_begin(self, *_, **__):
                sync()
                state["t0"] = time.perf_counter()
                if state["step"] == 2:
                    state["start"] = state["t0"]
                    profiler.start()

            def on_step_end(self, *_, **__):
                sync()
                state["times"].append(time.perf_counter() - state["t0"])
                state["step"] += 1
                if state["step"] == 2 + args.steps:
                    profiler.stop()
                    state["wall"] = time.perf_counter() - state["start"]

        trainer.add_callback(Window())
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    wall_us = state["wall"] * 1e6
    averages = profiler.key_averages(group_by_input_shape=args.shapes)
    busy = ""
    if cuda:  # kernels' own time: the share of the wall time the GPU computed
        kernels = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = f"; GPU busy {kernels / wall_us:.0%} of it"
    batch = trainer.args.per_device_train_batch_size
    steps = " ".join(f"{t:.3f}" for t in state["times"])
    print(f"step times (s, synchronised; the last {args.steps} profiled): {steps}; train() {total:.1f} s")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    length = recipe.data.max_length or 0
    print(f"{args.steps} steps profiled in {state['wall']:.2f} s{busy}; batch {batch} x {length} tokens")
    for event in sorted(averages, key=lambda e: -getattr(e, key))[: args.rows]:
        print(f"{getattr(event, key) / wall_us:6.1%}  {getattr(event, key) / 1e3 / args.steps:9.2f} ms/step  "
              f"{event.count // args.steps:6d} calls/step  {event.key[:90]}"
              + (f"  {str(event.input_shapes)[:120]}" if args.shapes else ""))
    if cuda:  # the host's side: what launches the kernels, and where it waits for the GPU
        host = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
        launches = sum(e.count for e in host if "LaunchKernel" in e.key or e.key.startswith("cuLaunch"))
        syncs = {e.key: e.count // args.steps for e in host if "Synchronize" in e.key or "Memcpy" in e.key}
        print(f"host: {launches // args.steps} kernel launches/step; synchronising calls/step: {syncs}")
        for event in sorted(host, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"{event.self_cpu_time_total / wall_us:6.1%}  {event.self_cpu_time_total / 1e3 / args.steps:9.2f} "
                  f"ms/step host  {event.count // args.steps:6d} calls/step  {event.key[:90]}")
    if traced:
        with tempfile.TemporaryDirectory() as tmp:
            profiler.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json", "rb") as f, gzip.open(args.trace, "wb") as g:
                shutil.copyfileobj(f, g)
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    sys.exit(main())
