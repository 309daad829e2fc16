"""The Python API: the three steps of the command line as functions that return paths and figures.

    import finetune

    base = finetune.train("recipes/tiny/pretrain.yaml", output_dir="runs/base", train={"max_steps": 20})
    chat = finetune.train("recipes/tiny/sft.yaml", model={"name": f"{base['run_dir']}/model"}, output_dir="runs/chat")
    exported = finetune.export(chat["run_dir"])
    report = finetune.compare({"base": base["run_dir"], "chat": exported["out"]}, prompts="json_extract")

`train` takes a recipe file or a Recipe, with overrides as keyword arguments: a top-level key
(`output_dir="runs/x"`), a section as a mapping merged into the recipe's (`train={"max_steps": 2}`), or a dotted
key (`**{"adapter.r": 32}`), checked exactly as the command line's `key=value` pairs. Errors raise
finetune.errors.FinetuneError with the same one-line messages. SIGINT/SIGTERM handlers are installed only while
training runs and are put back as they were on return.

`finetune.export` and `finetune.compare` are also the modules of those commands (finetune/export.py,
finetune/compare.py): calling the module calls its function of the same name.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


def train(recipe, **overrides) -> dict:
    """Train a recipe: a YAML path or a finetune.recipe.Recipe. Returns {"run_dir", "summary", "run"} (run:
    the run's run.json)."""
    from finetune.recipe import Recipe, _merge, parse_overrides, read_yaml_mapping, recipe_from_dict
    from finetune.stages import get

    if isinstance(recipe, Recipe):
        data, source = recipe.to_dict(), recipe.source
    else:
        source = str(recipe)
        data = read_yaml_mapping(Path(recipe), "a recipe is a mapping of sections (model, adapter, data, train, ...)")
    dotted = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if "." in k]
    data = _merge(data, {k: v for k, v in overrides.items() if "." not in k})
    data = _merge(data, parse_overrides(dotted, "finetune.train"))
    resolved = recipe_from_dict(data, source)
    run_dir = Path(get(resolved.train.stage).main(resolved))
    run = json.loads((run_dir / "run.json").read_text())
    return {"run_dir": run_dir, "summary": run.get("summary"), "run": run}


class CallableModule(types.ModuleType):
    """A command's module that is also its function: finetune.export(...) calls finetune.export.export(...)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = CallableModule
