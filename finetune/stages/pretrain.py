"""Pretraining: a causal LM on plain-text documents, every weight trained (from scratch, or continued).

    finetune train recipes/tiny/pretrain.yaml [key=value ...]

With `model.name: scratch` the model is built from the recipe's `architecture` section and its tokenizer trained
on the corpus (finetune/scratch.py); with a model folder, pretraining continues that model. Data: documents of
`format: text` datasets, each tokenized and ended with EOS, laid end to end and cut into rows of data.max_length
tokens. A document that does not fit is continued at the start of the next row, so no token is thrown away. Each
document piece in a row gets its own position ids starting at 0: with no attention mask, the model then attends
only within a piece (as SFT packing does), and no token is trained to predict the first token of another piece.
Trained with transformers' Trainer (a cosine schedule with warmup and gradient clipping by default, bf16 where the
hardware has it). Held-out figures: loss and perplexity on held-out documents, before and after, beside the
held-out unigram entropy (what a model that knows only word frequencies would score). Summary: tokens/s and MFU.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from finetune import data as data_lib
from finetune import fastpath
from finetune.errors import FinetuneError
from finetune.stages import runner

CONFIG = "transformers.TrainingArguments"
TASK = "causal_lm"
OWNS = {"include_num_input_tokens_seen": "the pretrain stage (always on: it gives tokens/s)",
        "remove_unused_columns": "the pretrain stage (its collator reads position_ids)"}
# Our defaults for pretraining a small model from scratch, over recipe.TRAIN_DEFAULTS.
DEFAULTS = {
    "learning_rate": 2e-3,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 16,
    "logging_steps": 10,
    "save_steps": 200,
}


def config_kwargs(recipe) -> dict:
    return {"include_num_input_tokens_seen": "all", "remove_unused_columns": False}


# ----------------------------------------------------------------------------- packing


def pack(documents: list[list[int]], max_length: int) -> list[dict]:
    """Token documents (each already ending with EOS) laid end to end in rows of max_length tokens (the last row may
    be shorter). A document that does not fit is carried on into the next row; every piece's position ids start
    at 0, which is what keeps pieces apart in attention."""
    rows, ids, positions = [], [], []
    for doc in documents:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, max_length - len(ids))
            ids += doc[start : start + take]
            positions += range(take)
            start += take
            if len(ids) == max_length:
                rows.append({"input_ids": ids, "position_ids": positions})
                ids, positions = [], []
    if ids:
        rows.append({"input_ids": ids, "position_ids": positions})
    return rows


@dataclass
class PackedCollator:
    """Rows padded to the longest in the batch. Labels: the tokens, except at the first position of each piece (no
    token predicts across a document boundary) and at padding (a piece of its own). No attention mask, so the model
    keeps pieces apart by their position ids."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.arange(width).repeat(len(rows), 1)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = input_ids[i, :n]
            position_ids[i, :n] = torch.tensor(row["position_ids"])
            position_ids[i, n:] = torch.arange(width - n)
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


# ----------------------------------------------------------------------------- the stage


def prepare(recipe, tokenizer, chat, seed):
    """Documents read and checked, tokenized with EOS appended, packed; the held-out unigram entropy."""
    import datasets

    if tokenizer.eos_token_id is None:
        raise FinetuneError(f"{recipe.source}: the tokenizer has no EOS token to separate documents; set one")
    splits, per_dataset, hashes = {"train": [], "eval": []}, [], {}
    for which, refs in (("train", recipe.data.datasets), ("eval", recipe.data.eval_datasets)):
        for ref in refs:
            docs, reasons, rows_read, digest = data_lib.read_checked(ref, recipe.data, seed, "text", "pretrain")
            # A document's text that spells a special token (<|endoftext|>) stays text, not a control token.
            ids = tokenizer(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"] if docs else []
            splits[which] += [doc + [tokenizer.eos_token_id] for doc in ids]
            hashes.update(digest)
            per_dataset.append({"dataset": ref.name, "split": ref.split, "rows_read": rows_read, "documents": len(docs),
                                "tokens": sum(len(d) + 1 for d in ids), "dropped": dict(reasons),
                                **({"held_out": True} if which == "eval" else {})})
    if not splits["train"]:
        names = ", ".join(f"{ref.name}:{ref.split}" for ref in recipe.data.datasets)
        raise FinetuneError(f"{recipe.source}: the corpus is empty: data.datasets ({names}) holds no document with "
                            "text; point it at text files or a dataset of format text")
    random.Random(seed).shuffle(splits["train"])  # rows mix the corpus's sources; the trainer shuffles rows too
    train_rows = pack(splits["train"], recipe.data.max_length)
    eval_rows = pack(splits["eval"], recipe.data.max_length) if splits["eval"] else []
    tokens = sum(len(d) for d in splits["train"])
    packed = sum(len(r["input_ids"]) for r in train_rows)
    if packed != tokens:  # pack() keeps every token; this guards it
        raise FinetuneError(f"packing lost {tokens - packed} of {tokens} tokens")
    stats = {
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "train_documents": len(splits["train"]), "eval_documents": len(splits["eval"]),
        "train_tokens": tokens, "trained_tokens": _targets(train_rows), "eval_tokens": sum(map(len, splits["eval"])),
        # Pieces of documents carried on into the next row (each restarts its positions at 0).
        "carried_pieces": sum(r["position_ids"].count(0) for r in train_rows) - len(splits["train"]),
        # Held-out documents also in training (exactly; near duplicates are not searched among documents).
        "overlap": {"exact": len({tuple(d) for d in splits["eval"]} & {tuple(d) for d in splits["train"]})},
        "dropped": sum(sum(s["dropped"].values()) for s in per_dataset),
        "vocab_size": len(tokenizer),
        "unigram_entropy_eval": unigram_entropy(train_rows, eval_rows, len(tokenizer)) if eval_rows else None,
        "datasets": per_dataset,
    }
    columns = lambda rows: {"input_ids": [r["input_ids"] for r in rows],  # noqa: E731
                            "position_ids": [r["position_ids"] for r in rows]}
    train = datasets.Dataset.from_dict(columns(train_rows))
    eval_ds = datasets.Dataset.from_dict(columns(eval_rows)) if eval_rows else None
    first = tokenizer.decode(splits["train"][0])
    return data_lib.Prepared(train, eval_ds, stats, hashes, first[:2000])


def _targets(rows: list[dict]) -> int:
    """Tokens that are predicted (every token but the first of each piece)."""
    return sum(sum(1 for p in r["position_ids"] if p != 0) for r in rows)


def unigram_entropy(train_rows: list[dict], eval_rows: list[dict], vocab_size: int) -> float:
    """Cross-entropy (nats per token) of the held-out predicted tokens under the training tokens' unigram
    frequencies (add-one smoothed): the loss of a model that knows word frequencies and no context."""
    counts = Counter(t for r in train_rows for t, p in zip(r["input_ids"], r["position_ids"]) if p != 0)
    total = sum(counts.values()) + vocab_size
    held = [t for r in eval_rows for t, p in zip(r["input_ids"], r["position_ids"]) if p != 0]
    return round(-sum(math.log((counts[t] + 1) / total) for t in held) / max(1, len(held)), 4)


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from transformers import Trainer

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    # A cache in training mode hides the packed pieces from the attention mask (ENVIRONMENT.md); on again at save.
    model.config.use_cache = False

    class PretrainTrainer(Trainer):
        """transformers' Trainer whose loss attends within each packed piece only and takes logits only where a
        label is (finetune/fastpath.py); train.fast_path: false gives the model's own loss over the whole row."""

        def training_step(self, *args, **kwargs):
            if not recipe.train.fast_path or not fastpath.usable(self.model):
                return super().training_step(*args, **kwargs)
            with fastpath.step_modules(self.model, None):  # backward's recomputation sees the same forward
                return super().training_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not recipe.train.fast_path or not fastpath.usable(self.model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return fastpath.trainer_loss(self, model, inputs, num_items_in_batch)

    if recipe.train.fast_path:
        fastpath.install_attention()
    fastpath.install_fused(recipe.train.fused_kernels if recipe.train.fast_path else False, args)
    trainer = PretrainTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      data_collator=PackedCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=callbacks)
    # The matmul rate MFU is measured against, before training and again after it (throughput below): shared cores
    # have slow phases lasting seconds, and the faster of the two is the machine's rate.
    trainer.matmul_flops_before = _matmul_flops(args)
    return trainer


def _matmul_flops(args) -> float:
    import torch

    from finetune.bench import matmul_flops

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return matmul_flops(dtype, seconds=1.0, windows=4)


def held_out(trainer, prepared) -> dict | None:
    """Held-out loss per predicted token (summed over every held-out token, not averaged per batch, so a short
    last row weighs what its tokens weigh) and perplexity; logged too, so the loss curve shows them."""
    import torch

    if prepared.eval is None:
        return None
    model, collate = trainer.model, PackedCollator(trainer.processing_class.pad_token_id)
    was_training, size = model.training, trainer.args.per_device_eval_batch_size
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad(), trainer.autocast_smart_context_manager():
        for start in range(0, len(prepared.eval), size):
            chunk = prepared.eval[start : start + size]
            batch = collate([dict(zip(chunk, row)) for row in zip(*chunk.values())])
            batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1))[..., 0]
            nll -= logp[mask].sum().item()
            count += int(mask.sum())
    model.train(was_training)
    loss = nll / max(1, count)
    figures = {"eval_loss": round(loss, 5), "eval_perplexity": round(math.exp(min(loss, 50.0)), 3),
               "eval_tokens": count}
    trainer.log(dict(figures))
    return figures


def summary(before, after, history) -> dict:
    return {"eval_loss_before": before["eval_loss"] if before else None,
            "eval_loss_after": after["eval_loss"] if after else None,
            "eval_perplexity_before": before["eval_perplexity"] if before else None,
            "eval_perplexity_after": after["eval_perplexity"] if after else None}


def throughput(trainer, tokens_per_second: float | None, prepared) -> dict:
    """Model size, the held-out unigram entropy it is measured against, and MFU: 6 x parameters x tokens/s over
    the dense matmul rate measured on this machine in the dtype training computed in (the faster of the
    measurements before and after training)."""
    from finetune.scratch import parameter_count

    model = trainer.model
    parameters = parameter_count(model)
    out = {"parameters": parameters, "parameters_without_embeddings": parameter_count(model, embeddings=False),
           "unigram_entropy_eval": prepared.stats.get("unigram_entropy_eval")}
    if tokens_per_second:
        peak = max(getattr(trainer, "matmul_flops_before", 0.0), _matmul_flops(trainer.args))
        dtype = "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else "float32"
        out.update({"matmul_tflops_measured": round(peak / 1e12, 3), "matmul_dtype": dtype,
                    "model_tflops": round(6 * parameters * tokens_per_second / 1e12, 4),
                    "mfu": round(6 * parameters * tokens_per_second / peak, 4)})
    return out


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
