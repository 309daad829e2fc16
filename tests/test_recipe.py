"""The recipe schema: every shipped recipe parses; bad keys and values give one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import FinetuneError
from finetune.recipe import load_recipe, parse_overrides, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
MINIMAL = {"output_dir": "runs/x", "data": {"datasets": ["json_extract"]}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.output_dir and recipe.data.datasets
    assert recipe.model.trust_remote_code is False


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_builds_its_stages_trl_config(path):
    from finetune import stages
    from finetune.stages.runner import trl_config

    recipe = load_recipe(path)
    stage = stages.get(recipe.train.stage)
    config = trl_config(recipe, stage)
    assert type(config) is stages.config_class(recipe.train.stage)
    assert config.output_dir.endswith("checkpoints") and config.seed == recipe.seed
    if recipe.train.stage in ("grpo", "rloo"):
        assert "beta" in yaml.safe_load(path.read_text())["train"]  # the KL weight is explicit in every RL recipe
        assert config.reward_weights == [r.weight for r in recipe.rewards]


def test_recipes_exist_for_every_stage():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    assert {f"smollm2-135m/{n}.yaml" for n in ("reward_lora", "dpo_lora", "dpo_qlora", "kto_lora", "grpo_lora",
                                               "rloo_lora")} <= names
    assert {"qwen2.5-0.5b/dpo_qlora.yaml", "qwen2.5-0.5b/reward_qlora.yaml", "qwen2.5-0.5b/grpo_qlora.yaml"} <= names
    assert {"tiny/pretrain.yaml", "tiny/sft.yaml", "tiny/dpo.yaml"} <= names


def test_recipes_exist_for_each_model_family():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    assert {"smollm2-135m/sft_lora.yaml", "smollm2-135m/sft_qlora.yaml"} <= names
    assert any(n.startswith("qwen2.5-0.5b/") for n in names)
    assert any(n.startswith("llama-3.2-1b/") for n in names)


@pytest.mark.parametrize("name", ["cpu", "cpu_ddp", "ddp", "fsdp2", "zero3"])
def test_accelerate_configs_are_valid_yaml(name):
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / f"{name}.yaml").read_text())
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    if name == "cpu_ddp":
        assert config["num_processes"] == 2
    if name == "fsdp2":
        assert config["fsdp_config"]["fsdp_version"] == 2


def _error(data, source="r.yaml") -> str:
    with pytest.raises(FinetuneError) as info:
        recipe_from_dict({**MINIMAL, **data}, source)
    return str(info.value)


def test_misspelled_key_names_the_closest_key():
    assert _error({"adapter": {"rnk": 8}}) == "r.yaml: unknown key 'adapter.rnk'; did you mean 'adapter.r'?"
    assert "did you mean 'train.learning_rate'?" in _error({"train": {"learnig_rate": 1e-4}})
    assert "did you mean 'quantization'?" in _error({"quantisation": {"bits": 4}})
    assert "did you mean 'data.max_length'?" in _error({"data": {"datasets": ["x"], "max_lenght": 3}})


def test_values_are_typed_and_checked():
    assert "adapter.r = 'eight' is invalid: expected an integer" in _error({"adapter": {"r": "eight"}})
    assert "quantization.bits = 3 is invalid: allowed: null, 4, 8" in _error({"quantization": {"bits": 3}})
    assert "adapter.dropout = 1.5 is invalid: must be <= 1.0" in _error({"adapter": {"dropout": 1.5}})
    assert "train.lr_scheduler_type = 'bogus' is invalid" in _error({"train": {"lr_scheduler_type": "bogus"}})
    assert "train.max_steps = 'many'" in _error({"train": {"max_steps": "many"}})


def test_yaml_scientific_notation_string_becomes_float():
    # PyYAML reads 3e-4 (no dot) as a string; the schema converts it to the field's type.
    recipe = recipe_from_dict({**MINIMAL, "train": yaml.safe_load("learning_rate: 3e-4")})
    assert recipe.train.args["learning_rate"] == pytest.approx(3e-4)


def test_contradictions_are_refused():
    assert "cannot be trained directly" in _error({"quantization": {"bits": 4}, "adapter": {"type": "none"}})
    assert "train.output_dir is set by output_dir (top level)" in _error({"train": {"output_dir": "y"}})
    assert "train.max_length is set by data.max_length" in _error({"train": {"max_length": 5}})
    assert "resume keeps output_dir" in _error({"train": {"resume": True}, "overwrite": True})
    assert "wrapped" in _error({"train": {"packing_strategy": "wrapped"}})
    assert "output_dir is missing" in _error({"output_dir": ""})
    assert "HF_TOKEN environment variable" in _error({"train": {"hub_token": "hf_x"}})


def test_overrides_are_dotted_and_typed(tmp_path):
    assert parse_overrides(["adapter.r=32", "train.max_steps=2", "output_dir=runs/x"]) == {
        "adapter": {"r": 32}, "train": {"max_steps": 2}, "output_dir": "runs/x"
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["adapter.r=32", "train.learning_rate=1e-3", "adapter.target_modules=[q_proj,v_proj]"])
    assert recipe.adapter.r == 32
    assert recipe.train.args["learning_rate"] == 1e-3
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(FinetuneError, match="unknown key 'adapter.rank'"):
        load_recipe(path, ["adapter.rank=4"])


def test_sft_evaluates_at_its_training_batch_unless_told(tmp_path):
    """SFT's held-out batches default to the training batch's rows (TRL's default of 8 grew the CPU heap past the
    training peak); a set value is kept; other stages keep TRL's default. The resolved recipe is left as written
    (a run recorded before the default resumes without a recipe difference)."""
    from finetune import stages
    from finetune.stages.runner import trl_config

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["train.per_device_train_batch_size=3"])
    assert trl_config(recipe, stages.get("sft")).per_device_eval_batch_size == 3
    assert "per_device_eval_batch_size" not in recipe.to_dict()["train"]
    told = load_recipe(path, ["train.per_device_train_batch_size=3", "train.per_device_eval_batch_size=5"])
    assert trl_config(told, stages.get("sft")).per_device_eval_batch_size == 5
    dpo = load_recipe(REPO / "recipes/smollm2-135m/dpo_lora.yaml", [f"output_dir={tmp_path / 'dpo'}"])
    assert trl_config(dpo, stages.get("dpo")).per_device_eval_batch_size == 8


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "adapter": {"alpah": 16}}))
    out = subprocess.run([sys.executable, "-m", "finetune", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"finetune: error: {bad}: unknown key 'adapter.alpah'; did you mean 'adapter.alpha'?"
    )
    assert "Traceback" not in out.stderr
    debug = subprocess.run([sys.executable, "-m", "finetune", "--debug", "validate", str(bad)],
                           capture_output=True, text=True)
    assert "Traceback" in debug.stderr


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("train", "validate"):
        assert verb in out.stdout
