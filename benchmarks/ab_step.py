"""The fast step with and without one of its parts, interleaved in one process on the same batches.

    python benchmarks/ab_step.py RECIPE [KEY=VALUE ...] [--variants default,keep-lora-inputs] [--batches 4]
                                 [--rounds 4]

Builds the recipe's trainer as `finetune train` does (on CUDA with the batch fitted as a run fits it; the model
prepared by accelerate, so under its mixed precision), takes
--batches training batches, and runs them through the trainer's `training_step` (forward and backward, no optimizer
step) for each variant in turn, --rounds times after one warm-up round (compilation apart). Prints each variant's
median and best time for the batches, tokens/s at the best, the losses (equal across variants where a part changes
no value) and, on CUDA, the peak allocated memory of its rounds. Comparing in one process, round by round, is what
a shared machine's drifting speed allows: separate runs of the same code differ by more than many changes are worth.

Variants (the default path with one part switched):
  default             the step as `finetune train` runs it
  keep-lora-inputs    LoRA layers keep their inputs for backward on every device (default: recomputed from what the
                      lean norm and SwiGLU keep, on every device but the CPU)
  recompute-lora-inputs   recomputed on every device, the CPU included
  separate-lora-a     LoRA layers sharing an input (q/k/v, gate/up) each run their own A matmul
  eager-kernels       no fused kernels (train.fused_kernels: false)
  fused-kernels       fused kernels on the step's device (train.fused_kernels: true)
  fresh-loss-buffers  the CPU's chunked loss allocates its chunk-sized temporaries anew (default: kept buffers)
  head-in-loss        the head's matmul always inside the chunked loss (default: for large vocabularies or logits)
  chunked-logits      the head outside the loss, its logits taken by the chunked loss
  whole-logits        the head outside the loss, its logits taken whole by cross_entropy
  head-in-loss-chunk-N    head-in-loss with N rows a chunk (N: 128, 512, 1024, 2048; default 256 on CPU, 2048 CUDA)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time

import torch


def _variants(device: str) -> dict:
    from finetune import fastpath

    keep, shared, fuse, kept = fastpath._keep_lora_inputs_on, fastpath._SHARED_INPUT, fastpath._fuse_on, \
        fastpath._kept_buffer
    head_in, whole, chunk = fastpath.head_in_loss, fastpath.LOSS_WHOLE_BYTES, fastpath.LOSS_CHUNK
    whole_cpu, chunk_cuda = fastpath.LOSS_WHOLE_BYTES_CPU, fastpath.LOSS_CHUNK_CUDA

    def switch(keep_on=keep, shared_input=shared, fuse_on=fuse, kept_buffer=kept, head_in_loss=head_in,
               whole_bytes=whole, loss_chunk=chunk):
        def apply():
            fastpath._keep_lora_inputs_on, fastpath._SHARED_INPUT = frozenset(keep_on), shared_input
            fastpath._kept_buffer = kept_buffer
            fastpath.head_in_loss, fastpath.LOSS_WHOLE_BYTES = head_in_loss, whole_bytes
            fastpath.LOSS_WHOLE_BYTES_CPU = whole_bytes if whole_bytes != whole else whole_cpu
            fastpath.LOSS_CHUNK = loss_chunk
            fastpath.LOSS_CHUNK_CUDA = chunk_cuda if loss_chunk == chunk else loss_chunk
            fastpath._kept.clear()
            fastpath.use_fused_kernels(fuse_on)
        return apply

    return {
        "default": switch(),
        "keep-lora-inputs": switch(keep_on={"cpu", device}),
        "recompute-lora-inputs": switch(keep_on=()),
        "separate-lora-a": switch(shared_input=()),
        "eager-kernels": switch(fuse_on=()),
        "fused-kernels": switch(fuse_on={device}),
        "fresh-loss-buffers": switch(kept_buffer=lambda *args, **kwargs: None),
        "head-in-loss": switch(head_in_loss=lambda vocab, positions, device: True),
        "chunked-logits": switch(head_in_loss=lambda vocab, positions, device: False, whole_bytes=0),
        "whole-logits": switch(head_in_loss=lambda vocab, positions, device: False, whole_bytes=2**62),
        **{f"head-in-loss-chunk-{n}": switch(head_in_loss=lambda vocab, positions, device: True, loss_chunk=n)
           for n in (128, 512, 1024, 2048)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--variants", default="default,keep-lora-inputs,separate-lora-a")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from finetune import memory
    from finetune.recipe import load_recipe
    from finetune.stages import runner

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(args.recipe, [*args.overrides, f"output_dir={out}", "overwrite=true",
                                           "data.eval_datasets=[]", "train.max_steps=100"])
        built = runner.build(recipe)
        trainer = built.trainer
        fitted = memory.fit_cuda_batch(trainer, recipe, built.prepared, recipe.train.gpu_tokens_per_step)
        if fitted:
            print(fitted, flush=True)
        device = trainer.args.device.type
        known = _variants(device)
        names = args.variants.split(",")
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"unknown variant(s) {unknown}: choose from {sorted(known)}")
        batches = list(itertools.islice(iter(trainer.get_train_dataloader()), args.batches))
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        model = trainer.accelerator.prepare_model(trainer.model)  # accelerate's mixed precision, as Trainer.train
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, whose step this is
        cuda = device == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        times = {n: [] for n in names}
        peaks = {n: 0.0 for n in names}
        losses = {}
        for round_ in range(args.rounds + 1):  # round 0: warm-up (compilation, caches)
            for name in names:
                known[name]()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                start = time.perf_counter()
                losses[name] = [float(trainer.training_step(model, dict(b))) for b in batches]
                model.zero_grad(set_to_none=True)
                sync()
                if round_:
                    times[name].append(time.perf_counter() - start)
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
        known["default"]()
    print(f"{args.batches} batches, {tokens} tokens, {args.rounds} rounds on {device}")
    for name in names:
        ts = times[name]
        peak = f"  peak {peaks[name]:.2f} GiB" if cuda else ""
        print(f"{name:24s} median {statistics.median(ts):.3f} s  best {min(ts):.3f} s  {tokens / min(ts):,.0f} "
              f"tokens/s{peak}  losses {[round(x, 5) for x in losses[name]]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
