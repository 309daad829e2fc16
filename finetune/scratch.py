"""A model built from scratch (`model.name: scratch`): its tokenizer and its randomly initialised weights.

Tokenizer: a byte-level BPE trained with the `tokenizers` library on the recipe's training documents (never the
held-out ones), `tokenizer.vocab_size` entries including the 256 byte tokens and the special tokens
<|endoftext|> (EOS, between documents), <|pad|> (padding, distinct from EOS and the end-of-turn token) and the
ChatML turn markers <|im_start|>/<|im_end|>, each a single token. It is saved as an HF tokenizer with the ChatML
chat template, and cached under $FINETUNE_HOME/tokenizers by the corpus's hash and the settings, so it is trained
once. Or `tokenizer.name` reuses an existing tokenizer: what it lacks is added, and an EOS that is a chat turn
marker (SmolLM2's is <|im_end|>) is replaced by <|endoftext|>, so documents are not separated by end-of-turn
tokens. A resumed run reads the tokenizer saved in its checkpoint.

Model: a Llama-style decoder from the `architecture` section, vocabulary size = the tokenizer's, in fp32 (the
trainer computes in bf16 where the hardware has it). Init: every linear and embedding weight ~ N(0, init_std),
the projections that write into the residual stream (o_proj, down_proj) ~ N(0, init_std / sqrt(2 * layers))
(GPT-2's scaled init), norms 1; seeded by the recipe's seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import file_lock, home_dir, staged_dir
from finetune.recipe import SCRATCH_SPECIAL_TOKENS

EOS, PAD, IM_START, IM_END = SCRATCH_SPECIAL_TOKENS
# Bumped when the way tokenizers are trained changes, so old cache entries are not reused.
TOKENIZER_VERSION = 1


def corpus_documents(recipe) -> list[str]:
    """The training documents of a pretraining recipe (held-out ones excluded), checked; refused when empty."""
    from finetune import data as data_lib

    documents = []
    for ref in recipe.data.datasets:
        docs, _, _, _ = data_lib.read_checked(ref, recipe.data, recipe.seed, "text", recipe.train.stage)
        documents += docs
    if not documents:
        names = ", ".join(f"{ref.name}:{ref.split}" for ref in recipe.data.datasets)
        raise FinetuneError(f"{recipe.source}: the corpus is empty: data.datasets ({names}) holds no document with "
                            "text; point it at text files or a dataset of format text")
    return documents


def load_tokenizer(recipe):
    """The tokenizer of a scratch model: the resumed checkpoint's, reused (tokenizer.name), or trained on the
    corpus (cached)."""
    from finetune import models

    if recipe.train.resume is not False:
        from finetune.checkpoints import resume_target

        checkpoint = resume_target(Path(recipe.output_dir), recipe.train.resume, recipe.source)
        if (checkpoint / "tokenizer.json").is_file():
            return models.load_tokenizer(str(checkpoint))
    if recipe.tokenizer.name:
        tokenizer = models.load_tokenizer(models.resolve_model(recipe.tokenizer.name)
                                          if recipe.tokenizer.name.startswith("embedded:") else recipe.tokenizer.name)
        return _with_special_tokens(tokenizer)
    return models.load_tokenizer(str(train_tokenizer(corpus_documents(recipe), recipe.tokenizer.vocab_size,
                                                     recipe.tokenizer.min_frequency)))


def train_tokenizer(documents: list[str], vocab_size: int, min_frequency: int = 2):
    """Train (or find in the cache) a byte-level BPE on `documents`; returns its HF tokenizer folder."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode()).digest())
    import tokenizers

    from finetune import templates

    template = templates.load_family("chatml")[0]
    settings = [TOKENIZER_VERSION, digest.hexdigest(), vocab_size, min_frequency, SCRATCH_SPECIAL_TOKENS, template,
                tokenizers.__version__]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20]
    folder = home_dir() / "tokenizers" / key
    with file_lock(folder.parent / f".{key}.lock"):
        if (folder / "tokenizer.json").is_file():
            return folder
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        print(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on {len(documents)} documents "
              f"(once; cached in {folder})...", flush=True)
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SCRATCH_SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
        backend.train_from_iterator(documents, trainer, length=len(documents))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD,
                                            additional_special_tokens=[IM_START, IM_END])
        tokenizer.chat_template = template
        with staged_dir(folder, replace=True) as tmp:
            tokenizer.save_pretrained(tmp)
    return folder


def _with_special_tokens(tokenizer):
    """A reused tokenizer gets what pretraining and a chat model need: an EOS that is not a turn marker, a pad
    token that is neither EOS nor a turn marker, the ChatML markers."""
    from finetune import templates

    if tokenizer.eos_token is None or tokenizer.eos_token in (IM_START, IM_END):
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.pad_token in (None, tokenizer.eos_token, IM_START, IM_END):
        tokenizer.add_special_tokens({"pad_token": PAD})
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if not isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = templates.load_family("chatml")[0]
    return tokenizer


def model_config(arch, tokenizer, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig

    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=arch.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta}, initializer_range=arch.init_std,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config, [tokenizer.eos_token_id, end_of_turn]


def build_model(recipe, tokenizer):
    """A randomly initialised Llama-style causal LM (fp32) as the architecture section says, seeded."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    arch = recipe.architecture
    config, stop_ids = model_config(arch, tokenizer, recipe.model.attn_implementation)
    _check_fits(config, recipe.source)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config).float()  # transformers' init: N(0, initializer_range), norms 1
    residual_std = arch.init_std / math.sqrt(2 * arch.layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, residual_std)
            layer.mlp.down_proj.weight.normal_(0.0, residual_std)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return model


def _check_fits(config, source: str) -> None:
    """Refuse, before allocating, a model whose fp32 weights alone exceed this machine's memory (a slip such as
    `layers: 60000` would end in an allocation error or the OOM killer)."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    block = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size + 2 * h
    params = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + config.num_hidden_layers * block + h
    need, have = 4 * params, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise FinetuneError(f"{source}: the architecture section describes a model of {params:,} parameters, "
                            f"{need / 2**30:,.1f} GiB of fp32 weights: more than this machine's {have / 2**30:.1f} GiB "
                            "of memory; use fewer layers or smaller sizes")


def parameter_count(model, embeddings: bool = True) -> int:
    """Parameters (a tied head counted once); without `embeddings`, those of the blocks and final norm only."""
    seen, total = set(), 0
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    for p in model.parameters():
        if id(p) in seen or (not embeddings and id(p) in skip):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
