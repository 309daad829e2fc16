"""Reward, DPO, KTO, GRPO and RLOO on tiny models: what each stage must change, what it must not, and chains."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, Snapshot, front_matter, tiny_recipe, write_jsonl  # noqa: F401
from safetensors.torch import load_file

from finetune import stages
from finetune.errors import FinetuneError

GOOD, BAD = "Yes, gladly.", "No way."


def _pairs(n: int, offset: int = 0) -> list[dict]:
    """A separable preference set: the chosen answer is always GOOD, the rejected one always BAD."""
    return [{"prompt": [{"role": "user", "content": f"Request number {i}: will you help?"}],
             "chosen": [{"role": "assistant", "content": GOOD}],
             "rejected": [{"role": "assistant", "content": BAD}],
             "rejection_type": "refusal" if i % 2 else "other"} for i in range(offset, offset + n)]


@pytest.fixture
def pref_files(tmp_path):
    return (write_jsonl(tmp_path / "pref.jsonl", _pairs(32)),
            write_jsonl(tmp_path / "pref_heldout.jsonl", _pairs(12, 100)))


def _recipe(tmp_path, model_dir, data, stage, eval_data=None, out="run", **sections):
    """A recipe for a few quick steps of `stage` on a tiny model; sections add to its parts."""
    from finetune.recipe import recipe_from_dict

    raw = {"model": {"name": str(model_dir), **sections.get("model", {})},
           "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, **sections.get("adapter", {})},
           "data": {"datasets": [str(data)], "eval_datasets": [str(eval_data)] if eval_data else [],
                    "max_length": 128, "cache_dir": str(tmp_path / "cache")},
           "train": {"stage": stage, "max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
                     "save_steps": 100, "warmup_steps": 0, "lr_scheduler_type": "constant",
                     **sections.get("train", {})},
           "rewards": sections.get("rewards", []),
           "output_dir": str(tmp_path / out)}
    return recipe_from_dict(raw, f"{stage}-recipe.yaml")


def _run(recipe, callbacks=()):
    run_dir = stages.get(recipe.train.stage).main(recipe, callbacks)
    return run_dir, json.loads((run_dir / "run.json").read_text())


# ----------------------------------------------------------------------------- reward


def test_reward_model_learns_a_separable_set_and_its_head_is_saved(tmp_path, tiny_llama, pref_files):
    train, heldout = pref_files
    snap = Snapshot()
    recipe = _recipe(tmp_path, tiny_llama, train, "reward", heldout, model={"dtype": "fp32"},
                     train={"max_steps": 16, "learning_rate": 5e-3})
    run_dir, run = _run(recipe, [snap])
    summary = run["summary"]
    assert summary["heldout_pairwise_after"]["accuracy"] > 0.9, summary
    assert summary["heldout_pairwise_after"]["per_type"].keys() == {"refusal", "other"}
    head = {n: p for n, p in snap.model.named_parameters() if "score" in n and p.requires_grad}
    assert head, "the score head is not trained"
    assert all(not torch.equal(p.detach(), snap.trainable[n]) for n, p in head.items())
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_" in k for k in saved)

    # The saved run, reloaded in a fresh process, reproduces the held-out scores: the head was saved.
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from finetune.rewards import load_reward_model, score
rows = [json.loads(line) for line in open({str(heldout)!r})]
model, tok = load_reward_model({str(run_dir)!r})
print(json.dumps(score(model, tok, [r["prompt"] + r["chosen"] for r in rows])))
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    reloaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert reloaded == pytest.approx(summary["heldout_scores_chosen"], abs=1e-4)


def test_exported_reward_model_scores_like_the_run(tmp_path, tiny_llama, pref_files):
    from finetune import export
    from finetune.rewards import load_reward_model, score

    train, heldout = pref_files
    run_dir, _ = _run(_recipe(tmp_path, tiny_llama, train, "reward", heldout, model={"dtype": "fp32"}))
    report = export.main(run_dir, dtype="fp32")
    assert report["gate"] == "passed" and report["merged_vs_adapter"]["max_abs_score_diff"] < 1e-4
    assert "stop_check" not in report
    texts = [r["prompt"] + r["chosen"] for r in _pairs(4, 100)]
    from_run = score(*load_reward_model(str(run_dir)), texts)
    from_export = score(*load_reward_model(str(run_dir / "export")), texts)
    assert from_export == pytest.approx(from_run, abs=1e-4)
    meta = front_matter(run_dir / "export" / "README.md")
    assert meta["pipeline_tag"] == "text-classification" and meta["tags"] == ["finetune", "reward", "reward-model",
                                                                              "lora"]


# ----------------------------------------------------------------------------- dpo


@pytest.fixture
def sft_run(tmp_path, tiny_llama, chat_file):
    """A short SFT run in fp32 whose adapter clearly changes the base's logits."""
    from finetune.stages import sft

    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, model={"dtype": "fp32"}, output_dir=str(tmp_path / "sft"),
                         train={"max_steps": 6, "learning_rate": 5e-2})
    return sft.main(recipe)


def _logit_gap(run_dir: Path) -> float:
    from finetune.generate import load_for_inference

    loaded = load_for_inference(str(run_dir), dtype="fp32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        tuned = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    return (tuned - base).abs().max().item()


def test_dpo_from_an_sft_run_starts_at_the_sft_model_and_trains_only_its_adapter(tmp_path, tiny_llama, sft_run,
                                                                                 pref_files):
    assert _logit_gap(sft_run) > 0.5  # the SFT model is clearly not the base
    train, heldout = pref_files
    snap = Snapshot()
    recipe = _recipe(tmp_path, tiny_llama, train, "dpo", heldout, out="dpo",
                     model={"dtype": "fp32", "init_from": str(sft_run)},
                     train={"max_steps": 6, "learning_rate": 2e-2, "loss_type": ["sigmoid"], "label_smoothing": 0.0,
                            "precompute_ref_log_probs": False, "beta": 0.1})
    run_dir, run = _run(recipe, [snap])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r and r["step"] == 1)
    # Step 1's batch is scored before any update: the policy IS the reference (the SFT model), not the base.
    assert abs(first["rewards/margins"]) <= 1e-5 and abs(first["loss"] - math.log(2)) <= 1e-5, first

    model = snap.model
    params = dict(model.named_parameters())
    default = {n: p for n, p in params.items() if ".default." in n}
    ref = {n: p for n, p in params.items() if ".ref." in n}
    assert default and set(default) == set(snap.trainable) and ref
    unchanged = [n for n, p in default.items() if torch.equal(p.detach(), snap.trainable[n])]
    assert unchanged == [], f"adapter tensors that did not change: {unchanged[:5]}"
    moved = [n for n, before in snap.frozen.items() if not torch.equal(params[n].detach(), before)]
    assert moved == [], f"frozen tensors (base or TRL's ref adapter) that changed: {moved[:5]}"

    before, after = run["summary"]["heldout_preference_before"], run["summary"]["heldout_preference_after"]
    assert after["mean_margin"] > before["mean_margin"], (before, after)
    assert set(after["per_type"]) == {"refusal", "other"}
    assert run["init_from"]["run_dir"] == str(sft_run) and [c["stage"] for c in run["chain"]] == ["sft", "dpo"]
    assert not (run_dir / "adapter" / "ref").exists()  # TRL's frozen copy is not part of the result


def test_dpo_without_init_from_trains_a_fresh_adapter_against_the_base(tmp_path, tiny_llama, pref_files):
    train, heldout = pref_files
    snap = Snapshot()
    run_dir, run = _run(_recipe(tmp_path, tiny_llama, train, "dpo", heldout, train={"max_steps": 4}), [snap])
    params = dict(snap.model.named_parameters())
    assert not [n for n in params if ".ref." in n]  # reference = base with the adapter disabled
    assert [n for n, b in snap.frozen.items() if not torch.equal(params[n].detach(), b)] == []
    assert (run["summary"]["heldout_preference_after"]["mean_margin"]
            > run["summary"]["heldout_preference_before"]["mean_margin"])
    assert run["chain"] == [{"stage": "dpo", "run_dir": str(run_dir)}]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_preference_stages_score_labelled_positions_only_with_trls_loss_and_gradients(tmp_path, tiny_llama, pref_files,
                                                                                      dtype, monkeypatch):
    """DPO (KTO, GRPO and RLOO take the same TRL head) on the CPU: TRL's fused LM head projects only the positions
    with a label, as it does where its Triton kernel runs, and the loss and every gradient are those of its
    every-position route on the CPU (fp32: to 1e-6; bf16 base: to 1e-3). During training the compact route is on;
    after it, and with train.fast_path: false, TRL's own."""
    import contextlib

    import trl.trainer.utils as trl_utils
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from finetune import fastpath
    from finetune.stages import runner

    train, _ = pref_files
    cpu = torch.device("cpu")
    trainer = runner.build(_recipe(tmp_path, tiny_llama, train, "dpo", model={"dtype": dtype},
                                   train={"max_steps": 1})).trainer
    assert isinstance(trainer, DPOTrainer) and type(trainer) is not DPOTrainer
    scored, routes = [], []
    chunked = trl_utils._ChunkedLogProbFunction

    class Spy:  # the rows TRL's head projects, and whether its compact route is on, passed on to it unchanged
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            routes.append(trl_utils._use_triton(cpu))
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    model = trainer.model
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # away from the reference, so that every gradient is non-zero
            param.data.normal_(0, 0.5)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labelled, every = int(batch["completion_mask"][:, 1:].sum()), batch["input_ids"][:, 1:].numel()
    assert labelled < every

    def loss_and_gradients(compact: bool):
        model.train()
        model.zero_grad()
        scored.clear()
        with fastpath.compact_fused_head() if compact else contextlib.nullcontext():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, scored[:]

    loss, grads, rows = loss_and_gradients(True)
    plain_loss, plain_grads, plain_rows = loss_and_gradients(False)
    assert rows == [labelled, labelled] and plain_rows == [every, every]  # policy and reference passes
    tolerance = {"fp32": 1e-6, "bf16": 1e-3}[dtype]
    assert abs(loss.item() - math.log(2)) > 0.01  # the policy is not its reference
    torch.testing.assert_close(loss, plain_loss, rtol=tolerance, atol=tolerance)
    assert grads.keys() == plain_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=tolerance, atol=tolerance, msg=name)

    during = []

    class Probe(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            during.append(trl_utils._use_triton(cpu))

    trainer.add_callback(Probe())
    trainer.train()
    assert during == [True] and trl_utils._use_triton(cpu) is False
    routes.clear()  # a reference precomputed when the trainer is built takes the compact route too
    runner.build(_recipe(tmp_path, tiny_llama, train, "dpo", model={"dtype": dtype},
                         train={"precompute_ref_log_probs": True}))
    assert routes and all(routes)
    plain = runner.build(_recipe(tmp_path, tiny_llama, train, "dpo", train={"fast_path": False})).trainer
    assert type(plain) is DPOTrainer


@pytest.mark.parametrize("stage", ["kto", "grpo", "rloo"])
def test_kto_grpo_and_rloo_take_the_same_compact_head_unless_fast_path_is_off(tmp_path, tiny_llama, stage):
    """KTO, GRPO and RLOO score through the same TRL head as DPO (above): their trainers take the compact route too,
    and with train.fast_path: false are TRL's own classes."""
    import trl

    from finetune.stages import runner

    trainer_class = {"kto": trl.KTOTrainer, "grpo": trl.GRPOTrainer, "rloo": trl.RLOOTrainer}[stage]
    extra, train = {}, {}
    if stage == "kto":
        rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in _pairs(8)]
        data = write_jsonl(tmp_path / "kto.jsonl", rows)
    else:
        data = _prompt_file(tmp_path, GOOD, 8)
        extra, train = {"rewards": [{"function": "exact_match"}]}, {"num_generations": 4}
    fast = runner.build(_recipe(tmp_path, tiny_llama, data, stage, train=train, **extra)).trainer
    assert isinstance(fast, trainer_class) and type(fast) is not trainer_class
    plain = runner.build(_recipe(tmp_path, tiny_llama, data, stage, train={**train, "fast_path": False}, **extra))
    assert type(plain.trainer) is trainer_class


def test_dpo_held_out_loss_from_the_margins_is_trls_eval_loss(tmp_path, tiny_llama, sft_run, pref_files):
    """The held-out DPO loss taken from the policy's margins after training and before it (the reference's) is
    the loss TRL's evaluation computes with its policy and reference passes over the same pairs; where TRL would
    truncate a pair, the loss is TRL's evaluation's."""
    from finetune.stages import dpo, runner

    train, heldout = pref_files
    recipe = _recipe(tmp_path, tiny_llama, train, "dpo", heldout, out="dpo-eval",
                     model={"dtype": "fp32", "init_from": str(sft_run)}, train={"max_steps": 3})
    built = runner.build(recipe)
    trainer = built.trainer
    before = dpo.held_out(trainer, built.prepared)
    assert "eval_loss" not in before and len(trainer.heldout_reference_margins) == before["preference"]["pairs"]
    trainer.train()
    after = dpo.held_out(trainer, built.prepared)
    trl = runner.eval_loss(trainer, built.prepared)
    assert abs(after["eval_loss"] - 0.693147) > 1e-3  # it trained
    assert after["eval_loss"] == pytest.approx(trl["eval_loss"], rel=1e-4), (after, trl)
    assert after["eval_rewards/margins"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-3, abs=1e-5)
    assert after["eval_rewards/accuracies"] == pytest.approx(trl["eval_rewards/accuracies"])
    # Held-out pairs longer than max_length are scored truncated by TRL: then its evaluation gives the loss.
    data = trainer.eval_dataset
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                  data["rejected_ids"]))
    assert dpo._untruncated(trainer, len(data)) and not dpo._untruncated(trainer, len(data) + 1)  # + 1: one dropped
    trainer.args.max_length = longest - 1
    assert not dpo._untruncated(trainer, len(data))
    truncated = dpo.held_out(trainer, built.prepared)
    assert truncated["eval_loss"] == trl["eval_loss"] and truncated["preference"] == after["preference"]


def test_export_of_a_chain_merges_its_one_adapter_into_the_base(tmp_path, tiny_llama, sft_run, pref_files):
    from finetune import export

    train, heldout = pref_files
    run_dir, _ = _run(_recipe(tmp_path, tiny_llama, train, "dpo", heldout, out="dpo",
                              model={"dtype": "fp32", "init_from": str(sft_run)}, train={"max_steps": 2}))
    report = export.main(run_dir, dtype="fp32", stop_check=False)
    assert report["gate"] == "passed"
    assert [c["stage"] for c in report["chain"]] == ["sft", "dpo"]
    assert "sft (" in (run_dir / "export" / "README.md").read_text()


# ----------------------------------------------------------------------------- kto


def test_kto_trains_on_unpaired_examples_from_an_sft_run(tmp_path, tiny_llama, sft_run):
    rows = [{"prompt": [{"role": "user", "content": f"Request {i}: will you help?"}],
             "completion": [{"role": "assistant", "content": GOOD if i % 2 else BAD}], "label": bool(i % 2)}
            for i in range(24)]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    snap = Snapshot()
    run_dir, run = _run(_recipe(tmp_path, tiny_llama, data, "kto", data, out="kto",
                                model={"init_from": str(sft_run)}, train={"max_steps": 4}), [snap])
    params = dict(snap.model.named_parameters())
    assert all(not torch.equal(params[n].detach(), b) for n, b in snap.trainable.items())
    assert run["summary"]["heldout_logp_gap_after"] > run["summary"]["heldout_logp_gap_before"]


# ----------------------------------------------------------------------------- grpo / rloo


def _prompt_file(tmp_path, reference: str, n: int = 16) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Write anything ({i})."},
                          {"role": "assistant", "content": reference}]}
            for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_rl_with_a_rule_reward_raises_the_reward(tmp_path, tiny_qwen2, stage):
    """The length reward pays 1.0 for answers no longer than the reference and less for longer ones. A random
    model's 8-token answers are ~50 characters, so shorter answers are rewarded; with the head trained
    (modules_to_save), the policy learns to prefer short tokens within a few steps."""
    data = _prompt_file(tmp_path, "x" * 40)
    recipe = _recipe(tmp_path, tiny_qwen2, data, stage, rewards=[{"function": "length"}],
                     adapter={"modules_to_save": ["lm_head"]},
                     train={"max_steps": 12, "learning_rate": 2e-2, "num_generations": 8, "max_completion_length": 8,
                            "temperature": 0.3, "per_device_train_batch_size": 8, "beta": 0.0, "logging_steps": 1})
    run_dir, run = _run(recipe)
    summary = run["summary"]
    assert summary["train_reward_last"] > summary["train_reward_first"] + 0.1, summary
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert logged and all(set(r["rewards"]) == {"length"} for r in logged)


def test_grpo_logs_the_reward_models_own_score_of_each_completion(tmp_path, tiny_llama, pref_files):
    from finetune.rewards import load_reward_model, score

    train, heldout = pref_files
    reward_dir, _ = _run(_recipe(tmp_path, tiny_llama, train, "reward", out="reward", model={"dtype": "fp32"}))
    data = _prompt_file(tmp_path, GOOD, 8)
    # fp32 policy: under bf16 mixed precision, accelerate runs the reward model under bf16 autocast too, and the
    # logged rewards are its scores rounded to bf16 (~1e-2).
    recipe = _recipe(tmp_path, tiny_llama, data, "grpo", out="grpo", model={"dtype": "fp32"},
                     rewards=[{"model": str(reward_dir)}, {"function": "exact_match", "weight": 0.5}],
                     train={"max_steps": 2, "num_generations": 4, "max_completion_length": 6, "beta": 0.04})
    run_dir, run = _run(recipe)
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(logged) >= 4
    model, tokenizer = load_reward_model(str(reward_dir))
    direct = score(model, tokenizer, [r["prompt"] + r["completion"] for r in logged])
    names = list(logged[0]["rewards"])
    model_key = next(n for n in names if n != "exact_match")
    assert [r["rewards"][model_key] for r in logged] == pytest.approx(direct, abs=1e-4)
    assert run["recipe"]["rewards"][0]["model"] == str(reward_dir)


# ----------------------------------------------------------------------------- bad input


def test_a_dpo_recipe_on_sft_data_names_the_format(tmp_path, tiny_llama, chat_file):
    with pytest.raises(FinetuneError,
                       match=r"format messages does not fit stage dpo, which trains on preference pairs"):
        _run(_recipe(tmp_path, tiny_llama, chat_file, "dpo"))


def test_preference_rows_are_checked_by_file_and_row(tmp_path, tiny_llama):
    rows = _pairs(3)
    rows[1]["rejected"] = rows[1]["chosen"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(FinetuneError, match=r"bad.jsonl: row 2: chosen == rejected"):
        _run(_recipe(tmp_path, tiny_llama, data, "dpo"))
    rows = _pairs(3)
    rows[2]["prompt"] = ""
    data = write_jsonl(tmp_path / "bad2.jsonl", rows)
    with pytest.raises(FinetuneError, match=r"bad2.jsonl: row 3: no prompt"):
        _run(_recipe(tmp_path, tiny_llama, data, "reward"))


def test_init_from_a_missing_or_unfinished_run_is_refused(tmp_path, tiny_llama, pref_files):
    train, _ = pref_files
    with pytest.raises(FinetuneError, match=r"model.init_from .*nowhere does not exist"):
        _run(_recipe(tmp_path, tiny_llama, train, "dpo", model={"init_from": str(tmp_path / "nowhere")}))
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"status": "failed", "stage": "sft"}))
    with pytest.raises(FinetuneError, match=r"status is 'failed', not completed"):
        _run(_recipe(tmp_path, tiny_llama, train, "dpo", model={"init_from": str(failed)}))


def test_a_reward_source_that_is_not_a_one_output_classifier_is_refused(tmp_path, tiny_llama, sft_run):
    data = _prompt_file(tmp_path, GOOD, 4)
    for source, why in [
        (str(tiny_llama), "not a reward model: a reward source is a sequence classifier with one output"),
        (str(sft_run), "run of stage 'sft', not a reward model"),
    ]:
        with pytest.raises(FinetuneError, match=why):
            _run(_recipe(tmp_path, tiny_llama, data, "grpo", rewards=[{"model": source}],
                         train={"num_generations": 4}))


def test_an_unknown_reward_function_names_the_known_ones(tmp_path, tiny_llama):
    data = _prompt_file(tmp_path, GOOD, 4)
    with pytest.raises(FinetuneError, match=r"rewards\[0\].function = 'exact' is not a reward function; known: "
                                            r"exact_match, format, length"):
        _recipe(tmp_path, tiny_llama, data, "grpo", rewards=[{"function": "exact"}])
    with pytest.raises(FinetuneError, match=r"stage grpo needs rewards"):
        _recipe(tmp_path, tiny_llama, data, "grpo")


def test_train_keys_are_checked_against_the_stages_trl_config(tmp_path, tiny_llama, pref_files):
    train, _ = pref_files
    with pytest.raises(FinetuneError, match=r"unknown key 'train.bta'; did you mean 'train.beta'\?"):
        _recipe(tmp_path, tiny_llama, train, "dpo", train={"bta": 0.1})
    with pytest.raises(FinetuneError, match=r"unknown key 'train.num_generations'"):
        _recipe(tmp_path, tiny_llama, train, "dpo", train={"num_generations": 4})  # a GRPO key, not DPO's


# ----------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("stage", ["reward", "dpo", "kto", "grpo", "rloo"])
def test_every_stage_runs_two_steps_under_two_process_accelerate(tmp_path, tiny_llama, stage):
    import os

    import yaml

    pairs = _pairs(16)
    files = {"reward": pairs, "dpo": pairs, "kto": [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "label": bool(i % 2)}
        for i, p in enumerate(pairs)]}
    rows = files.get(stage) or [{"messages": [*p["prompt"], *p["chosen"]]} for p in pairs]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = {"model": {"name": str(tiny_llama)}, "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"datasets": [str(data)], "max_length": 128, "cache_dir": str(tmp_path / "cache")},
              "train": {"stage": stage, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
              "output_dir": str(tmp_path / "run")}
    if stage in ("grpo", "rloo"):
        recipe["rewards"] = [{"function": "exact_match"}]
        recipe["train"].update({"num_generations": 4, "max_completion_length": 6, "beta": 0.04})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_ddp.yaml"), "-m", "finetune", "train", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "completed" and run["stage"] == stage
    assert [p["steps"] for p in run["processes"]] == [2, 2]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage, config, field", [
    ("dpo", "DPOConfig", '"chosen"'), ("reward", "RewardConfig", '"rejected"'),
    ("kto", "KTOConfig", '"label"'), ("grpo", "GRPOConfig", '"reference"'),
])
def test_validate_builds_the_stage_the_recipe_names(tmp_path, tiny_llama, pref_files, capsys, stage, config, field):
    from finetune.validate import main as validate

    train, heldout = pref_files
    extra = {}
    if stage == "kto":
        rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in _pairs(32)]
        train = heldout = write_jsonl(tmp_path / "kto.jsonl", rows)
    if stage == "grpo":
        train = heldout = _prompt_file(tmp_path, GOOD, 12)
        extra = {"rewards": [{"function": "exact_match"}], "train": {"num_generations": 4}}
    shown = validate(_recipe(tmp_path, tiny_llama, train, stage, heldout, **extra))
    assert field in shown["example"]
    assert f"TRL config {config}" in capsys.readouterr().out
    assert shown["stats"]["train_rows"] in (12, 32) and shown["stats"]["eval_rows"] in (12, 32)
    assert not (tmp_path / "run").exists()
