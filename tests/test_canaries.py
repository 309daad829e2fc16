"""Canaries: each test plants a payload whose side effect must never happen (a marker file appears, a secret is
written or printed), shows in the same test that the payload is live (plain `pickle`/`torch.load(weights_only=False)`,
plain jinja2, transformers with trust_remote_code, the recipe as it was before redaction), then hands it to finetune
and checks that the side effect did not happen and that the refusal is one line naming the file or key."""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import shutil

import pytest
import torch
import yaml
from conftest import CONVERSATIONS, tiny_recipe, write_jsonl

from finetune import cli, trust
from finetune.errors import FinetuneError
from finetune.stages import sft

SHA = "0123456789abcdef0123456789abcdef01234567"


class Payload:
    """Unpickling this creates the marker file: code run by a load."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant_torch_pickle(path, marker) -> None:
    """A torch.save file whose load creates `marker`; the positive control loads it as plain torch.load would."""
    torch.save({"state": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "positive control: the payload fires through torch.load(weights_only=False)"
    marker.unlink()


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines of the verb, then the error
    assert lines and lines[-1].startswith("finetune: error: "), lines[-3:]
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A completed 2-step run with one checkpoint (checkpoint-2), and the recipe that trained it."""
    tmp = tmp_path_factory.mktemp("canary-run")
    data = write_jsonl(tmp / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    sections = dict(train={"max_steps": 2, "save_steps": 2})
    sft.main(tiny_recipe(tmp, tiny_llama, data, **sections))
    return tmp, data, sections


def _copy_run(trained, dest):
    shutil.copytree(trained[0] / "run", dest)
    return dest


# ----------------------------------------------------------------------------- files finetune itself reads


def test_recipe_and_dataset_yaml_with_a_python_tag_are_refused_not_run(tmp_path, tiny_llama):
    from finetune.data import load_spec
    from finetune.recipe import load_recipe

    marker = tmp_path / "marker"
    tag = f"!!python/object/apply:os.mkdir [{str(marker)!r}]"
    recipe, spec = tmp_path / "recipe.yaml", tmp_path / "data.yaml"
    recipe.write_text(f"model:\n  name: {tag}\noutput_dir: {tmp_path / 'run'}\n")
    spec.write_text(f"files:\n  train: {tag}\n")
    for path in (recipe, spec):
        yaml.unsafe_load(path.read_text())
        assert marker.is_dir(), "positive control: the tag runs through yaml.unsafe_load"
        marker.rmdir()
    with pytest.raises(FinetuneError, match=r"recipe.yaml: not valid YAML"):
        load_recipe(recipe)
    with pytest.raises(FinetuneError, match=r"data.yaml: not valid YAML"):
        load_spec(str(spec))
    assert not marker.exists()


def test_pickled_adapter_is_refused_by_export_compare_chat_init_from_and_reward_loading(trained, tiny_llama, tmp_path,
                                                                                        capsys):
    from finetune import rewards
    from finetune.generate import load_for_inference

    run = _copy_run(trained, tmp_path / "run")
    marker = tmp_path / "marker"
    (run / "adapter" / "adapter_model.safetensors").unlink()  # peft would now fall back to the .bin
    _plant_torch_pickle(run / "adapter" / "adapter_model.bin", marker)

    err = _one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "export")])
    assert "adapter/adapter_model.bin: the run's adapter is a pickle" in err and "safetensors only" in err
    for spec in (run, run / "adapter"):  # compare, chat and eval load through load_for_inference
        with pytest.raises(FinetuneError, match=r"adapter_model.bin: the adapter is a pickle"):
            load_for_inference(str(spec))
    _, data, sections = trained
    with pytest.raises(FinetuneError, match=r"adapter_model.bin: the model.init_from adapter is a pickle"):
        sft.main(tiny_recipe(tmp_path, tiny_llama, data, model={"init_from": str(run)},
                             output_dir=str(tmp_path / "continued"), **sections))
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "stage": "reward"}))
    with pytest.raises(FinetuneError, match=r"adapter_model.bin: the reward model's adapter is a pickle"):
        rewards.load_reward_model(str(run))
    assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "continued").exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.bin"])
def test_resume_refuses_a_checkpoint_whose_pickles_would_run_code(trained, tiny_llama, name):
    tmp, data, sections = trained
    checkpoint = tmp / "run" / "checkpoints" / "checkpoint-2"
    trust.check_checkpoint(checkpoint)  # the checkpoint as training wrote it passes
    marker = tmp / f"marker-{name}"
    keep = tmp / "kept"
    shutil.copytree(checkpoint, keep)
    record = (tmp / "run" / "run.json").read_text()
    try:
        if name == "adapter_model.bin":
            (checkpoint / "adapter_model.safetensors").unlink()  # the Trainer would load the .bin instead
        _plant_torch_pickle(checkpoint / name, marker)
        resume = {**sections, "train": {**sections["train"], "resume": True}}
        with pytest.raises(FinetuneError, match=rf"train.resume: \S+/checkpoint-2/{name} "):
            sft.main(tiny_recipe(tmp, tiny_llama, data, **resume))
        assert not marker.exists()
        assert (tmp / "run" / "run.json").read_text() == record  # refused before the run directory is touched
    finally:
        shutil.rmtree(checkpoint)
        keep.rename(checkpoint)


def test_sharded_checkpoint_metadata_is_checked_without_unpickling(tmp_path):
    """torch.distributed.checkpoint reads an FSDP checkpoint's .metadata with a plain pickle.load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = tmp_path / "checkpoint-4"
    shards = checkpoint / "pytorch_model_fsdp_0"
    dcp.save({"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, checkpoint_id=str(shards))
    trust.check_checkpoint(checkpoint)  # as torch writes it: passes
    marker = tmp_path / "marker"
    (shards / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with contextlib.suppress(Exception):
        FileSystemReader(str(shards)).read_metadata()
    assert marker.exists(), "positive control: torch's own reader runs the payload"
    marker.unlink()
    with pytest.raises(FinetuneError, match=r"pytorch_model_fsdp_0/.metadata names code to run when loaded "
                                            r"\(pathlib.Path.touch\)"):
        trust.check_checkpoint(checkpoint)
    assert not marker.exists()


# ----------------------------------------------------------------------------- chat templates


def test_chat_template_escape_fails_inside_the_sandbox(tmp_path, tiny_llama, capsys):
    import jinja2

    from finetune.generate import generate, load_for_inference

    marker = tmp_path / "marker"
    payload = f"{{{{ lipsum.__globals__['os'].mkdir({str(marker)!r}) }}}}{{% for m in messages %}}{{{{ m.content }}}}" \
              "{% endfor %}"
    jinja2.Environment().from_string(payload).render(messages=[])
    assert marker.is_dir(), "positive control: plain jinja2 runs the escape"
    marker.rmdir()

    template = tmp_path / "evil.jinja"
    template.write_text(payload)
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_llama)}, "output_dir": str(tmp_path / "run"),
                                      "data": {"datasets": [str(data)], "chat_template": str(template),
                                               "cache_dir": str(tmp_path / "cache")}}))
    err = _one_line_error(capsys, ["validate", str(recipe)])
    assert "__globals__" in err and "unsafe" in err, err

    folder = tmp_path / "templated-model"  # a model whose own template is the payload
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").write_text(payload)
    loaded = load_for_inference(str(folder), dtype="fp32")
    with pytest.raises(jinja2.exceptions.SecurityError, match="__globals__"):
        generate(loaded, [[{"role": "user", "content": "hi"}]], max_new_tokens=1)
    assert not marker.exists()


# ----------------------------------------------------------------------------- a model's own Python code


def _model_with_code(tiny_llama, folder, marker, ref="evil.EvilLlama"):
    """The tiny llama with auto_map naming evil.py, whose import and model class create the marker (transformers
    runs a module once per process, then reuses it)."""
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": ref}}))
    (folder / "evil.py").write_text(f"import pathlib\n\nfrom transformers import LlamaForCausalLM\n\n"
                                    f"pathlib.Path({str(marker)!r}).touch()\n\n\n"
                                    "class EvilLlama(LlamaForCausalLM):\n"
                                    "    def __init__(self, config):\n"
                                    f"        pathlib.Path({str(marker)!r}).touch()\n"
                                    "        super().__init__(config)\n")
    return folder


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies a model's code under HF_MODULES_CACHE before running it: here, not under ~/.cache."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_auto_map_is_refused_without_trust_remote_code(tmp_path, tiny_llama, capsys, modules_cache):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from finetune.generate import load_for_inference

    marker = tmp_path / "marker"
    folder = _model_with_code(tiny_llama, tmp_path / "coded-model", marker)
    # What transformers does without the flag: a known model_type loads natively, auto_map silently ignored.
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is LlamaForCausalLM and not marker.exists()
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert marker.exists(), "positive control: the code runs with trust_remote_code"
    marker.unlink()

    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(folder)}, "output_dir": str(tmp_path / "run"),
                                      "data": {"datasets": [str(data)], "cache_dir": str(tmp_path / "cache")}}))
    err = _one_line_error(capsys, ["train", str(recipe)])
    assert f"{folder}/config.json: auto_map names Python code shipped with the model (evil.EvilLlama)" in err
    assert "model.trust_remote_code: true" in err
    for argv in (["chat", str(folder)], ["eval", str(folder), "--data", str(data)]):
        assert "auto_map names Python code" in _one_line_error(capsys, argv)
    # With the flag: code from another hub repo (repo--module) needs a pinned code_revision; a hub model both pins.
    elsewhere = _model_with_code(tiny_llama, tmp_path / "elsewhere", marker, "someone/repo--evil.EvilLlama")
    with pytest.raises(FinetuneError, match=r"auto_map takes code from another hub repo \(someone/repo--evil.EvilLlama"
                                            r"\).*set model.code_revision"):
        trust.check_model_code(str(elsewhere), True)
    with pytest.raises(FinetuneError, match=r"'someone/model' with model.trust_remote_code: true .* pin it "
                                            r"\(model.revision = None, model.code_revision = 'main'\)"):
        trust.check_model_code("someone/model", True, revision=None, code_revision="main")
    assert trust.check_model_code("someone/model", True, SHA, SHA) is None
    with pytest.raises(FinetuneError, match="--trust-remote-code runs a hub model's code only at a pinned commit"):
        load_for_inference("someone/model", trust_remote_code=True)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_trusted_code_runs_only_as_hashed_and_a_copied_run_json_cannot_switch_it_on(trained, tmp_path, tiny_llama,
                                                                                   modules_cache):
    from finetune import export
    from finetune.generate import load_for_inference

    marker = tmp_path / "marker"
    folder = _model_with_code(tiny_llama, tmp_path / "coded-model", marker)
    _, data, sections = trained
    run = sft.main(tiny_recipe(tmp_path, folder, data, model={"name": str(folder), "trust_remote_code": True},
                               **sections))
    assert marker.exists(), "positive control: a recipe that trusts the code runs it"
    marker.unlink()
    recorded = json.loads((run / "run.json").read_text())["base_model"]["code_sha256"]
    assert recorded == trust.code_sha256(folder)

    # export/compare/chat of that run need --trust-remote-code; run.json alone does not switch it on.
    with pytest.raises(FinetuneError, match=r"run.json: the run was trained with model.trust_remote_code: true .* "
                                            "pass --trust-remote-code"):
        export.main(run, out=tmp_path / "export")
    with pytest.raises(FinetuneError, match="pass --trust-remote-code"):
        load_for_inference(str(run))
    # A run.json copied from elsewhere that says trust_remote_code, on a base with code: the same refusal.
    copied = _copy_run(trained, tmp_path / "copied")
    record = json.loads((copied / "run.json").read_text())
    record["recipe"]["model"]["trust_remote_code"] = True
    record["base_model"].update(path=str(folder), name=str(folder))
    (copied / "run.json").write_text(json.dumps(record))
    with pytest.raises(FinetuneError, match="pass --trust-remote-code"):
        load_for_inference(str(copied))
    with pytest.raises(FinetuneError, match=r"base_model.code_sha256 is missing"):
        load_for_inference(str(copied), trust_remote_code=True)
    # With the flag, the code runs only while it hashes as recorded.
    loaded = load_for_inference(str(run), trust_remote_code=True)
    assert type(loaded.model.get_base_model()).__name__ == "EvilLlama"
    assert marker.exists(), "the run's code, unchanged and trusted twice (recipe and flag), runs"
    marker.unlink()
    with open(folder / "evil.py", "a") as f:
        f.write("# changed after training\n")
    with pytest.raises(FinetuneError, match=rf"{folder}: its Python code changed since the run was trained .*records "
                                            rf"{recorded}"):
        load_for_inference(str(run), trust_remote_code=True)
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- secrets


CANARIES = {
    "HF_TOKEN": "hf_CanaryHubToken0123456789",
    "WANDB_API_KEY": "wandbCanaryKey0123456789abcdef",
    "ACME_SERVICE_TOKEN": "acmeCanaryServiceToken42",
    "DB_PASSWORD": "dbCanaryPassw0rd!42",
    "PAYMENTS_SECRET": "paymentsCanarySecret42",
    "STORAGE_KEY": "storageCanaryKey42xyz",
}
URL_PASSWORD, URL_QUERY_TOKEN, ENV_URL_PASSWORD = "urlCanaryPassword42", "urlCanaryQueryToken42", "envUrlCanaryPw42"


def test_no_secret_reaches_a_file_of_the_run_or_the_export_or_a_log_line(tmp_path, tiny_llama, monkeypatch, capfd):
    from finetune.recipe import load_recipe
    from finetune.rundir import secret_values

    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{ENV_URL_PASSWORD}@mlflow.example.com")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a name that says TOKEN with a value that is not one
    secrets = [*CANARIES.values(), URL_PASSWORD, URL_QUERY_TOKEN, ENV_URL_PASSWORD]
    # Pasted where a user might: the tracker's run name, a hub id as a URL with credentials.
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "alpha": 8},
        "data": {"datasets": [str(data)], "max_length": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1, "report_to": "tensorboard",
                  "run_name": "-".join([*CANARIES.values(), ENV_URL_PASSWORD]),
                  "hub_model_id": f"https://alice:{URL_PASSWORD}@hub.example.com/org/m?token={URL_QUERY_TOKEN}"},
    }))
    # Positive control: every canary is in the resolved recipe, which train prints and run.json records.
    resolved = yaml.safe_dump(load_recipe(recipe).to_dict())
    assert all(s in resolved for s in secrets)

    assert cli.main(["train", str(recipe)]) == 0
    assert cli.main(["export", str(tmp_path / "run"), "--skip-stop-check"]) == 0
    bad_data = f"https://alice:{URL_PASSWORD}@data.example.com/chats.jsonl?token={URL_QUERY_TOKEN}"
    assert cli.main(["validate", str(recipe), f"data.datasets=[{bad_data}]"]) == 2
    out, err = capfd.readouterr()
    assert "Resolved recipe:" in out and "run_name: " in out and "finetune: error: " in err
    for s in secrets:
        assert s not in out and s not in err, s
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.pt" for p in files) and any("export" in p.parts for p in files)
    assert any("tensorboard" in p.parts for p in files)
    for path in files:
        blob = path.read_bytes()
        assert not [s for s in secrets if s.encode() in blob], path
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["recipe"]["train"]["hub_model_id"] == "https://<redacted>@hub.example.com/org/m?token=<redacted>"
    assert "false" not in secret_values()  # TOKENIZERS_PARALLELISM's value is not taken for a secret
