"""Shared fixtures: the embedded SmolLM2 (converted once), tiny models built from a config, small data.

Tiny models use hidden size 64 and 2 layers: bitsandbytes' CPU path crashes on 4-bit layers whose input
size is under 64. They share SmolLM2's tokenizer, so chat templates and loss masks are the real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]


@pytest.fixture(scope="session")
def smol_path() -> str:
    from finetune.models import resolve_model

    return resolve_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path)


def build_tiny(arch: str, tokenizer, folder: Path, tie: bool = True) -> Path:
    """A 2-layer, hidden-64 model of the given architecture, saved as an HF folder with the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        # With the default init (std 0.02) and tied embeddings, RMS-normed hidden states reach logits of ~1 at
        # most, capping how far any adapter can lower the loss; 0.1 leaves room to learn.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer, tmp_path_factory) -> Path:
    return build_tiny("llama", smol_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(smol_tokenizer, tmp_path_factory) -> Path:
    return build_tiny("qwen2", smol_tokenizer, tmp_path_factory.mktemp("tiny-qwen2"), tie=False)


def assert_no_local_paths(folder: Path, *paths) -> None:
    """No file under folder (text or weights' headers) names these paths, the home folder or FINETUNE_HOME."""
    from finetune.files import home_dir

    forbidden = {str(p) for p in paths} | {f"{Path.home()}/", str(home_dir())}
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            data = file.read_bytes()
            found = [p for p in forbidden if p.encode() in data]
            assert not found, f"{file.relative_to(folder)} names the local path(s) {found}"


def front_matter(card: Path) -> dict:
    """A model card's YAML header, parsed as the Hub parses it (and as plain YAML)."""
    import yaml
    from huggingface_hub import ModelCard

    text = card.read_text()
    assert text.startswith("---\n"), "the card opens with YAML front matter"
    assert isinstance(yaml.safe_load(text.split("---\n")[1]), dict)
    return ModelCard(text).data.to_dict()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    rows = [{"messages": c} for c in CONVERSATIONS] * 4
    return write_jsonl(tmp_path / "chats.jsonl", rows)


def tiny_recipe(tmp_path: Path, model_dir, data_file, **sections):
    """A recipe dict for a few quick steps on a tiny model; sections override parts of it."""
    from finetune.recipe import recipe_from_dict

    recipe = {
        "model": {"name": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"datasets": [str(data_file)], "max_length": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 2, "save_steps": 100,
                  "warmup_steps": 0, "lr_scheduler_type": "constant"},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe_from_dict(recipe, "test-recipe.yaml")


class Snapshot:
    """A trainer callback that copies trainable and frozen weights when training begins."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Snapshot(TrainerCallback):
            def __init__(self):
                self.trainable, self.frozen, self.model = {}, {}, None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.model = model
                for name, p in model.named_parameters():
                    (self.trainable if p.requires_grad else self.frozen)[name] = p.detach().clone()

        return _Snapshot()
