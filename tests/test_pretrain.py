"""Pretraining from scratch: packing, document separation, what a micro model learns, the saved folder, resume, and
bad input. The micro model (2 layers, hidden 128, a 512-token BPE, 0.3M parameters) trains on the shipped corpus's
generated stories (1,500 documents, ~190k tokens; 60 held-out documents)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_no_local_paths, front_matter
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.recipe import recipe_from_dict
from finetune.stages import pretrain, runner

MICRO = {"layers": 2, "hidden_size": 128, "intermediate_size": 384, "heads": 4, "kv_heads": 2,
         "max_position_embeddings": 256, "init_std": 0.02}
CORPUS = REPO / "datasets_cfg" / "data" / "scratch_corpus"


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict:
    """The shipped corpus's generated stories (its one-paragraph documents): train and held-out files."""
    folder = tmp_path_factory.mktemp("stories")
    out = {}
    for split, count in (("train", 1500), ("heldout", 60)):
        rows = [line for line in (CORPUS / f"{split}.jsonl").read_text().splitlines()
                if "\n" not in json.loads(line)["text"]][:count]
        out[split] = folder / f"{split}.jsonl"
        out[split].write_text("\n".join(rows) + "\n")
    return out


def micro_recipe(tmp_path, stories, train=None, data=None, **top) -> object:
    return recipe_from_dict({
        "model": {"name": "scratch"},
        "adapter": {"type": "none"},
        "architecture": MICRO,
        "tokenizer": {"vocab_size": 512},
        "data": {"datasets": [str(stories["train"])], "eval_datasets": [str(stories["heldout"])],
                 "max_length": 256, **(data or {})},
        "train": {"stage": "pretrain", "max_steps": 80, "per_device_train_batch_size": 16, "learning_rate": 5e-3,
                  "logging_steps": 5, "save_steps": 1000, **(train or {})},
        "output_dir": str(tmp_path / "run"),
        **top,
    }, "micro.yaml")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, stories):
    return runner.train(micro_recipe(tmp_path_factory.mktemp("micro"), stories))


# ----------------------------------------------------------------------------- packing


def test_packing_keeps_every_token_and_restarts_the_positions_of_a_carried_piece():
    docs = [[5] * 5 + [0], [6] * 9 + [0], [7] * 3 + [0]]  # 6 + 10 + 4 tokens, EOS (0) ending each
    rows = pretrain.pack(docs, max_length=8)
    assert [t for r in rows for t in r["input_ids"]] == [t for d in docs for t in d]  # nothing lost or reordered
    # Doc 1, then the head of doc 2; doc 2's tail carried on (positions from 0 again); doc 3.
    assert rows == [
        {"input_ids": [5, 5, 5, 5, 5, 0, 6, 6], "position_ids": [0, 1, 2, 3, 4, 5, 0, 1]},
        {"input_ids": [6, 6, 6, 6, 6, 6, 6, 0], "position_ids": [0, 1, 2, 3, 4, 5, 6, 7]},
        {"input_ids": [7, 7, 7, 0], "position_ids": [0, 1, 2, 3]},
    ]
    batch = pretrain.PackedCollator(pad_token_id=1)(rows)
    assert batch["input_ids"][2].tolist() == [7, 7, 7, 0, 1, 1, 1, 1]
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # padding: a piece of its own
    # No label at the first token of a piece (nothing predicts across a boundary) nor at padding.
    assert batch["labels"].tolist() == [
        [-100, 5, 5, 5, 5, 0, -100, 6],
        [-100, 6, 6, 6, 6, 6, 6, 0],
        [-100, 7, 7, 0, -100, -100, -100, -100],
    ]
    assert "attention_mask" not in batch


def test_a_packed_row_gives_each_document_the_logits_it_has_alone(tmp_path, stories):
    from finetune import scratch

    recipe = micro_recipe(tmp_path, stories)
    tokenizer = scratch.load_tokenizer(recipe)
    model = scratch.build_model(recipe, tokenizer)
    model.config.use_cache = False  # as the stage trains it: a cache in train mode would hide the pieces
    texts = ["Ada Lovelace lives in Lisbon. She is 34 years old.", "Return the sum of the list.",
             "The quick brown fox jumps over the lazy dog, twice, and then it sleeps in the sun for a while."]
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = len(docs[0]) + len(docs[1]) + len(docs[2]) // 2  # doc 3 does not fit: its tail is carried on
    rows = pretrain.pack(docs, width)
    assert len(rows) == 2 and rows[1]["position_ids"][0] == 0
    batch = pretrain.PackedCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # train mode
        alone = [model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs]
        head = len(docs[0]) + len(docs[1])
        tail = model(input_ids=torch.tensor([docs[2][width - head:]]), use_cache=False).logits[0]
    tolerance = 1e-5  # fp32: the same sums in another order
    assert (packed[0, : len(docs[0])] - alone[0]).abs().max() < tolerance
    assert (packed[0, len(docs[0]) : head] - alone[1]).abs().max() < tolerance  # the second document sees only itself
    assert (packed[0, head:] - alone[2][: width - head]).abs().max() < tolerance  # the head of the carried document
    assert (packed[1, : len(docs[2]) - (width - head)] - tail).abs().max() < tolerance  # its tail, positions from 0
    # Without the position ids the second document would attend to the first: the check above has teeth.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (leaky[0, len(docs[0]) : head] - alone[1]).abs().max() > 1e-3


def test_the_fast_loss_runs_the_head_in_the_mixed_precision_dtype(tmp_path, stories, monkeypatch):
    """Pretraining's weights are fp32, and under bf16 mixed precision accelerate autocasts the model's forward. The
    fast step's loss takes the head's matmul out of that forward (into the chunked loss) and runs it under the same
    autocast: each chunk's logits are computed in bf16, not fp32 (an fp32 head ran ~8x slower on the CPU), and the
    loss and gradients are the model's own loss's through accelerate's forward, at bf16's tolerance."""
    from finetune import fastpath

    trainer = runner.build(micro_recipe(tmp_path, stories, data={"eval_datasets": []})).trainer
    if not trainer.args.bf16:
        pytest.skip("no bf16 mixed precision on this CPU")
    model = trainer.accelerator.prepare_model(trainer.model)  # as Trainer.train prepares it
    wrapped = model.forward
    batch = next(iter(trainer.get_train_dataloader()))
    seen = []
    real = fastpath._ChunkedNLL.apply
    monkeypatch.setattr(fastpath._ChunkedNLL, "apply",
                        lambda x, t, w: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                                    else None) or real(x, t, w))
    monkeypatch.setattr(fastpath, "_kept", {})  # the CPU's chunk buffers: the logits' holds the head's output
    trained = [p for p in model.parameters() if p.requires_grad]
    with fastpath.step_modules(model, None):
        fast = fastpath.trainer_loss(trainer, model, dict(batch))
        assert not torch.is_autocast_enabled("cpu")  # the loss's autocast ends with it
        fast_grads = torch.autograd.grad(fast, trained)
    plain = model(**batch).loss  # accelerate's forward: the head inside it, its logits converted to fp32
    plain_grads = torch.autograd.grad(plain, trained)
    assert seen == [torch.bfloat16] and fastpath._kept["logits"].dtype == torch.bfloat16
    assert model.forward == wrapped
    assert abs(fast.item() - plain.item()) <= 1e-2 * plain.item()
    for mine, theirs in zip(fast_grads, plain_grads):  # bf16 matmuls on both sides, rounded in other orders
        assert (mine - theirs).norm() <= 3e-2 * theirs.norm()


def test_the_loss_buffers_kept_between_steps_are_freed_when_training_ends(tmp_path, stories, monkeypatch):
    from finetune import fastpath

    monkeypatch.setattr(fastpath, "_kept", {})
    uses = []
    real = fastpath._kept_buffer
    monkeypatch.setattr(fastpath, "_kept_buffer", lambda use, *a, **kw: uses.append(use) or real(use, *a, **kw))
    runner.train(micro_recipe(tmp_path, stories, train={"max_steps": 2}, data={"eval_datasets": []}))
    assert {"logits", "logprobs", "weight_grad"} <= set(uses) and fastpath._kept == {}


# ----------------------------------------------------------------------------- a micro run


def test_micro_model_learns_context_beyond_word_frequencies(micro_run):
    run = json.loads((micro_run / "run.json").read_text())
    summary, stats = run["summary"], run["data"]
    assert run["status"] == "completed" and run["stage"] == "pretrain" and summary["steps"] == 80
    assert summary["epochs"] <= 3  # a few passes over its data at most
    assert summary["eval_loss_after"] <= stats["unigram_entropy_eval"] - 0.5, (summary, stats["unigram_entropy_eval"])
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert summary["tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    # Every token of the corpus is in a training row: the documents' tokens (EOS included) are the rows' tokens.
    assert stats["train_tokens"] == sum(d["tokens"] for d in stats["datasets"] if not d.get("held_out"))
    assert stats["trained_tokens"] == stats["train_tokens"] - stats["train_documents"] - stats["carried_pieces"]
    assert run["model"] == "model" and "adapter" not in run


def test_the_saved_model_is_a_plain_hf_folder_that_generates(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = micro_run / "model"
    assert not [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private to its writer
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.use_cache is True and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("Maria lives in", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    # The chat template's special tokens are single tokens; padding is neither EOS nor the end of a turn.
    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    for token in special:
        assert tokenizer.tokenize(token) == [token]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer(text)["input_ids"].count(im_start) == 2 and tokenizer(text)["input_ids"].count(im_end) == 1
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, im_end}) == 3
    assert set(model.generation_config.eos_token_id) == {tokenizer.eos_token_id, im_end}


def test_export_and_inference_accept_a_run_without_adapter(micro_run, tmp_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from finetune import export, generate

    report = export.main(micro_run, out=tmp_path / "export")
    assert report["gate"] == "passed" and report["exported_vs_trained"]["greedy_agreement"] == 1.0
    assert report["dtype"] == "float32"  # trained in fp32 master weights, exported as trained
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    trained = load_file(micro_run / "model" / "model.safetensors")
    assert torch.equal(exported.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert "Base model pretrained from scratch" in (tmp_path / "export" / "README.md").read_text()
    # Hub-ready: no base_model (there is none), the method in the tags, no local path in any file.
    assert front_matter(tmp_path / "export" / "README.md") == {
        "library_name": "transformers", "license": "unknown", "pipeline_tag": "text-generation",
        "tags": ["finetune", "pretrain", "from-scratch"]}
    assert_no_local_paths(tmp_path / "export", tmp_path_factory.getbasetemp())
    loaded = generate.load_for_inference(str(micro_run))
    assert loaded.info["kind"] == "run" and "pretrained from scratch" in loaded.description
    with pytest.raises(FinetuneError, match="no adapter"):
        export.main(micro_run, out=tmp_path / "adapter-export", adapter_only=True)


def test_resume_continues_with_the_same_data_order(tmp_path, stories):
    from transformers import TrainerCallback

    class SigtermAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    settings = {"max_steps": 6, "logging_steps": 1, "learning_rate": 3e-3}
    straight = runner.train(micro_recipe(tmp_path / "a", stories, train=settings))
    with pytest.raises(FinetuneError, match="interrupted by SIGTERM at step 4"):
        pretrain.main(micro_recipe(tmp_path / "b", stories, train=settings), callbacks=[SigtermAtStep3()])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    resumed = runner.train(micro_recipe(tmp_path / "b", stories, train={**settings, "resume": True}))
    # The same batches in the same order: the same loss at every step, and the same weights at the end.
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6) and len(losses(resumed)) == 6
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    ({"architecture": {**MICRO, "hidden_size": 66, "heads": 4}},
     "architecture.hidden_size = 66 is not divisible by architecture.heads = 4"),
    ({"architecture": {**MICRO, "heads": 4, "kv_heads": 3}}, "is not a multiple of architecture.kv_heads = 3"),
    ({"tokenizer": {"vocab_size": 259}}, "tokenizer.vocab_size = 259 is smaller than the 256 byte tokens a "
                                        "byte-level BPE starts from plus its 4 special tokens"),
    ({"architecture": {**MICRO, "hidden_size": 36, "heads": 4, "kv_heads": 4}},
     "head size hidden_size / heads = 9 is odd"),
    ({"architecture": {**MICRO, "max_position_embeddings": 64}},
     "data.max_length = 128 is longer than architecture.max_position_embeddings = 64"),
    ({"architecture": {**MICRO, "init_std": 0}}, "architecture.init_std = 0.0 is invalid: must be >= 1e-06"),
    ({"data": {"datasets": ["scratch_corpus"], "max_length": 128, "packing": False}},
     "data.packing = false: pretraining always packs documents"),
    ({"adapter": {"type": "lora"}}, "a model built from scratch trains every weight"),
    ({"train": {"stage": "sft"}}, "model.name: scratch builds a random model: pretrain it first"),
    ({"model": {"name": "embedded:smollm2-135m"}}, "architecture describes a model built from scratch"),
])
def test_bad_architecture_and_tokenizer_settings_are_refused(tmp_path, change, message):
    base = {"model": {"name": "scratch"}, "adapter": {"type": "none"}, "architecture": MICRO,
            "data": {"datasets": ["scratch_corpus"], "max_length": 128}, "train": {"stage": "pretrain"},
            "output_dir": str(tmp_path / "run")}
    with pytest.raises(FinetuneError, match=message.replace(".", r"\.").replace("(", r"\(")):
        recipe_from_dict({**base, **change}, "bad.yaml")


@pytest.mark.parametrize("content, message", [
    (b"\n  \n<|endoftext|>\n\n", "the corpus is empty"),
    (b"some text\x00\x01\x02 binary", "not a text file \\(it holds NUL bytes"),
    (b"caf\xe9 latin-1 text", "not a text file \\(byte 3 is not UTF-8\\)"),
])
def test_an_empty_or_binary_corpus_is_refused(tmp_path, stories, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    recipe = micro_recipe(tmp_path, stories, data={"datasets": [str(corpus)], "eval_datasets": []})
    with pytest.raises(FinetuneError, match=message):
        runner.train(recipe)
    assert not (tmp_path / "run").exists()


def test_txt_files_are_split_into_documents_at_separator_lines(tmp_path):
    from finetune import data as data_lib

    corpus = tmp_path / "c.txt"
    corpus.write_text("first doc\nline two\n<|endoftext|>\nsecond doc\n<|endoftext|>\n\n")
    spec = data_lib.load_spec(str(corpus))
    rows, _ = data_lib.read_rows(spec, "train")
    assert spec.format == "text" and [r for _, r in rows] == [{"text": "first doc\nline two"}, {"text": "second doc"}]
    assert [n for n, _ in rows] == [1, 4]


def test_the_cli_names_the_bad_corpus_without_a_traceback(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\xff\xfe not text")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name": "scratch"}, "adapter": {"type": "none"}, "architecture": MICRO,
                                  "tokenizer": {"vocab_size": 512},
                                  "data": {"datasets": [str(corpus)], "max_length": 128},
                                  "train": {"stage": "pretrain"}, "output_dir": str(tmp_path / "run")}))
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{corpus}: not a text file (byte 0 is not UTF-8)" in out.stderr


def test_a_reused_tokenizer_gets_its_own_pad_and_the_chat_tokens(tmp_path, stories, smol_path):
    from finetune import scratch

    recipe = micro_recipe(tmp_path, stories, tokenizer={"name": smol_path})
    tokenizer = scratch.load_tokenizer(recipe)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # SmolLM2's EOS is its end-of-turn token: documents are separated by <|endoftext|> (in its vocabulary) instead.
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, im_end) and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.tokenize("<|im_start|>") == ["<|im_start|>"]
    model = scratch.build_model(recipe, tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 49153  # SmolLM2's 49,152 and the pad token


def test_every_shipped_dataset_yaml_parses():
    from finetune import data as data_lib

    for path in sorted((REPO / "datasets_cfg").glob("*.yaml")):
        spec = data_lib.load_spec(path.stem)
        assert spec.license and spec.description, path
    assert data_lib.load_spec("scratch_corpus").format == data_lib.load_spec("tinystories").format == "text"


def test_a_document_that_spells_a_special_token_keeps_it_as_text(tmp_path, stories):
    from finetune import scratch

    corpus = tmp_path / "c.txt"
    corpus.write_text("Write <|endoftext|> or <|im_end|> in a sentence.\n<|endoftext|>\nA second document.\n")
    recipe = micro_recipe(tmp_path, stories, data={"datasets": [str(corpus)], "eval_datasets": []})
    tokenizer = scratch.load_tokenizer(micro_recipe(tmp_path, stories))
    prepared = pretrain.prepare(recipe, tokenizer, None, 42)
    ids = [t for row in prepared.train["input_ids"] for t in row]
    assert prepared.stats["train_documents"] == 2 and ids.count(tokenizer.eos_token_id) == 2  # one per document
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids


def test_a_full_weight_run_is_refused_as_init_from_with_the_folder_to_use(micro_run, tmp_path):
    recipe = recipe_from_dict({"model": {"name": str(micro_run / "model"), "init_from": str(micro_run)},
                               "data": {"datasets": ["json_extract"]}, "output_dir": str(tmp_path / "run")}, "r.yaml")
    with pytest.raises(FinetuneError, match=f"use its model folder {micro_run}/model as model.name instead"):
        runner.train(recipe)


def test_a_file_type_that_is_not_read_is_named(tmp_path):
    from finetune import data as data_lib

    corpus = tmp_path / "notes.md"
    corpus.write_text("# notes")
    with pytest.raises(FinetuneError, match=r"notes.md: files ending .md are not read; .* \(rename a plain-text "
                                            r"corpus to .txt\)"):
        data_lib.load_spec(str(corpus))


def test_continued_pretraining_with_lora_exports_gated_on_documents(tmp_path, tiny_llama, stories):
    from finetune import export

    recipe = recipe_from_dict({
        "model": {"name": str(tiny_llama)}, "adapter": {"type": "lora", "r": 8},
        "data": {"datasets": [{"name": str(stories["train"]), "max_rows": 100}],
                 "eval_datasets": [{"name": str(stories["heldout"]), "max_rows": 10}], "max_length": 128},
        "train": {"stage": "pretrain", "max_steps": 3, "learning_rate": 1e-2}, "output_dir": str(tmp_path / "run"),
    }, "lora-pretrain.yaml")
    run_dir = runner.train(recipe)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and not (run_dir / "model").exists()
    report = export.main(run_dir, out=tmp_path / "export", dtype="fp32")
    assert report["gate"] == "passed" and report["gate_conversations"] == export.GATE_CONVERSATIONS  # documents
    assert report["base_vs_adapter"]["mean_kl"] > report["merged_vs_adapter"]["mean_kl"]
