"""Training throughput of the SFT stage on the embedded SmolLM2-135M (json_extract data), per configuration.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--configs lora,qlora,lora-nopack,lora-nopack-b8,lora-fp32]

Each configuration runs `finetune train recipes/smollm2-135m/sft_lora.yaml` for --steps steps in its own
process (no held-out evaluation), then reads its metrics.jsonl: tokens/s is TRL's token count over wall
time between the end of step 2 and the last step (the first steps warm up), so loading is excluded.
Prints one JSON object per configuration. A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "lora": [],  # bf16 frozen base, fp32 adapter, packed rows (the defaults)
    "qlora": ["quantization.bits=4"],  # nf4 base, as in the demo
    "lora-nopack": ["data.packing=false"],  # padded batches of 2 rows instead of 2 packed 512-token rows
    "lora-nopack-b8": ["data.packing=false", "train.per_device_train_batch_size=8"],  # ~as many tokens a step
    "lora-fp32": ["model.dtype=fp32"],  # fp32 base: what a CPU without bf16 would run
}


def run(name: str, steps: int, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "finetune", "train", str(REPO / "recipes/smollm2-135m/sft_lora.yaml"),
           f"train.max_steps={steps}", "train.save_steps=100000", "data.eval_datasets=[]", f"output_dir={out}",
           *CONFIGS[name]]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "num_tokens" in r and "loss" in r]
    first, last = rows[1], rows[-1]  # from the end of step 2 to the end of the last step
    tokens = last["num_tokens"] - first["num_tokens"]
    seconds = last["time_s"] - first["time_s"]
    run_info = json.loads((out / "run.json").read_text())
    return {
        "config": name,
        "overrides": CONFIGS[name],
        "steps_timed": last["step"] - first["step"],
        "tokens_per_second": round(tokens / seconds, 1),
        "seconds_per_step": round(seconds / (last["step"] - first["step"]), 2),
        "peak_memory_mib": run_info["summary"]["peak_memory_mib"],
        "loss_first_last": [rows[0]["loss"], last["loss"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.configs.split(","):
            print(json.dumps(run(name, args.steps, Path(workdir))), flush=True)


if __name__ == "__main__":
    main()
