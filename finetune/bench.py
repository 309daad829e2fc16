"""`finetune bench`: plain TRL defaults and this toolkit's default path, side by side in one run.

    finetune bench [--cases sft-lora-json,sft-lora-chat,sft-qlora-json,sft-qlora-chat,pretrain,dpo-lora] [--rows N]
                   [--quick] [--out FILE] [--model PATH] [--max-steps N] [--sides trl,finetune] [--set KEY=VALUE ...]
                   [--repeat N]

For each case, alternately and each in a fresh process, on the embedded SmolLM2-135M, the same training rows (the
first --rows of the set, one epoch, so both sides see the same tokens) and the same LoRA rank and targets:

  trl       TRL's SFTTrainer with its defaults (batch 8, max_length 1024, fp32 weights under bf16 autocast, no
            packing, loss on every token), LoRA r16 alpha 32 dropout 0.05 all-linear, as TRL's documentation shows;
            QLoRA: the model loaded in nf4 (bf16 compute).
  trl-bf16  (LoRA cases) the same with the weights loaded in bf16: TRL's defaults with the one change a user
            would make first.
  finetune  `finetune train recipes/smollm2-135m/sft_lora.yaml` (or sft_qlora.yaml) on those rows.
  (pretrain: recipes/tiny/pretrain.yaml with train.fast_path=false ("plain": transformers' own loss) and true.)
  (dpo-lora: TRL's DPOTrainer with its defaults (batch 8, learning rate 1e-6, fp32 weights) and LoRA as above, vs
  `finetune train recipes/smollm2-135m/dpo_lora.yaml`; both from the base, the reference being the base with the
  adapter disabled. Held-out: the DPO loss (beta 0.1) of the held-out pairs, one evaluator for both.)
The TRL sides run without the malloc tunable `finetune` sets for itself (finetune/cli.py), as a user runs TRL.

Printed per side: non-pad input tokens/s in steady state (from the end of step 2 to the last step; loading and
warm-up are reported apart as seconds to the end of step 2), peak RSS of the training process, MFU, and the
held-out loss after training (assistant tokens of the set's held-out split, the same evaluator for both sides).
--repeat N runs each case's sides N times in turn (trl, finetune, trl, finetune, ...): on shared cores each side's
speed moves from minute to minute, and a ratio is then read against the same round's first side; the table gives
every round, then each side's median speed and, against the rounds' first side, its median ratio.
MFU: model FLOPs per second over a 2048 x 2048 bf16 matmul timed in this run (the best of before and after the
cases); model FLOPs = 4 x parameters x tokens for LoRA/QLoRA (forward and input gradients; the base is frozen) and
6 x parameters x tokens for pretraining and DPO (the policy's 4 and the reference's forward 2), embeddings
counted once (they are the tied head's matmul). MFU is each side's share of the matmul-only bound. A JSON line per
side and a table at the end, headed by the machine (the CPU's model and its bf16 matrix instructions, AMX or
AVX512-BF16, or the GPU); --out writes the table.

On CUDA (the same command; benchmarks/cuda.sh is how the README's GPU figures were made): --model names a model
folder used on every side instead of the embedded model (e.g. a random-init model of a real shape: speed does not
depend on the weights, so the held-out loss is not computed), --max-steps trains that many optimizer steps on every
side (the rows repeated as needed) instead of one epoch, --sides picks sides, --set passes recipe overrides to the
finetune side. The peak column is then the peak allocated GPU memory, and the matmul rate the best of 2048 and 8192
squares (a GPU reaches its peak only at the larger), so MFU is the share of the larger.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "datasets_cfg"
# case -> (dataset, 4-bit, max_length of our recipe, rows by default)
CASES = {
    "sft-lora-json": ("json_extract", False, 512, 160),
    "sft-lora-chat": ("bench_chat", False, 1024, 64),
    "sft-qlora-json": ("json_extract", True, 512, 160),
    "sft-qlora-chat": ("bench_chat", True, 1024, 64),
    "pretrain": ("scratch_corpus", False, 256, 60),  # rows: optimizer steps of 16 x 256 tokens
    "dpo-lora": ("json_extract_pref", False, 512, 160),  # rows: preference pairs
}
QUICK = {"cases": ["sft-lora-json"], "rows": 64}
SIDES = {"sft-lora": ["trl", "trl-bf16", "finetune"], "sft": ["trl", "finetune"], "pretrain": ["plain", "finetune"],
         "dpo": ["trl", "finetune"]}


def matmul_flops(dtype=None, size: int = 2048, seconds: float = 2.0, windows: int = 8) -> float:
    """Measured dense matmul rate (FLOP/s) of this machine in `dtype` (default bf16) on the training device: the
    denominator of model FLOPs utilisation (MFU). Square `size` matmuls into a preallocated output, timed over
    `windows` slices of `seconds` in all; the best slice is the rate (on shared cores the others measure the
    neighbours too)."""
    import torch

    dtype = dtype or torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: kernels chosen, caches filled
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(windows):
        _sync(device)
        runs, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b, out=out)
            runs += 1
            if runs % 4 == 0:
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / windows:
                    break
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def machine() -> str:
    """What the figures were measured on: the GPU's name, or the CPU's model, its bf16 matrix instructions (AMX
    runs bf16 matmuls several times faster than AVX512-BF16 alone, so the same step's MFU and its ratio to an fp32
    side differ between the two) and the threads torch uses."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    matrix = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 matrix instructions"]
    return f"{name}, {' + '.join(matrix)}, {torch.get_num_threads()} threads"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default=",".join(c for c in CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rows", type=int, help="training rows per case (pretrain: steps); default per case")
    parser.add_argument("--quick", action="store_true", help="one case (LoRA SFT on json_extract), 64 rows: ~3 min")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--model", help="a model folder for every side instead of the embedded SmolLM2 (held-out "
                                        "loss not computed)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per side (rows repeated) instead of one epoch")
    parser.add_argument("--sides", help="comma-separated sides to run (trl, trl-bf16, finetune, plain)")
    parser.add_argument("--repeat", type=int, default=1, help="run each case's sides N times in turn (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the finetune side (repeatable)")


def run(args) -> None:
    from finetune.errors import FinetuneError

    cases = QUICK["cases"] if args.quick else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise FinetuneError(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.repeat < 1:
        raise FinetuneError(f"--repeat {args.repeat}: give 1 or more rounds")
    rows = QUICK["rows"] if args.quick and not args.rows else args.rows
    options = {"model": args.model, "max_steps": args.max_steps, "set": args.set}
    if args.max_steps and not args.rows:
        rows = 10**6  # every row of the set, repeated for the steps
    wanted = set(args.sides.split(",")) if args.sides else None
    rates = _matmul_rates()
    results = []
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as work:
        for case in cases:
            for round_ in range(1, args.repeat + 1):
                folder = Path(work) / f"round-{round_}"  # each round's outputs apart
                folder.mkdir(exist_ok=True)
                for side in SIDES[case.split("-")[0] + ("-lora" if "-lora-" in case else "")]:
                    if wanted and side not in wanted:
                        continue
                    result = _child(["_side", case, side, str(rows or CASES[case][3]), str(folder),
                                     json.dumps(options)], plain=side.startswith("trl"))
                    result = {**result, **({"round": round_} if args.repeat > 1 else {})}
                    results.append(result)
                    print(json.dumps(result), flush=True)
    rates = {size: max(rate, again) for (size, rate), again in zip(rates.items(), _matmul_rates().values())}
    table = _table(results, rates)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _matmul_rates() -> dict[int, float]:
    """bf16 matmul rates by square size: 2048 (the CPU's denominator), and on CUDA also 8192."""
    import torch

    return {size: matmul_flops(size=size) for size in ((2048, 8192) if torch.cuda.is_available() else (2048,))}


def _child(argv: list[str], plain: bool = False) -> dict:
    """One side in a fresh process: its last stdout line is its JSON result. A `plain` side (TRL's) runs with the
    environment a user would run TRL in: without the malloc tunable `finetune` sets for itself (finetune/cli.py)."""
    import os

    from finetune.cli import MALLOC_TUNABLE

    env = dict(os.environ)
    if plain:
        tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t != MALLOC_TUNABLE]
        env.update({"GLIBC_TUNABLES": ":".join(tunables)} if tunables else {})
    proc = subprocess.Popen([sys.executable, "-m", "finetune.bench", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    out, err = proc.communicate()
    if proc.returncode != 0:
        from finetune.errors import FinetuneError

        raise FinetuneError(f"bench {' '.join(argv[1:3])} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _table(results: list[dict], rates: dict[int, float]) -> str:
    peak = max(rates.values())
    gpu = any("peak_gpu_mib" in r for r in results)
    measured = ", ".join(f"{size}x{size} {rate / 1e12:.2f}" for size, rate in rates.items())
    memory = "GPU memory" if gpu else "RSS"
    lines = [f"Machine: {machine()}", "",
             f"bf16 matmul measured in this run (TFLOP/s): {measured}; MFU against {peak / 1e12:.2f}", "",
             f"| case | side | steady tokens/s | x plain | seconds to step 2 | peak {memory} (GB) | tokens per step "
             "| MFU | held-out loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    base, ratios = {}, {}
    for r in results:
        key = (r["case"], r.get("round"))
        base.setdefault(key, r["tokens_per_second"])
        ratio = r["tokens_per_second"] / base[key]
        ratios.setdefault((r["case"], r["side"]), []).append((ratio, r["tokens_per_second"]))
        side = r["side"] + (f", round {r['round']}" if r.get("round") else "")
        factor = 4 if r["case"].startswith("sft") else 6  # dpo: the policy's 4 and the reference's forward 2
        mfu = factor * r["parameters"] * r["tokens_per_second"] / peak
        held = f"{r['heldout_loss']:.4f}" if r.get("heldout_loss") is not None else "-"
        held_mib = r["peak_gpu_mib"] if "peak_gpu_mib" in r else r["peak_rss_mib"]
        lines.append(f"| {r['case']} | {side} | {r['tokens_per_second']:.0f} | "
                     f"{ratio:.2f} | {r['warmup_seconds']:.0f} | "
                     f"{held_mib / 1024:.2f} | {r.get('tokens_per_step') or '-'} | "
                     f"{mfu:.1%} | {held} |")
    # Per side run in several rounds: its median speed, and (where another side was the round's first) its ratio's.
    repeated = [(case, side, values) for (case, side), values in ratios.items() if len(values) > 1]
    if repeated:
        lines.append("")
    for case, side, values in repeated:
        speed = f"{statistics.median(v for _, v in values):.0f} tokens/s"
        if all(ratio == 1.0 for ratio, _ in values):  # the rounds' first side: its own base
            lines.append(f"{case} {side}: median {speed} ({len(values)} rounds)")
            continue
        each = ", ".join(f"{ratio:.2f}" for ratio, _ in values)
        lines.append(f"{case} {side}: x plain {statistics.median(r for r, _ in values):.2f} (median of "
                     f"{len(values)} rounds: {each}), median {speed}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one side (in its own process)


def _rows_file(case: str, rows: int, work: Path) -> Path:
    name = CASES[case][0]
    path = work / f"{case}-{rows}.jsonl"
    if not path.exists():
        with (DATA / "data" / name / "train.jsonl").open() as f:
            path.write_text("".join(line for _, line in zip(range(rows), f)))
    return path


def _side(case: str, side: str, rows: int, work: str, options: dict) -> dict:
    work = Path(work)
    out = work / f"{case}-{side}"
    model, steps = options.get("model"), options.get("max_steps")
    extra = [*([f"model.name={model}"] if model else []), *([f"train.max_steps={steps}"] if steps else []),
             *options.get("set", [])]
    if case == "pretrain":
        result = _ours(case, ["recipes/tiny/pretrain.yaml", f"train.max_steps={steps or rows}", "train.logging_steps=1",
                              f"train.fast_path={side == 'finetune'}", *options.get("set", [])], out, None)
    elif case.startswith("dpo") and side == "trl":
        result = _trl_dpo(case, _rows_file(case, rows, work), out, model, steps)
    elif case.startswith("dpo"):  # the reference is the base (adapter disabled), as on TRL's side
        result = _ours(case, ["recipes/smollm2-135m/dpo_lora.yaml", "model.init_from=null",
                              f"data.datasets=[{_rows_file(case, rows, work)}]", "train.max_steps=-1",
                              "train.num_train_epochs=1", *extra], out, model)
    elif side.startswith("trl"):
        result = _trl(case, _rows_file(case, rows, work), out, model, steps, bf16_weights=side == "trl-bf16")
    else:
        recipe = "recipes/smollm2-135m/" + ("sft_qlora.yaml" if CASES[case][1] else "sft_lora.yaml")
        result = _ours(case, [recipe, f"data.datasets=[{_rows_file(case, rows, work)}]",
                              f"data.max_length={CASES[case][2]}", *extra], out, model)
    return {"case": case, "side": side, "rows": rows, "model": model or "embedded:smollm2-135m", **result}


def _ours(case: str, argv: list[str], out: Path, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "finetune", "train", *argv, "data.eval_datasets=[]", "train.save_steps=100000",
           f"output_dir={out}", "overwrite=true"]
    if case == "pretrain":
        cmd.remove("data.eval_datasets=[]")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["time_s"], r.get("num_tokens", r.get("num_input_tokens_seen"))) for r in log if "loss" in r]
    run = json.loads((out / "run.json").read_text())
    summary = run["summary"]
    result = {**_steady(steps), "peak_rss_mib": summary["peak_memory_mib"], "steps": summary["steps"],
              "peak_rss_estimate_mib": summary.get("peak_memory_estimate_mib")}
    if run.get("device", "").startswith("cuda"):
        result["peak_gpu_mib"] = result.pop("peak_rss_mib")
    if case == "pretrain":
        result.update(parameters=summary["parameters"], heldout_loss=summary["eval_loss_after"])
    elif model:  # a model of real shape, not of real weights: its held-out loss says nothing
        result.update(parameters=_parameters(model))
    elif case.startswith("dpo"):
        result.update(_heldout_dpo(out / "adapter", CASES[case][0]))
    else:
        result.update(_heldout(out / "adapter", CASES[case][0]))
    return result


def _parameters(model: str) -> int:
    """The model's parameter count (embeddings once), from its config, without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.scratch import parameter_count

    with torch.device("meta"):
        return parameter_count(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))


def _steady(steps: list[tuple[float, float]]) -> dict:
    """tokens/s from the end of step 2 to the last step (the first steps build kernels and fill caches)."""
    (t0, n0), (t1, n1) = steps[1], steps[-1]
    return {"tokens_per_second": round((n1 - n0) / (t1 - t0), 1), "warmup_seconds": round(t0, 1),
            "tokens": n1, "tokens_per_step": round(n1 / len(steps))}


def _trl(case: str, rows_file: Path, out: Path, model: str | None, steps: int | None,
         bf16_weights: bool = False) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    init = {"dtype": torch.bfloat16} if bf16_weights else {}  # TRL's default loads fp32 weights (bf16 autocast)
    if CASES[case][1]:
        from transformers import BitsAndBytesConfig

        init["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16)
    args = SFTConfig(output_dir=str(out), num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=not torch.cuda.is_available(), model_init_kwargs=init or None, max_steps=steps or -1)
    result = _train_trl(SFTTrainer, args, rows_file, out, model)
    return {**result, **(_heldout(out / "adapter", CASES[case][0]) if not model else {})}


def _trl_dpo(case: str, rows_file: Path, out: Path, model: str | None, steps: int | None) -> dict:
    """TRL's DPOTrainer with its defaults (batch 8, beta 0.1, learning rate 1e-6, fp32 weights), LoRA as in `_trl`;
    the reference is the base with the adapter disabled."""
    import torch
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out), num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=not torch.cuda.is_available(), max_steps=steps or -1)
    result = _train_trl(DPOTrainer, args, rows_file, out, model)
    return {**result, **(_heldout_dpo(out / "adapter", CASES[case][0]) if not model else {})}


def _train_trl(trainer_class, args, rows_file: Path, out: Path, model: str | None = None) -> dict:
    """One TRL trainer on the embedded model and the rows, LoRA r16 alpha 32 dropout 0.05 all-linear as TRL's
    documentation shows; steady tokens/s from its logged num_tokens, the process's peak RSS; the adapter saved."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from finetune.models import resolve_model

    start = time.perf_counter()
    steps = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.append((time.perf_counter() - start, logs["num_tokens"]))

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = trainer_class(model=model or resolve_model("embedded:smollm2-135m"), args=args,
                            train_dataset=load_dataset("json", data_files=str(rows_file), split="train"),
                            peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    peak = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    trainer.save_model(str(out / "adapter"))
    del trainer
    return {**_steady(steps), **peak, "steps": len(steps), **({"parameters": _parameters(model)} if model else {})}


def _heldout_dpo(adapter: Path, dataset: str, beta: float = 0.1) -> dict:
    """Held-out DPO loss of base + adapter against the base (adapter disabled): the mean of
    -log sigmoid(beta x ((policy - reference) log p(chosen) - (policy - reference) log p(rejected))) over the set's
    held-out pairs, log-probabilities of the answer tokens in fp32 (finetune/logprobs.py)."""
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune import models
    from finetune.logprobs import completion_logps
    from finetune.scratch import parameter_count

    path = models.resolve_model("embedded:smollm2-135m")
    tokenizer = models.load_tokenizer(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    parameters = parameter_count(base)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = [json.loads(line) for line in (DATA / "data" / dataset / "heldout.jsonl").open()]
    prompts = [r["prompt"] for r in rows]

    def logps():
        return [c - r for c, r in zip(completion_logps(model, tokenizer, prompts, [r["chosen"] for r in rows]),
                                      completion_logps(model, tokenizer, prompts, [r["rejected"] for r in rows]))]

    policy = logps()
    with model.disable_adapter():
        reference = logps()
    losses = [math.log1p(math.exp(-beta * (p - r))) for p, r in zip(policy, reference)]
    return {"heldout_loss": round(sum(losses) / len(losses), 5), "heldout_pairs": len(rows),
            "heldout_accuracy": round(sum(p > 0 for p in policy) / len(policy), 4), "parameters": parameters}


def _heldout(adapter: Path, dataset: str) -> dict:
    """Held-out loss of base + adapter: mean NLL per assistant token (end-of-turn included) of the set's held-out
    conversations, masked by finetune's chat template for the model, in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune import models, templates
    from finetune.scratch import parameter_count

    path = models.resolve_model("embedded:smollm2-135m")
    tokenizer = models.load_tokenizer(path)
    chat = templates.resolve(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    parameters = parameter_count(base)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in (DATA / "data" / dataset / "heldout.jsonl").open():
            ids, mask = templates.masked(tokenizer, chat, json.loads(line)["messages"])
            ids_t = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=ids_t).logits[0, :-1].float(), -1)
            target = ids_t[0, 1:]
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll -= logp[keep].gather(-1, target[keep, None]).sum().item()
            count += int(keep.sum())
    return {"heldout_loss": round(nll / count, 5), "heldout_tokens": count, "parameters": parameters}


if __name__ == "__main__":
    if sys.argv[1] == "_side":
        print(json.dumps(_side(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6]))),
              flush=True)
