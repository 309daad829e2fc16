"""The Python API: the README's example runs as written, and it leaves the caller's signal handlers alone."""

from __future__ import annotations

import re
import signal

import pytest
from conftest import REPO

import finetune
from finetune.errors import FinetuneError


def _readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_returns_paths_and_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")  # the example names recipes/... from the repository root
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        scope: dict = {}
        exec(compile(_readme_example(), "README.md", "exec"), scope)
        assert signal.getsignal(signal.SIGTERM) is mine  # put back as it was, not reset to the default
    finally:
        signal.signal(signal.SIGTERM, previous)
    base, chat, exported, report = scope["base"], scope["chat"], scope["exported"], scope["report"]
    assert base["run"]["stage"] == "pretrain" and base["summary"]["steps"] == 5
    assert chat["run"]["status"] == "completed" and chat["summary"]["steps"] == 3
    assert (tmp_path / "runs" / "api-chat" / "model" / "config.json").is_file()
    assert exported["gate"] == "passed" and (tmp_path / exported["out"] / "config.json").is_file()
    assert set(report["metrics"]) == {"base", "chat"} and report["metrics"]["chat"]["n"] == 4
    assert report["report"].is_file()
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[1] == "passed" and float(printed[0]) == base["summary"]["eval_perplexity_after"]


def test_export_and_compare_are_the_modules_and_their_functions():
    from finetune import compare, export

    assert finetune.export is export and callable(export) and export.main
    assert finetune.compare is compare and callable(compare)
    with pytest.raises(FinetuneError, match="finetune.compare: argument --decoding: invalid choice"):
        finetune.compare({"a": "embedded:smollm2-135m"}, prompts="json_extract", decoding="nucleus")
    with pytest.raises(FinetuneError, match="unknown key 'train.max_stepz'; did you mean 'train.max_steps'"):
        finetune.train(REPO / "recipes" / "tiny" / "sft.yaml", **{"train.max_stepz": 3})
