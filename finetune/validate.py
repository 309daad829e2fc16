"""Check a recipe and its data without training.

    finetune validate RECIPE [key=value ...]

Parses the recipe, loads and checks every dataset row, builds the stage's TRL config and trainer (whichever
stage the recipe names), and shows the first training example as the trainer will see it: for SFT taken
from its collated batch, trained tokens marked [[like this]]; for the other stages the first row in the
stage's shape (a preference pair, an unpaired example, a prompt with its reference). Prints dataset
statistics (rows, tokens, truncated, dropped, held-out overlap) and an estimate of the run's peak memory
(finetune/memory.py), and exits.
"""

from __future__ import annotations

import json

from finetune.recipe import Recipe


def mark_trained(tokenizer, input_ids, labels) -> str:
    """Decode a sequence, wrapping each run of trained tokens (label != -100) in [[ ]]."""
    out, run, trained = [], [], False
    for token, label in zip(input_ids, labels):
        is_trained = label != -100
        if is_trained != trained and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        trained = is_trained
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def main(recipe: Recipe) -> dict:
    import dataclasses
    import tempfile
    from pathlib import Path

    from finetune import memory
    from finetune.errors import FinetuneError
    from finetune.rundir import check_output_dir
    from finetune.stages.runner import build

    # Would `train` accept output_dir? Say so, but build the trainer in a scratch folder: validate writes nothing.
    try:
        check_output_dir(Path(recipe.output_dir), recipe.train.resume, recipe.overwrite, recipe.source)
        output_note = None
    except FinetuneError as e:
        output_note = f"warning: train would stop here: {e}"
    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as scratch:
        built = build(dataclasses.replace(recipe, output_dir=scratch))
        estimate = memory.estimate(built.trainer, recipe, built.prepared)
        if built.state.is_main_process:
            print("Peak memory estimate (finetune/memory.py): " + ", ".join(
                f"{k} {v / 1024:.2f} GiB" for k, v in estimate.items() if k not in ("total", "tokens_per_step"))
                + f"; total {estimate['total'] / 1024:.2f} GiB at {estimate['tokens_per_step']} tokens per step")
        if recipe.train.stage != "sft":
            return _show_rows(recipe, built, output_note)
        return _show(recipe, built.trainer, built.prepared, built.chat, built.state, output_note)


def _show_rows(recipe, built, output_note) -> dict:
    example = json.dumps(built.prepared.first_example, indent=1, ensure_ascii=False)
    if built.state.is_main_process:
        print(f"Recipe {recipe.source}: OK (stage {recipe.train.stage}, chat template {built.chat.family}, "
              f"TRL config {type(built.trainer.args).__name__})")
        print(f"\nFirst training row, as the {recipe.train.stage} trainer reads it:\n\n{example}")
        print("\nDataset statistics:")
        print(json.dumps(built.prepared.stats, indent=2))
        if output_note:
            print(output_note)
    return {"stats": built.prepared.stats, "example": example}


def _show(recipe, trainer, prepared, chat, state, output_note) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # In a packed batch the first row holds several examples; show up to the end of the first one.
    if "position_ids" in batch:
        positions = batch["position_ids"][0].tolist()
        end = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
        input_ids, labels = input_ids[:end], labels[:end]
    shown = mark_trained(trainer.processing_class, input_ids, labels)
    if state.is_main_process:
        print(f"Recipe {recipe.source}: OK (stage {recipe.train.stage}, chat template {chat.family})")
        print("\nFirst training example from the trainer's collated batch; trained tokens in [[ ]]:\n")
        print(shown)
        print("\nDataset statistics:")
        print(json.dumps(prepared.stats, indent=2))
        if output_note:
            print(output_note)
    return {"stats": prepared.stats, "example": shown}
