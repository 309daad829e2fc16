"""The recipe schema: one strict set of typed dataclasses.

A recipe is a YAML file with the sections `model`, `quantization`, `adapter`, `data`, `train` and the
top-level keys `output_dir`, `overwrite` and `seed`; a model built from scratch (`model.name: scratch`, stage
pretrain) adds `architecture` and `tokenizer`. Every key is checked when the recipe is loaded:
unknown keys name the closest valid key, values are converted to the field's type (YAML reads `3e-4`
as a string), enums and ranges are checked, contradictions are refused. Keys under `train` are the
fields of the stage's TRL config (`trl.SFTConfig` for `stage: sft`, `trl.DPOConfig` for `stage: dpo`, ...;
see finetune/stages/), checked the same way. `rewards` names the reward sources of the grpo/rloo stages.

Command-line overrides use dotted keys: `adapter.r=32 train.max_steps=2 output_dir=runs/x`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune import stages, trackers
from finetune.errors import FinetuneError, shown
from finetune.stages import STAGES

DTYPES = ("auto", "bf16", "fp16", "fp32")
# model.name of a model built from the recipe's `architecture` section and pretrained (stage pretrain).
SCRATCH = "scratch"


def field_spec(default, help, choices=None, minimum=None, maximum=None):
    """A dataclass field with help text and optional checks (lists get a fresh copy per instance)."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = field_spec("embedded:smollm2-135m",
                           "Base model: a local HF folder, a hub id, embedded:smollm2-135m, or scratch (built from "
                           "the `architecture` section, randomly initialised: stage pretrain; a folder named scratch "
                           "is ./scratch).")
    revision: str | None = field_spec(None, "Hub revision (branch, tag or commit) when `name` is a hub id; with "
                                            "trust_remote_code, a commit hash.")
    dtype: str = field_spec("auto",
                            "Dtype of the frozen base weights; auto = bf16 where the hardware has it, else fp32.",
                            DTYPES)
    attn_implementation: str = field_spec("sdpa", "Attention kernel.", ("sdpa", "eager", "flash_attention_2"))
    trust_remote_code: bool = field_spec(False, "Run Python code shipped with the model (its config's auto_map). Off "
                                                "unless you trust it; a hub model's code then runs only at a pinned "
                                                "revision and code_revision (finetune/trust.py).")
    code_revision: str | None = field_spec(None, "With trust_remote_code: the commit hash of the hub repo the model's "
                                                 "code comes from (its own, or another named in auto_map as "
                                                 "repo--module).")
    init_from: str | None = field_spec(None, "A completed run directory whose adapter this run continues training "
                                             "(e.g. DPO after SFT); its model (base + adapter) is the frozen reference "
                                             "where the stage has one.")


@dataclass
class QuantizationConfig:
    bits: int | None = field_spec(None,
                                  "Load the base in 4 or 8 bits with bitsandbytes (QLoRA); null = no quantization.",
                                  (None, 4, 8))
    quant_type: str = field_spec("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quant: bool = field_spec(True, "Quantize the 4-bit scales too (saves ~0.4 bit per weight).")
    compute_dtype: str = field_spec("auto", "Dtype the 4-bit matmuls compute in; auto follows model.dtype.", DTYPES)


@dataclass
class AdapterConfig:
    type: str = field_spec("lora", "lora trains low-rank adapters; none trains every weight (full fine-tuning).",
                           ("lora", "none"))
    r: int = field_spec(16, "LoRA rank.", minimum=1, maximum=65536)
    alpha: int = field_spec(32, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).",
                            minimum=1)
    dropout: float = field_spec(0.0, "Dropout on the LoRA input (on CPU its random masks cost ~27% of a LoRA step at "
                                     "0.05).", minimum=0.0, maximum=1.0)
    target_modules: list[str] = field_spec(["all-linear"], "Modules to adapt: names, or all-linear for every linear "
                                                           "layer but the head.")
    use_dora: bool = field_spec(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = field_spec(False, "Rank-stabilised scaling alpha/sqrt(r).")
    modules_to_save: list[str] = field_spec([], "Modules trained in full and saved with the adapter (e.g. lm_head, "
                                                "embed_tokens).")
    dtype: str = field_spec("fp32", "Dtype of the adapter weights (and so of their optimizer state).", ("fp32", "bf16"))


@dataclass
class DatasetRef:
    name: str = field_spec("", "A datasets_cfg/ name, a path to a dataset YAML, or a data file "
                               "(.jsonl/.json/.csv/.parquet/.txt).")
    split: str = field_spec("train", "Which split of the dataset YAML to read.")
    weight: float = field_spec(1.0, "Mixture weight: keeps round(weight * rows) rows, repeating rows when above 1.",
                               minimum=0.0, maximum=1000.0)
    max_rows: int | None = field_spec(None, "Read at most this many rows (before weighting).", minimum=1)


@dataclass
class DataConfig:
    datasets: list[DatasetRef] = field_spec([], "Training datasets.")
    eval_datasets: list[DatasetRef] = field_spec([], "Held-out datasets for eval loss and the overlap check.")
    chat_template: str = field_spec("auto", "Chat template: auto (the model's own: its {% generation %} markers, TRL's "
                                            "training twin, or masks from rendering prefixes), a family (smollm2, "
                                            "chatml, qwen3, gemma3, llama3, phi3, ...: any TRL ships), or a .jinja "
                                            "path.")
    max_length: int = field_spec(512, "Tokens per sequence (per packed row when packing).", minimum=8,
                                 maximum=2**20)  # TRL's packing allocates a table of 2 x max_length entries
    packing: bool = field_spec(True, "Pack several rows per sequence, kept apart by position ids (exact, no "
                                     "cross-attention).")
    assistant_only_loss: bool = field_spec(True, "Train only on assistant tokens and their end-of-turn tokens.")
    strict: bool = field_spec(True, "Stop at the first malformed row; false skips them (counted per reason).")
    max_drop_fraction: float = field_spec(0.01, "In lenient mode, fail when more than this share of rows is dropped.",
                                          minimum=0.0, maximum=1.0)
    cache_dir: str | None = field_spec(None,
                                       "Processed-data cache; default $FINETUNE_HOME/data (~/.cache/finetune/data).")
    num_proc: int | None = field_spec(None, "Processes that tokenize (datasets.map); default: one per core (up to "
                                            "8) from 4000 rows, else one.", minimum=1)


@dataclass
class ArchitectureConfig:
    """A Llama-style decoder built from scratch (model.name: scratch); its vocabulary size is the tokenizer's."""

    layers: int = field_spec(6, "Transformer blocks.", minimum=1)
    hidden_size: int = field_spec(256, "Width of the residual stream.", minimum=8)
    intermediate_size: int = field_spec(768, "Width of the SwiGLU MLP.", minimum=8)
    heads: int = field_spec(4, "Attention heads (hidden_size / heads is the head size; it must be even for RoPE).",
                            minimum=1)
    kv_heads: int = field_spec(4, "Key/value heads (grouped-query attention when fewer than heads; must divide them).",
                               minimum=1)
    rope_theta: float = field_spec(10000.0, "RoPE base frequency.", minimum=1.0)
    max_position_embeddings: int = field_spec(1024, "Longest sequence the model is built for (>= data.max_length).",
                                              minimum=8)
    tie_embeddings: bool = field_spec(True, "Share the input embeddings with the output head.")
    init_std: float = field_spec(0.02, "Random init: weights ~ N(0, init_std); the projections that write into "
                                       "the residual stream (o_proj, down_proj) N(0, init_std / sqrt(2 * layers)); "
                                       "norms 1.", minimum=1e-6)


@dataclass
class TokenizerConfig:
    """The tokenizer of a model built from scratch: trained on the training corpus, or reused."""

    name: str | None = field_spec(None, "Reuse this tokenizer (an HF folder or hub id) instead of training one.")
    vocab_size: int = field_spec(8192, "Vocabulary of the byte-level BPE trained on the corpus (256 byte tokens and "
                                       "the special tokens included).", minimum=1)
    min_frequency: int = field_spec(2, "A merge is learned only from pairs seen at least this often.", minimum=1)


@dataclass
class TrainConfig:
    stage: str = field_spec("sft", "Training stage (finetune/stages/).", tuple(STAGES))
    resume: bool | int | str = field_spec(False, "Continue the run in output_dir: true (its last complete checkpoint), "
                                                 "a checkpoint's step (e.g. 400) or a checkpoint folder's path. "
                                                 "Checkpoints after the one resumed are moved aside.")
    resume_changes: bool = field_spec(False, "Resume even though the recipe, data or library versions differ from "
                                             "the interrupted run's (listed when refused).")
    on_nonfinite: str = field_spec("stop", "A NaN/inf loss or gradient: stop the run before the optimizer step, or "
                                           "skip that step (counted in the logs and summary).", ("stop", "skip"))
    max_nonfinite_skips: int = field_spec(10, "on_nonfinite: skip: stop the run once more steps than this were "
                                              "skipped.", minimum=0)
    fast_path: bool = field_spec(True, "SFT and pretraining: logits only where the loss is taken, attention within "
                                       "each packed document, LoRA in the base's dtype; DPO, KTO, GRPO, RLOO: TRL's "
                                       "head scores only labelled positions on the CPU too (finetune/fastpath.py). "
                                       "false: the plain TRL/transformers step.")
    fused_kernels: bool | None = field_spec(
        None, "With fast_path (SFT, pretraining): RMSNorm, rotary embedding, SwiGLU and the loss's softmax each run "
              "as one kernel each way, which torch.compile generates on the first step (seconds, counted in that "
              "step; its inductor caches them on disk); where compiling fails, a warning and the eager kernels. Inside "
              "a kernel the arithmetic is fp32, so bf16 results differ from the eager step's by rounding. null: on "
              "CUDA where Triton is installed; true: on any device (the CPU's need a C++ compiler); false: never.")
    gpu_tokens_per_step: int | None = field_spec(
        16384, "On CUDA, packed SFT: the per-device batch is raised to this many tokens per optimizer step (batch x "
               "data.max_length x gradient_accumulation_steps), or to what the memory estimate fits in 85% of the "
               "GPU's free memory if fewer; never below per_device_train_batch_size, which the CPU keeps "
               "(finetune bench: small batches are fastest there). Where the step's rows fit in one forward, "
               "gradient_accumulation_steps is folded into the batch (the same rows and update); where "
               "dataloader_num_workers is 0 (the default; an explicit 0 reads the same), 2 DataLoader workers "
               "collate the next batches while a step runs. Fewer, larger steps per epoch; a resumed run keeps the "
               "batch its checkpoint was trained with. Not under DeepSpeed. null: the recipe's batch and loader on "
               "GPUs too.", minimum=1)
    # Everything else under `train` is a field of the stage's TRL config, kept here after checking.
    args: dict[str, Any] = field_spec({}, "Arguments of the stage's TRL config.")


@dataclass
class RewardSource:
    function: str | None = field_spec(None,
                                      "A rule reward by name (finetune/rewards.py): exact_match, format, length, ...")
    model: str | None = field_spec(None, "A reward model: a `stage: reward` run directory or an exported reward model "
                                         "folder.")
    weight: float = field_spec(1.0, "Weight of this reward in the sum the policy maximises.")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    rewards: list[RewardSource] = field_spec([], "Reward sources of the grpo and rloo stages, each a function or a "
                                                 "model, weighted.")
    output_dir: str = field_spec("", "Run directory. Refused if it exists, unless train.resume or overwrite.")
    overwrite: bool = field_spec(False, "Replace an existing output_dir.")
    seed: int = field_spec(42, "Seed for data order, adapter init and training (numpy's range: 0 to 2**32 - 1).",
                           minimum=0, maximum=2**32 - 1)
    source: str = field(default="<recipe>", metadata={"internal": True})

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what run.json stores and `train` prints)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        args = out["train"].pop("args")
        out["train"].update(args)
        return out


# Keys of the TRL config that the recipe sets elsewhere, so there is one place for each setting (each stage's
# module adds its own in OWNS).
OWNED_ELSEWHERE = {
    "output_dir": "output_dir (top level)",
    "seed": "seed (top level)",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "assistant_only_loss": "data.assistant_only_loss",
    "resume_from_checkpoint": "train.resume",
    "chat_template_path": "data.chat_template",
    "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code",
    "hub_token": "the HF_TOKEN environment variable (secrets never go in a recipe)",
    "reward_weights": "rewards[].weight",
}

# Our defaults for the TRL config, where TRL's own do not fit a LoRA run on a small machine.
TRAIN_DEFAULTS = {
    "learning_rate": 2e-4,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    # Recomputing activations costs ~30% more time; a LoRA on a small model fits in memory without it.
    "activation_checkpointing": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
}

# The least value of TRL config fields that neither TRL nor transformers checks: below it, a run fails deep inside
# a library (a DataLoader, a division) instead of at load time.
TRAIN_MINIMUMS = {
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "eval_accumulation_steps": 1,
    "dataloader_num_workers": 0,
    "num_generations": 2,
    "learning_rate": 0.0,
}


# ----------------------------------------------------------------------------- value conversion


class _Invalid(Exception):
    pass


# YAML 1.1 (PyYAML) reads these unquoted words as booleans; an enum value spelled as one of them is recovered.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}
_QUOTE_HINT = " (YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the word, e.g. 'no')"


def _checked_text(value: str) -> str:
    """A string as a setting: no NUL character (no path or name holds one) and no unpaired surrogate (from a
    \\ud800-style escape: not text that can be written or printed)."""
    if "\x00" in value:
        raise _Invalid("holds a NUL character (\\0)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Invalid(f"holds an unpaired surrogate ({value[e.start]!r}), not text") from None
    return value


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(str(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value, tp):
    """Convert a YAML / command-line value to the annotated type, or raise _Invalid."""
    if isinstance(tp, str):  # postponed annotation
        tp = eval(tp, {**typing.__dict__, **globals()})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise _Invalid("null is not allowed")
        # TRL types enum-like fields as `SomeEnum | str`; the str is for the enum's values, so check them.
        enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
        if enums and (isinstance(value, str) or (isinstance(value, bool) and bool not in options)):
            return _convert(value, enums[0])
        # Prefer an exact type match (so 5 stays an int in `int | str`), then conversions in order.
        for option in options:
            if isinstance(option, type) and not issubclass(option, enum.Enum) and type(value) is option:
                return _convert(value, option)  # the same value, checked (no NUL in a str, no NaN in a float)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option)
            except _Invalid:
                continue
        raise _Invalid(f"expected {' or '.join(_type_name(o) for o in options)}"
                       + (_QUOTE_HINT if isinstance(value, bool) and str in options else ""))
    if value is None:
        raise _Invalid("null is not allowed")
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # `a,b` on the command line, or one name
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Invalid("expected a list")
        return [_convert(v, item_type) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Invalid("expected a mapping")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_type): _convert(v, value_type) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if isinstance(value, bool):  # `eval_strategy: no` as TRL's docs write it: YAML 1.1 reads a bare no as false
            spelled = [a for a in allowed if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        raise _Invalid(f"expected one of {', '.join(map(str, allowed))}"
                       + (_QUOTE_HINT if isinstance(value, bool) else ""))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Invalid("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _Invalid("expected an integer")
        number = None
        if isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.replace("_", ""))
            except ValueError:
                pass
        if number is None:
            raise _Invalid("expected an integer")
        if abs(number) >= 2**63:  # no count or size is that large, and torch cannot hold it
            raise _Invalid("out of range: an integer setting fits in 64 bits")
        return number
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid("expected a number")
        if isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                raise _Invalid("expected a number") from None
            if not math.isfinite(number):  # .nan, .inf, 1e999: no setting means that
                raise _Invalid("expected a finite number")
            return number
        raise _Invalid("expected a number")
    if tp is str:
        if isinstance(value, str):
            return _checked_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        raise _Invalid("expected a string" + (_QUOTE_HINT if isinstance(value, bool) else ""))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise _Invalid("expected a mapping")
    return value


# ----------------------------------------------------------------------------- strict building


def _short(text: str, limit: int = 80) -> str:
    """A key or value as an error message shows it: on one line (escaped), cut to `limit` characters."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _unknown_key(source: str, key: str, valid: list[str]) -> FinetuneError:
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5) if len(leaf) <= 200 else []
    hint = f"did you mean '{(section + '.') if section else ''}{close[0]}'?" if close else (
        "valid keys here: " + ", ".join(sorted(valid))
    )
    return FinetuneError(f"{source}: unknown key '{_short(key)}'; {hint}")


def _bad_value(source: str, key: str, value, why: str) -> FinetuneError:
    return FinetuneError(f"{source}: {key} = {shown(value)} is invalid: {why}")


def build_section(cls, data, prefix: str, source: str):
    """Build dataclass `cls` from a mapping, checking every key, type, enum and range."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad_value(source, prefix or "recipe", data, "expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields or (cls is TrainConfig and key == "args"):
            raise _unknown_key(source, dotted, [k for k in fields if not (cls is TrainConfig and k == "args")])
        tp = hints[key]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value, dotted, source)
        elif item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise _bad_value(source, dotted, value, "expected a list")
            kwargs[key] = [
                build_section(item, {"name": v} if isinstance(v, str) else v, f"{dotted}[{i}]", source)
                for i, v in enumerate(value)
            ]
        else:
            try:
                kwargs[key] = _convert(value, tp)
            except _Invalid as e:
                raise _bad_value(source, dotted, value, str(e)) from None
            _check_field(fields[key], kwargs[key], dotted, source)
    return cls(**kwargs)


def _check_field(f: dataclasses.Field, value, key: str, source: str):
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join("null" if c is None else str(c) for c in meta["choices"])
        raise _bad_value(source, key, value, f"allowed: {allowed}")
    if meta.get("min") is not None and value is not None and value < meta["min"]:
        raise _bad_value(source, key, value, f"must be >= {meta['min']}")
    if meta.get("max") is not None and value is not None and value > meta["max"]:
        raise _bad_value(source, key, value, f"must be <= {meta['max']}")


def _build_train(data, source: str) -> TrainConfig:
    """`train`: our keys (stage, resume, fast_path, ...: TrainConfig) plus fields of the stage's TRL config."""
    if not isinstance(data or {}, dict):
        raise _bad_value(source, "train", data, "expected a mapping of keys")
    data = dict(data or {})
    ours = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "args"]
    own = build_section(TrainConfig, {k: data.pop(k) for k in ours if k in data}, "train",
                        source)
    config_cls = stages.config_class(own.stage)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    stage = stages.get(own.stage)
    args = {**TRAIN_DEFAULTS, **getattr(stage, "DEFAULTS", {})}
    owned = {**OWNED_ELSEWHERE, **getattr(stage, "OWNS", {})}
    for key, value in data.items():
        if key in owned:
            raise FinetuneError(f"{source}: train.{key} is set by {owned[key]}; move it there")
        if key not in fields:
            raise _unknown_key(source, f"train.{key}", [*fields, *ours])
        try:
            args[key] = _convert(value, hints[key])
        except _Invalid as e:
            raise _bad_value(source, f"train.{key}", value, str(e)) from None
        least = TRAIN_MINIMUMS.get(key)
        if least is not None and isinstance(args[key], (int, float)) and args[key] < least:
            raise _bad_value(source, f"train.{key}", value, f"must be >= {least}")
    # A list of trackers (a comma-separated string on the command line), each supported and installed.
    args["report_to"] = trackers.check_report_to(args.get("report_to"), source) or "none"
    own.args = args
    return own


def _check_recipe(r: Recipe) -> None:
    """Cross-field checks: settings that each parse but contradict one another."""
    src = r.source
    if not r.output_dir:
        raise FinetuneError(f"{src}: output_dir is missing; set it in the recipe or as output_dir=runs/NAME")
    if not r.data.datasets:
        raise FinetuneError(f"{src}: data.datasets is empty; name at least one dataset (see datasets_cfg/)")
    for i, ref in enumerate([*r.data.datasets, *r.data.eval_datasets]):
        if not ref.name:
            raise FinetuneError(f"{src}: a dataset entry ({i}) has no name")
    if r.adapter.type == "lora" and not all(name.strip() for name in r.adapter.target_modules or [""]):
        raise FinetuneError(f"{src}: adapter.target_modules = {r.adapter.target_modules} names no module; give module "
                            "names of the model (e.g. [q_proj, v_proj]) or all-linear")
    if r.quantization.bits and r.adapter.type == "none":
        raise FinetuneError(
            f"{src}: quantization.bits = {r.quantization.bits} with adapter.type = none: quantized weights "
            "cannot be trained directly; use adapter.type: lora (QLoRA) or quantization.bits: null"
        )
    if r.adapter.use_dora and r.quantization.bits == 8:
        raise FinetuneError(f"{src}: adapter.use_dora with quantization.bits = 8 is not supported by peft; use 4 bits")
    if r.model.dtype == "fp16" and r.train.args.get("bf16"):
        raise FinetuneError(f"{src}: model.dtype = fp16 with train.bf16 = true; pick one precision")
    if isinstance(r.train.resume, str) and r.train.resume.strip().lower() in ("true", "false", ""):
        r.train.resume = r.train.resume.strip().lower() == "true"
    elif isinstance(r.train.resume, str) and r.train.resume.strip().isdigit():
        r.train.resume = int(r.train.resume.strip())
    if isinstance(r.train.resume, int) and not isinstance(r.train.resume, bool) and r.train.resume < 0:
        raise FinetuneError(f"{src}: train.resume = {r.train.resume}: give true, a checkpoint's step (>= 0) or a "
                            "checkpoint folder")
    if r.train.resume is not False and r.overwrite:
        raise FinetuneError(
            f"{src}: train.resume and overwrite are both true; resume keeps output_dir, overwrite deletes it"
        )
    args = r.train.args
    if r.train.stage in ("grpo", "rloo") and not r.rewards:
        raise FinetuneError(
            f"{src}: stage {r.train.stage} needs rewards: add e.g. `rewards: [{{function: exact_match}}]` or "
            "`rewards: [{model: runs/my-reward-run}]`"
        )
    if r.rewards and r.train.stage not in ("grpo", "rloo"):
        raise FinetuneError(f"{src}: rewards is used by the grpo and rloo stages only, not by stage {r.train.stage}")
    for i, source in enumerate(r.rewards):
        if (source.function is None) == (source.model is None):
            raise FinetuneError(
                f"{src}: rewards[{i}] needs exactly one of `function` (a rule) or `model` (a reward run)"
            )
        if source.function is not None:
            from finetune.rewards import check_function_name

            check_function_name(source.function, f"{src}: rewards[{i}].function")
    _check_scratch(r)
    if r.train.stage == "pretrain" and not r.data.packing:
        raise FinetuneError(f"{src}: data.packing = false: pretraining always packs documents into rows (a "
                            "document's tail carried on into the next row); remove the key")
    if r.train.stage == "reward" and r.adapter.type == "none":
        raise FinetuneError(f"{src}: stage reward needs adapter.type lora (a reward model is read back as base + "
                            "adapter + score head); full fine-tuning of a reward model is not supported")
    if r.model.init_from and r.adapter.type == "none":
        raise FinetuneError(f"{src}: model.init_from continues a run's adapter; adapter.type none has none to continue")
    if args.get("max_steps", -1) == 0:
        raise FinetuneError(f"{src}: train.max_steps = 0 trains nothing; use -1 for whole epochs or a positive count")
    strategy = args.get("packing_strategy", "bfd")
    if r.train.stage == "sft" and r.data.packing and strategy == "wrapped":
        raise FinetuneError(
            f"{src}: train.packing_strategy = wrapped lets one row attend to the end of another; "
            "use bfd (default) or bfd_split"
        )


# Special tokens of a tokenizer trained from scratch: end of text (between documents), padding, and the ChatML
# turn markers, each one token.
SCRATCH_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def _check_scratch(r: Recipe) -> None:
    """A model built from scratch: its architecture and tokenizer, and what it cannot be combined with."""
    src, arch = r.source, r.architecture
    if r.model.name != SCRATCH:
        for section, default in (("architecture", ArchitectureConfig()), ("tokenizer", TokenizerConfig())):
            if getattr(r, section) != default:
                raise FinetuneError(f"{src}: {section} describes a model built from scratch; it is used only with "
                                    f"model.name: {SCRATCH} (stage pretrain), not with model.name = {r.model.name!r}")
        return
    if r.train.stage != "pretrain":
        raise FinetuneError(f"{src}: model.name: {SCRATCH} builds a random model: pretrain it first (train.stage: "
                            f"pretrain), then use its run's model folder (RUN_DIR/model) as model.name of a "
                            f"{r.train.stage} recipe")
    if r.adapter.type != "none" or r.quantization.bits or r.model.init_from:
        raise FinetuneError(f"{src}: a model built from scratch trains every weight: set adapter.type: none, "
                            "quantization.bits: null and no model.init_from")
    if arch.hidden_size % arch.heads:
        raise FinetuneError(f"{src}: architecture.hidden_size = {arch.hidden_size} is not divisible by "
                            f"architecture.heads = {arch.heads}; each head gets hidden_size / heads dimensions "
                            f"(e.g. hidden_size {arch.heads * max(2, round(arch.hidden_size / arch.heads))})")
    if (arch.hidden_size // arch.heads) % 2:
        raise FinetuneError(f"{src}: head size hidden_size / heads = {arch.hidden_size // arch.heads} is odd; RoPE "
                            "rotates pairs of dimensions, so pick hidden_size and heads with an even quotient")
    if arch.heads % arch.kv_heads:
        raise FinetuneError(f"{src}: architecture.heads = {arch.heads} is not a multiple of architecture.kv_heads = "
                            f"{arch.kv_heads}; each key/value head serves heads / kv_heads query heads")
    if arch.max_position_embeddings < r.data.max_length:
        raise FinetuneError(f"{src}: data.max_length = {r.data.max_length} is longer than "
                            f"architecture.max_position_embeddings = {arch.max_position_embeddings}; raise the "
                            "latter or shorten the former")
    smallest = 256 + len(SCRATCH_SPECIAL_TOKENS)
    if r.tokenizer.name is None and r.tokenizer.vocab_size < smallest:
        raise FinetuneError(f"{src}: tokenizer.vocab_size = {r.tokenizer.vocab_size} is smaller than the 256 byte "
                            f"tokens a byte-level BPE starts from plus its {len(SCRATCH_SPECIAL_TOKENS)} special "
                            f"tokens {', '.join(SCRATCH_SPECIAL_TOKENS)}; use at least {smallest} (e.g. 8192)")


# ----------------------------------------------------------------------------- loading


def parse_overrides(pairs: list[str], source: str = "command line") -> dict:
    """`a.b=1 c=x` -> nested dict {'a': {'b': 1}, 'c': 'x'} (values parsed as YAML scalars/lists)."""
    out: dict = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise FinetuneError(f"{source}: override '{pair}' is not key=value (e.g. adapter.r=32)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FinetuneError(f"{source}: override '{pair}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise FinetuneError(f"{source}: a recipe is a mapping of sections (model, adapter, data, train, ...)")
    data = dict(data)
    train = _build_train(data.pop("train", None), source)
    recipe = build_section(Recipe, data, "", source)
    recipe.train = train
    recipe.source = source
    _check_recipe(recipe)
    return recipe


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a dataset YAML), or one clear error naming it."""
    if not path.is_file():
        raise FinetuneError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FinetuneError(f"{path}: not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise FinetuneError(f"{path}: not valid YAML{_yaml_problem(e)}; fix the syntax there") from None
    except RecursionError:
        raise FinetuneError(f"{path}: nested too deeply to read (thousands of levels of lists or mappings)") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: {what}, not {type(data).__name__}")
    if _is_recursive(data):
        raise FinetuneError(f"{path}: an alias (*name) refers to a mapping or list that holds it; settings "
                            "cannot be recursive")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line, column) and what."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = ", ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
    return where + ": " + _short(" ".join((what or str(e)).split()), 200)


def _is_recursive(data) -> bool:
    """Whether a mapping or list holds itself (YAML anchors and aliases can build that); each node is visited once,
    so aliases repeated many times cost nothing."""
    on_path, done, stack = set(), set(), [(data, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if not isinstance(node, (dict, list)) or id(node) in done:
            continue
        if id(node) in on_path:
            return True
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in (node.values() if isinstance(node, dict) else node))
    return False


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    data = read_yaml_mapping(path, "a recipe is a mapping of sections (model, adapter, data, train, ...)")
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
    return recipe_from_dict(data, str(path))
