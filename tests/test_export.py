"""Export on tiny models: the merged folder reloads with plain transformers and matches the adapter model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import CONVERSATIONS, assert_no_local_paths, build_tiny, front_matter, tiny_recipe, write_jsonl
from safetensors.torch import load_file, save_file

from finetune import export
from finetune.errors import FinetuneError
from finetune.stages import sft

LONG = {"max_steps": 12, "learning_rate": 3e-2}


def _train(tmp_path, model_dir, data, **sections):
    sections.setdefault("train", LONG)
    return sft.main(tiny_recipe(tmp_path, model_dir, data, **sections))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, chats):
    return _train(tmp_path_factory.mktemp("lora"), tiny_llama, chats)


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, lora_run):
    """One merged export of lora_run, read (or copied) by the tests that need a finished export."""
    out = tmp_path_factory.mktemp("hub") / "export"
    return out, export.main(lora_run, out=out, stop_check=False)


def _folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bits", [None, 4])
def test_merged_export_reloads_and_matches_the_adapter_model(tmp_path, tiny_qwen2, chats, bits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = _train(tmp_path, tiny_qwen2, chats, quantization={"bits": bits})
    report = export.main(run_dir, stop_check=False)
    out = run_dir / "export"
    assert report["gate"] == "passed"
    merged, base = report["merged_vs_adapter"], report["base_vs_adapter"]
    assert merged["greedy_agreement"] >= 0.995 and merged["mean_kl"] <= 1e-3
    # The adapter changed the model far more than the merge noise.
    assert base["mean_kl"] > 100 * max(merged["mean_kl"], 1e-9)
    assert report["merge_base"] == ("dequantized" if bits else "original")
    assert json.loads((out / "export_report.json").read_text())["gate"] == "passed"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "recipe.yaml", "export_report.json"} <= names
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "{% generation %}" not in tokenizer.chat_template
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_an_export_that_drops_the_adapter_fails_the_gate_and_publishes_nothing(tmp_path, lora_run, tiny_llama):
    def write_base_weights_instead(folder):
        # The merged weights are replaced by the base model's: the adapter is lost in the export.
        save_file(load_file(tiny_llama / "model.safetensors"), folder / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "dropped"
    with pytest.raises(FinetuneError, match="failed the faithful-merge gate: greedy agreement .*Nothing was written"):
        export.main(lora_run, out=out, stop_check=False, _after_write=write_base_weights_instead)
    assert not out.exists() and not list(tmp_path.glob(".dropped*"))


def test_an_adapter_that_changes_nothing_fails_the_gate(tmp_path, tiny_llama, chats):
    run_dir = _train(tmp_path, tiny_llama, chats, train={"max_steps": 1, "learning_rate": 1e-12})
    with pytest.raises(FinetuneError, match="the adapter was lost or changes nothing"):
        export.main(run_dir, out=tmp_path / "x", stop_check=False)


def test_llama3_end_of_turn_token_is_in_generation_config(tmp_path, smol_tokenizer, chats):
    """Llama-3 style: EOS is <|end_of_text|>, a turn ends with <|eot_id|>; both must stop generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]})
    tok.eos_token, tok.bos_token, tok.pad_token = "<|end_of_text|>", "<|begin_of_text|>", "<|end_of_text|>"
    from finetune.templates import load_family

    tok.chat_template = load_family("llama3")[0]
    model_dir = build_tiny("llama", tok, tmp_path / "tiny-llama3")
    run_dir = _train(tmp_path, model_dir, chats)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["chat_template"] == {"family": "llama3", "added_tokens": [], "end_of_turn": "<|eot_id|>"}
    export.main(run_dir, stop_check=False)
    gen = json.loads((run_dir / "export" / "generation_config.json").read_text())
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert eot != eos and {eot, eos} <= set(gen["eos_token_id"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tiny llama ties head and embeddings; tiny qwen2 does not
def test_trained_head_rows_survive_reload_tied_or_not(request, tmp_path, chats, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    run_dir = _train(tmp_path, model_dir, chats, adapter={"r": 4, "alpha": 8, "dropout": 0.0,
                                                          "modules_to_save": ["lm_head"]})
    export.main(run_dir, dtype="fp32", stop_check=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, trained.lm_head.weight)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not torch.equal(reloaded.lm_head.weight, original.lm_head.weight)  # the head really was trained
    # Embeddings are the base's: a tied config would have replaced the trained head by them.
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_a_failed_or_killed_export_leaves_the_previous_export_intact(tmp_path, lora_run, lora_export):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(lora_export[0], out)  # a previous export of the run
    before = _folder_digest(out)

    def crash(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export.main(lora_run, out=out, stop_check=False, _after_write=crash)
    assert _folder_digest(out) == before

    # A real SIGKILL half-way: the target keeps the previous export, nothing partial under its name.
    script = (
        "import os, signal, sys; from pathlib import Path; from finetune import export\n"
        f"export.main(Path({str(lora_run)!r}), out=Path({str(out)!r}), stop_check=False,\n"
        "            _after_write=lambda d: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9
    assert _folder_digest(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("export")] == ["export"]
    export.main(lora_run, out=out, stop_check=False)  # the next export clears the dead one's leftovers
    assert not list(tmp_path.glob(".export.partial-*"))


def test_corrupted_adapter_gives_a_clear_error(tmp_path, lora_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FinetuneError, match=r"adapter: the adapter is corrupted .*re-run training or restore it"):
        export.main(run_dir, stop_check=False)


def test_adapter_only_export_names_a_loadable_base(tmp_path, lora_run, tiny_llama, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    export.main(lora_run, out=tmp_path / "adapter-only", adapter_only=True)
    config = json.loads((tmp_path / "adapter-only" / "adapter_config.json").read_text())
    # A local base without a hub id is named by its folder's name: it loads from the folder that holds it.
    assert config["base_model_name_or_path"] == tiny_llama.name
    monkeypatch.chdir(tiny_llama.parent)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter-only")
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert (tmp_path / "adapter-only" / "tokenizer.json").is_file()


def test_export_never_replaces_something_that_is_not_an_export(tmp_path, lora_run):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    with pytest.raises(FinetuneError, match="already exists and is not a previous export"):
        export.main(lora_run, out=precious, adapter_only=True)
    assert (precious / "thesis.txt").read_text() == "my thesis"
    with pytest.raises(FinetuneError, match="is the run directory or holds it"):
        export.main(lora_run, out=lora_run, adapter_only=True)
    assert (lora_run / "run.json").is_file()


# ----------------------------------------------------------------------------- hub-ready


def test_a_merged_export_is_hub_ready_and_names_no_local_path(tmp_path_factory, lora_export, tiny_llama):
    import yaml

    out, report = lora_export
    meta = front_matter(out / "README.md")
    # The tiny base is a local folder with no hub id and no card: no base_model key, license unknown.
    assert meta == {"library_name": "transformers", "license": "unknown", "pipeline_tag": "text-generation",
                    "tags": ["finetune", "sft", "lora"]}
    assert_no_local_paths(out, tmp_path_factory.getbasetemp())
    # Local paths are written by their last name.
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["name"] == tiny_llama.name and recipe["output_dir"] == "run"
    assert recipe["data"]["datasets"][0]["name"] == "chats.jsonl"
    assert report["base_model"] == {"name": tiny_llama.name, "hub_id": None}
    assert json.loads((out / "export_report.json").read_text())["run_dir"] == "run"
    assert 'from_pretrained("export")' in (out / "README.md").read_text()


def test_an_embedded_base_is_named_by_hub_id_with_the_weights_it_was_trained_on(tmp_path_factory, tmp_path,
                                                                                  lora_run, lora_export, smol_path,
                                                                                  monkeypatch, capsys):
    """A run on the embedded SmolLM2 (its run.json, on the tiny run's adapter): the cards name the hub id and say the
    weights were the GGUF-dequantized ones; the adapter names them as embedded:...; no secret is written."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    secret = "hf_TestSecretValue0123456789"
    run["base_model"] = {"name": "embedded:smollm2-135m", "path": smol_path,
                         "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    run["recipe"]["model"]["revision"] = secret  # a value that must never be published
    (run_dir / "run.json").write_text(json.dumps(run))
    monkeypatch.setenv("HF_TOKEN", secret)

    out = tmp_path / "adapter"
    export.main(run_dir, out=out, adapter_only=True)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:smollm2-135m"
    meta = front_matter(out / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    card = (out / "README.md").read_text()
    assert "Quantized from HuggingFaceTB/SmolLM2-135M-Instruct: trained on the GGUF-dequantized weights" in card
    assert_no_local_paths(out, tmp_path_factory.getbasetemp(), smol_path, secret)
    assert secret not in capsys.readouterr().out

    # The merged card of the same run: the same base and note, and --license replaces the base's.
    report = {**json.loads((lora_export[0] / "export_report.json").read_text()),
              "base_model": export._published_base(run)}
    assert report["base_model"]["weights"].startswith("dequantized from SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / "README.md").write_text(export._model_card(run, report, "alice/smol-chat", "mit"))
    meta = front_matter(tmp_path / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "mit"
    assert meta["library_name"] == "transformers"
    card = (tmp_path / "README.md").read_text()
    assert "trained on the GGUF-dequantized weights" in card and 'from_pretrained("alice/smol-chat")' in card


def test_hub_datasets_and_portable_names():
    run = {"recipe": {"data": {"datasets": [{"name": "tinystories"}, {"name": "json_extract"}]}}}
    assert export._hub_datasets(run) == ["roneneldan/TinyStories"]  # json_extract is local files: no hub id
    assert export._portable(["/tmp/a/b.jsonl", "~/data/c", "../../d", "runs/demo", "/no_think", "embedded:x"]) == [
        "b.jsonl", "c", "d", "runs/demo", "/no_think", "embedded:x"]


def test_a_bad_license_is_refused_before_anything_is_exported(tmp_path, lora_run):
    with pytest.raises(FinetuneError, match="--license 'Apache 2' is not a hub license id"):
        export.export(lora_run, out=tmp_path / "export", license="Apache 2")
    assert not (tmp_path / "export").exists()


def test_push_is_checked_before_anything_is_exported(tmp_path, lora_run, monkeypatch, capsys):
    from finetune import cli

    out = tmp_path / "export"
    for repo in ["not a repo", "a/b/c", "name-without-owner", "alice/bad--name"]:
        with pytest.raises(FinetuneError, match=rf"--push '{repo}' is not a Hugging Face Hub repo id"):
            export.export(lora_run, out=out, push=repo)
    assert cli.main(["export", str(lora_run), "--out", str(out), "--push", "not a repo"]) == 2
    assert "--push 'not a repo' is not a Hugging Face Hub repo id" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError, match="--push alice/chat: uploading needs network, and HF_HUB_OFFLINE"):
        export.export(lora_run, out=out, push="alice/chat")
    # With network allowed but no token anywhere, the push is refused before exporting.
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(FinetuneError, match="--push alice/chat: no Hugging Face token; set HF_TOKEN"):
        export.export(lora_run, out=out, push="alice/chat")
    assert not out.exists()
