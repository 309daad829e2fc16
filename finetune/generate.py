"""Loading a model for inference and generating from it: shared by `compare`, `chat` and `eval`.

    load_for_inference(SPEC, dtype="auto", prompt_style=None, trust_remote_code=False) -> Loaded
    generate(loaded, prompts, max_new_tokens=64, decoding="greedy", ...) -> [{"text", "token_ids", "stopped"}]

A model SPEC is one of:

* `embedded:smollm2-135m`: the embedded SmolLM2-135M-Instruct (finetune.models.resolve_model);
* a run directory (has run.json): its base model plus the LoRA adapter in RUN_DIR/adapter, the base
  loaded the way it was trained (4/8-bit when the recipe quantized it), the tokenizer from the adapter;
* a local HF model folder (has config.json), e.g. an export;
* a hub id (needs network).

Generation is batched with left padding and the KV cache; prompts are sorted by length into batches and
the outputs put back in the caller's order. A prompt is a list of chat messages or a string, rendered by
the prompt style: `chat` (the tokenizer's chat template with a generation prompt), `raw` (the text as
is) or `completion` ("Question: ...\\nAnswer:"). An answer ends at the first stop id: the generation
config's and tokenizer's EOS and the chat template's end-of-turn token.

In bf16, a batched greedy output can differ from the same prompt generated alone (rounding depends on
the batch shape); in fp32 they agree. Sampling is seeded, so the same command repeats exactly.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

PROMPT_STYLES = ("chat", "raw", "completion")
DECODINGS = ("greedy", "beam", "sample")
DTYPES = ("auto", "bf16", "fp16", "fp32")

# End-of-turn tokens of common chat formats, for templates outside finetune.templates' families.
_KNOWN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")


@dataclass
class Loaded:
    """A model ready to generate: eval mode, tokenizer padding on the left."""

    model: Any
    tokenizer: Any
    name: str  # the spec as given
    source: str  # what was loaded: a folder, a run directory or a hub id
    description: str  # one sentence saying what the model is
    prompt_style: str  # chat | raw | completion
    stop_ids: set[int] = field(default_factory=set)
    turn_end_id: int | None = None  # the chat template's end-of-turn token (chat prompts only)
    dtype: str = "auto"
    info: dict = field(default_factory=dict)  # kind, base, adapter, quantization, load seconds

    def summary(self) -> dict:
        """What reports record about the model."""
        return {"name": self.name, "source": self.source, "description": self.description,
                "prompt_style": self.prompt_style, "stop_ids": sorted(self.stop_ids), "dtype": self.dtype, **self.info}


# ----------------------------------------------------------------------------- loading


def load_for_inference(spec: str, dtype: str = "auto", prompt_style: str | None = None,
                       trust_remote_code: bool = False) -> Loaded:
    """Load the model a spec names (see the module docstring) for generation. A model's own Python code (auto_map)
    runs only with `trust_remote_code` (--trust-remote-code), and a run's only if its recipe trusted it too."""
    from finetune import models
    from finetune.recipe import ModelConfig

    if dtype not in DTYPES:
        raise FinetuneError(f"dtype {dtype!r} is invalid: allowed: {', '.join(DTYPES)}")
    if prompt_style is not None and prompt_style not in PROMPT_STYLES:
        raise FinetuneError(f"prompt style {prompt_style!r} is invalid: allowed: {', '.join(PROMPT_STYLES)}")
    start = time.time()
    kind = check_spec(spec)
    path = Path(spec).expanduser()
    info: dict = {}
    if kind == "hub" and trust_remote_code:
        raise FinetuneError(f"{spec}: --trust-remote-code runs a hub model's code only at a pinned commit, which a hub "
                            f"id here cannot name; download it (hf download {spec} --revision COMMIT --local-dir DIR) "
                            "and give the folder")
    if kind == "run":
        model, tokenizer, description, source, info = _load_run(path, dtype, trust_remote_code)
    elif kind == "adapter":
        model, tokenizer, description, source, info = _load_adapter_folder(path, dtype, trust_remote_code)
    else:
        source = models.resolve_model(spec)  # embedded -> converted folder; folder checked; else a hub id
        torch_dtype = models.resolve_dtype(dtype)
        model = models.load_model(ModelConfig(name=source, trust_remote_code=trust_remote_code), None, source,
                                  dtype=torch_dtype)
        tokenizer = models.load_tokenizer(source, trust_remote_code)
        if spec.startswith("embedded:"):
            hub = models.EMBEDDED[spec][2]
            description = f"{hub.split('/')[-1]} (embedded; already instruction-tuned)"
            info = {"kind": "embedded", "hub_id": hub}
        elif Path(source).is_dir():
            description = f"local model folder {source} ({_describe_arch(model)})"
            info = {"kind": "folder"}
        else:
            description = f"hub model {source} ({_describe_arch(model)})"
            info = {"kind": "hub"}
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise FinetuneError(f"{spec}: the tokenizer has neither a pad, an EOS nor an unknown token to pad with")
    has_template = isinstance(getattr(tokenizer, "chat_template", None), str)
    style = prompt_style or ("chat" if has_template else "raw")
    if style == "chat" and not has_template:
        raise FinetuneError(
            f"{spec}: prompt style 'chat' needs a chat template and this tokenizer has none; "
            "use the prompt style raw or completion"
        )
    loaded = Loaded(
        model=model, tokenizer=tokenizer, name=spec, source=source, description=description, prompt_style=style,
        stop_ids=stop_ids_of(model, tokenizer), turn_end_id=_turn_end_id(tokenizer) if style == "chat" else None,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        info={**info, "load_seconds": round(time.time() - start, 2)},
    )
    return loaded


def check_spec(spec: str) -> str:
    """Say what a spec names (embedded, run, adapter, folder, hub) without loading it; refuse what is none."""
    from finetune import models

    if spec.startswith("embedded:"):
        if spec not in models.EMBEDDED:
            raise FinetuneError(f"model '{spec}' is not embedded; embedded models: {', '.join(models.EMBEDDED)}")
        return "embedded"
    path = Path(spec).expanduser()
    if path.is_dir():
        for marker, kind in (("run.json", "run"), ("config.json", "folder"), ("adapter_config.json", "adapter")):
            if (path / marker).is_file():
                if kind == "folder" and _is_classifier(path / marker):
                    raise FinetuneError(f"{spec} is a sequence classifier (e.g. an exported reward model): it scores "
                                        "answers and does not generate; use it as compare --reward-model")
                return kind
        raise FinetuneError(
            f"{spec} is not a model: a run directory has run.json, an HF model folder config.json, "
            "an adapter folder adapter_config.json"
        )
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FinetuneError(
            f"model '{spec}' not found: give embedded:smollm2-135m, a run directory, a model folder or a hub id "
            "like org/name"
        )
    return "hub"


def _is_classifier(config_path: Path) -> bool:
    architectures = _read_json(config_path).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _describe_arch(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return f"{arch}, {n / 1e6:.1f}M parameters"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path}: cannot read it as JSON ({e})") from None


def _load_run(run_dir: Path, dtype: str, trust_remote_code: bool = False):
    """Base + adapter of a run directory, the base loaded as it was trained (quantization included)."""
    from finetune import models, trust
    from finetune.recipe import ModelConfig, QuantizationConfig, build_section
    from finetune.rundir import read_run

    run = read_run(run_dir)
    if run.get("stage") == "reward":
        raise FinetuneError(f"{run_dir} is a reward model (stage reward): it scores answers and does not generate; "
                            "use it as compare --reward-model or as a grpo/rloo reward source")
    # A LoRA run saves adapter/; a run that trained every weight (adapter.type none, stage pretrain) model/.
    adapter_dir = run_dir / (run.get("model") or run.get("adapter") or "adapter")
    if not adapter_dir.is_dir() and (run_dir / "model").is_dir():
        adapter_dir = run_dir / "model"
    status = run.get("status", "unknown")
    if status != "completed":  # e.g. a run killed while training (read_run tells "interrupted" from "running")
        print(f"warning: run {run_dir} did not complete (status {status}"
              + (f": {run['error']}" if run.get("error") else "") + ")", file=sys.stderr, flush=True)
    if not adapter_dir.is_dir():
        hint = " (a checkpoint is in checkpoints/; resume the run to finish it)" if status == "interrupted" else ""
        raise FinetuneError(f"run directory {run_dir} has no adapter/ or model/ folder (run status: {status}){hint}")
    recipe = run.get("recipe") or {}
    trusted = trust.check_run_code(run, run_dir, trust_remote_code)  # a copied run.json cannot switch it on
    source = str(run_dir / "run.json")
    model_cfg = build_section(ModelConfig, recipe.get("model") or {}, "model", source)
    quant_cfg = build_section(QuantizationConfig, recipe.get("quantization") or {}, "quantization", source)
    base = run.get("base_model") or {}
    base_path = base.get("path")
    if (not base_path or not Path(base_path).is_dir()) and not run.get("model"):  # a full-weight run needs no base
        base_path = models.resolve_model(base.get("name") or model_cfg.name)  # e.g. another machine's cache path
    torch_dtype = None if dtype == "auto" else models.resolve_dtype(dtype)  # auto: as the recipe trained it
    tokenizer = models.load_tokenizer(str(adapter_dir), model_cfg.trust_remote_code)
    stage = run.get("stage") or (recipe.get("train") or {}).get("stage", "sft")
    steps = (run.get("summary") or {}).get("steps")
    if steps is None:
        steps = max((p.get("steps", 0) for p in run.get("processes") or []), default="?")
    base_name = base.get("name") or model_cfg.name
    info = {"kind": "run", "run_dir": str(run_dir), "base": base_name, "base_path": base_path, "stage": stage,
            "steps": steps, "status": status, "quantization_bits": quant_cfg.bits}

    if (adapter_dir / "config.json").is_file() and not (adapter_dir / "adapter_config.json").is_file():
        # Every weight trained (adapter.type none, stage pretrain): the whole model is there, an HF model folder.
        model = models.load_model(ModelConfig(attn_implementation=model_cfg.attn_implementation,
                                              trust_remote_code=trusted), None,
                                  str(adapter_dir), dtype=torch_dtype or models.resolve_dtype("auto"))
        how = "pretrained from scratch" if base_name == "scratch" else f"base {base_name} fully fine-tuned"
        description = f"{how} in run {run_dir} (stage {stage}, {steps} steps, {_describe_arch(model)})"
        return model, tokenizer, description, str(run_dir), info

    model = models.load_model(model_cfg, quant_cfg, base_path, dtype=torch_dtype)
    model = _attach_adapter(model, tokenizer, adapter_dir)
    quant = ""
    if quant_cfg.bits:
        quant = f", {quant_cfg.bits}-bit {quant_cfg.quant_type if quant_cfg.bits == 4 else 'int8'} base as trained"
    state = "" if status == "completed" else f", run status {status}"
    description = f"base {base_name} + LoRA adapter from run {run_dir} (stage {stage}, {steps} steps{quant}{state})"
    return model, tokenizer, description, str(run_dir), info


def _load_adapter_folder(folder: Path, dtype: str, trust_remote_code: bool = False):
    """An adapter-only folder (adapter_config.json, no config.json): its base from base_model_name_or_path."""
    from finetune import models
    from finetune.recipe import ModelConfig

    config = _read_json(folder / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"{folder}/adapter_config.json names no base_model_name_or_path; load its run directory")
    base_path = models.resolve_model(base)
    model = models.load_model(ModelConfig(name=base_path, trust_remote_code=trust_remote_code), None, base_path,
                              dtype=models.resolve_dtype(dtype))
    tokenizer_src = folder if (folder / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = models.load_tokenizer(str(tokenizer_src), trust_remote_code)
    model = _attach_adapter(model, tokenizer, folder)
    description = f"base {base} + LoRA adapter from {folder}"
    return model, tokenizer, description, str(folder), {"kind": "adapter", "base": base}


def _attach_adapter(model, tokenizer, adapter_dir: Path):
    from peft import PeftModel

    from finetune.trust import check_adapter_folder

    check_adapter_folder(adapter_dir)  # safetensors only: peft would fall back to adapter_model.bin, a pickle
    # Tokens added for a chat template (a base model without one) were trained through the adapter:
    # the base needs room for them before the adapter is loaded.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise FinetuneError(f"could not load the adapter in {adapter_dir} onto its base: {e}") from None


def _turn_end_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with, where the template is a known one."""
    from finetune import templates

    try:
        return int(templates.end_of_turn_token_id(tokenizer, templates.resolve(tokenizer, "auto").training))
    except (FinetuneError, ValueError, KeyError, TypeError):
        return None


def stop_ids_of(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's EOS, the tokenizer's EOS, and the chat
    template's end-of-turn token."""
    from finetune import templates

    ids: set[int] = set()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        try:
            chat = templates.resolve(tokenizer, "auto")  # a model's own template: nothing is added to the tokenizer
            ids.add(int(templates.end_of_turn_token_id(tokenizer, chat.training)))
        except (FinetuneError, ValueError, KeyError, TypeError):
            vocab = tokenizer.get_vocab()
            ids.update(vocab[t] for t in _KNOWN_END_TOKENS if t in template and t in vocab)
    return ids


def release(loaded: Loaded | None) -> None:
    """Free a model's memory before the next one is loaded."""
    if loaded is None:
        return
    loaded.model = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- prompts


def render_prompt(loaded: Loaded, prompt: list[dict] | str, style: str | None = None) -> str:
    """The text the model sees for one prompt (a string is one user message)."""
    style = style or loaded.prompt_style
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if style == "chat":
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
    if style == "completion":
        return f"Question: {text}\nAnswer:"
    if style == "raw":
        return text
    raise FinetuneError(f"prompt style {style!r} is invalid: allowed: {', '.join(PROMPT_STYLES)}")


def encode_prompt(loaded: Loaded, prompt: list[dict] | str) -> list[int]:
    text = render_prompt(loaded, prompt)
    # A chat template writes its own special tokens (BOS included where the family has one).
    ids = loaded.tokenizer(text, add_special_tokens=loaded.prompt_style != "chat")["input_ids"]
    if not ids:
        raise FinetuneError(f"{loaded.name}: a prompt renders to no tokens ({text!r}); give a non-empty prompt")
    return list(ids)


# ----------------------------------------------------------------------------- generating


def check_decoding(max_new_tokens: int = 64, decoding: str = "greedy", temperature: float = 1.0, top_k: int = 50,
                   top_p: float = 1.0, num_beams: int = 4, seed: int = 0, batch_size: int = 16) -> None:
    """Refuse contradictory decoding settings before any model is loaded."""
    if decoding not in DECODINGS:
        raise FinetuneError(f"decoding {decoding!r} is invalid: allowed: {', '.join(DECODINGS)}")
    if max_new_tokens < 1:
        raise FinetuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise FinetuneError(f"batch_size must be at least 1, got {batch_size}")
    if decoding == "beam" and num_beams < 2:
        raise FinetuneError(f"beam search needs num_beams >= 2, got {num_beams}")
    if decoding == "sample":
        if temperature <= 0:
            raise FinetuneError(
                f"temperature must be above 0 for sampling, got {temperature} (greedy decoding is the limit at 0)"
            )
        if not 0 < top_p <= 1:
            raise FinetuneError(f"top_p must be in (0, 1], got {top_p}")


def generation_config(loaded: Loaded, max_new_tokens: int = 64, decoding: str = "greedy", temperature: float = 1.0,
                      top_k: int = 50, top_p: float = 1.0, num_beams: int = 4):
    from transformers import GenerationConfig

    check_decoding(max_new_tokens, decoding, temperature, top_k, top_p, num_beams)
    common = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(loaded.stop_ids) or None,
        pad_token_id=loaded.tokenizer.pad_token_id,
        repetition_penalty=1.0,  # decoding is what the flags say, not a model's published defaults
    )
    if decoding == "greedy":
        return GenerationConfig(do_sample=False, num_beams=1, **common)
    if decoding == "beam":
        return GenerationConfig(do_sample=False, num_beams=num_beams, early_stopping=True, **common)
    return GenerationConfig(do_sample=True, num_beams=1, temperature=temperature, top_k=max(0, top_k), top_p=top_p,
                            **common)


def split_answer(token_ids: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """Cut generated ids at the first stop id: (answer ids without it, whether one was generated)."""
    for i, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[:i], True
    return token_ids, False


def generate(
    loaded: Loaded,
    prompts: list[list[dict]] | list[str],
    max_new_tokens: int = 64,
    decoding: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_beams: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    streamer=None,
    progress=None,
) -> list[dict]:
    """Answer every prompt: [{"text", "token_ids", "stopped"}] in the prompts' order.

    `text` is the answer decoded without special tokens, stripped; `token_ids` the generated ids before the
    first stop id (no padding); `stopped` whether a stop id was generated within max_new_tokens.
    `streamer` (a transformers streamer) needs a single prompt; `progress(done, total)` is called per batch.
    """
    import torch

    if loaded.model is None:
        raise FinetuneError(f"{loaded.name}: the model was released")
    check_decoding(max_new_tokens, decoding, temperature, top_k, top_p, num_beams, seed, batch_size)
    if streamer is not None and len(prompts) != 1:
        raise FinetuneError("streaming answers one prompt at a time")
    config = generation_config(loaded, max_new_tokens, decoding, temperature, top_k, top_p, num_beams)
    encoded = [encode_prompt(loaded, p) for p in prompts]
    # Longest first, so each batch holds prompts of similar length (little padding); sorted() is stable.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[dict | None] = [None] * len(encoded)
    torch.manual_seed(seed)  # sampling draws from the global generator: seeded once, the command repeats
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = loaded.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            input_ids = batch["input_ids"].to(device)
            out = loaded.model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
                streamer=streamer,
            )
            new = out[:, input_ids.shape[1]:].tolist()
            for i, ids in zip(idx, new):
                answer, stopped = split_answer(ids, loaded.stop_ids)
                text = loaded.tokenizer.decode(answer, skip_special_tokens=True).strip()
                results[i] = {"text": text, "token_ids": answer, "stopped": stopped}
                if loaded.turn_end_id is not None:  # stopped by closing its turn, not by a plain end of text
                    results[i]["ended_turn"] = stopped and ids[len(answer)] == loaded.turn_end_id
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- command-line flags


def add_model_arguments(parser) -> None:
    """--dtype, --trust-remote-code and --threads."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype; auto = bf16 where the hardware has it, else fp32 (a run directory: "
                             "as trained). bf16 batched greedy output can differ slightly from one-at-a-time; "
                             "fp32 does not")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with a model (its config's auto_map): a local folder's, or a "
                             "run's whose recipe trusted it (only while the base's .py files hash as run.json "
                             "records)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice); on cores shared with other work, "
                             "1 can be much faster")


def apply_threads(args) -> None:
    """Honour --threads."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise FinetuneError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_decoding_arguments(parser, max_new_tokens: int = 64, batch: bool = True) -> None:
    """--decoding, --temperature, --top-k, --top-p, --num-beams, --max-new-tokens, --seed (, --batch-size)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--decoding", default="greedy", choices=DECODINGS, help="greedy (default), beam or sample")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (sample only)")
    group.add_argument("--top-k", type=int, default=50,
                       help="sample from the k likeliest tokens; 0 = all (sample only)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (sample only)")
    group.add_argument("--num-beams", type=int, default=4, help="beams (beam only)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"answer length cap (default {max_new_tokens})")
    group.add_argument("--seed", type=int, default=0, help="random seed: the same command repeats exactly")
    if batch:
        group.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")


def decoding_settings(args) -> dict:
    """The decoding flags as generate() keywords (only those that apply to the chosen decoding are kept
    in reports, see settings_for_report)."""
    settings = {
        "max_new_tokens": args.max_new_tokens, "decoding": args.decoding, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "num_beams": args.num_beams, "seed": args.seed,
    }
    if hasattr(args, "batch_size"):
        settings["batch_size"] = args.batch_size
    return settings


def settings_for_report(settings: dict) -> dict:
    """Decoding settings without the ones the chosen decoding ignores."""
    ignored = {"greedy": ("temperature", "top_k", "top_p", "num_beams"), "beam": ("temperature", "top_k", "top_p"),
               "sample": ("num_beams",)}[settings.get("decoding", "greedy")]
    return {k: v for k, v in settings.items() if k not in ignored}


@contextlib.contextmanager
def quiet_libraries():
    """Keep the terminal for answers and results: no weight-loading progress bars, no library chatter
    (bitsandbytes' optional-kernel notice, deprecation warnings raised inside transformers/peft). Everything it
    changes (and torch's thread count) is put back on leaving, so a later `finetune.train` in the same process
    still shows its progress bar."""
    import logging
    import warnings

    import torch
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    bnb = logging.getLogger("bitsandbytes")
    bnb_level, threads = bnb.level, torch.get_num_threads()
    with warnings.catch_warnings():
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        bnb.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
        # At inference a 4-bit layer runs without autograd on purpose; the warning matters only when training.
        warnings.filterwarnings("ignore", message=r".*autograd kernel was not registered.*")
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            (enable_progress_bars if hub_bars else disable_progress_bars)()  # transformers' switch sets the hub's
            bnb.setLevel(bnb_level)
            torch.set_num_threads(threads)
