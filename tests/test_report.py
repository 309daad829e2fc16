"""Tests for finetune.report: escaping, file contents and atomic writes."""

import base64
import html
import json

import pytest

import finetune.files
from finetune.metrics import summarize
from finetune.report import format_table, write_report

MODELS = [
    {"name": "base", "source": "org/base-model", "description": "Base model <pretrained>"},
    {"name": "chat", "source": "runs/lora", "description": "Base + LoRA adapter & chat template"},
]

PROMPTS = [
    {"prompt": "Say <script>alert('p')</script> & stop", "reference": "a & b"},
    {"prompt": "What is 2 + 2?", "reference": None},
    {"prompt": 'Quote "this" & <that>', "reference": "4"},
]

OUTPUTS = {
    "base": [
        {"text": "<script>alert(1)</script>", "token_ids": [1, 2, 3], "stopped": False},
        {"text": "2 + 2 = 4 & more", "token_ids": [4, 5, 6, 7], "stopped": True},
        {"text": "```python\nprint('<b>')\n```", "token_ids": [8] * 6, "stopped": False},
    ],
    "chat": [
        {"text": "a & b", "token_ids": [1], "stopped": True},
        {"text": "It is <b>4</b>.", "token_ids": [2, 3], "stopped": True},
        {"text": "4", "token_ids": [9], "stopped": True},
    ],
}

SETTINGS = {"max_new_tokens": 64, "temperature": 0.0, "stop": "<|im_end|>"}


def _metrics():
    refs = [p["reference"] for p in PROMPTS]
    return {name: summarize(outs, references=refs) for name, outs in OUTPUTS.items()}


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "report"  # does not exist yet: write_report creates it
    metrics = _metrics()
    paths = write_report(out, MODELS, PROMPTS, OUTPUTS, metrics, SETTINGS)
    return out, paths, metrics


def test_returns_paths_of_the_three_files(written):
    out, paths, _ = written
    assert paths == {
        "md": out / "report.md",
        "html": out / "report.html",
        "jsonl": out / "results.jsonl",
    }
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md", "results.jsonl"]


def test_html_escapes_every_prompt_reference_and_output(written):
    _, paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    for p in PROMPTS:
        assert html.escape(p["prompt"]) in page
        if p["reference"]:
            assert html.escape(p["reference"]) in page
    for outs in OUTPUTS.values():
        for o in outs:
            assert html.escape(o["text"]) in page
    for m in MODELS:
        assert html.escape(m["description"]) in page
    # Nothing from the data reaches the page unescaped.
    assert "<script" not in page.lower()
    assert "<b>" not in page
    assert "<pretrained>" not in page
    assert "& b" not in page  # the "&" of "a & b" is escaped as "&amp;"


def test_html_is_self_contained_with_chart(written):
    _, paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    assert "<style>" in page
    assert "<link" not in page  # no external stylesheet
    marker = 'src="data:image/png;base64,'
    assert marker in page
    encoded = page.split(marker, 1)[1].split('"', 1)[0]
    assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    for key, value in SETTINGS.items():
        assert html.escape(key) in page and html.escape(str(value)) in page


def test_results_jsonl_has_one_line_per_prompt_per_model(written):
    _, paths, _ = written
    lines = paths["jsonl"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(PROMPTS) * len(MODELS)  # 3 * 2 = 6
    rows = [json.loads(line) for line in lines]
    assert [(r["prompt_index"], r["model"]) for r in rows] == [
        (0, "base"), (0, "chat"), (1, "base"), (1, "chat"), (2, "base"), (2, "chat"),
    ]  # fmt: skip
    first = rows[0]
    assert first["prompt"] == PROMPTS[0]["prompt"]
    assert first["reference"] == "a & b"
    assert first["text"] == "<script>alert(1)</script>"
    assert first["n_tokens"] == 3 and first["stopped"] is False
    # Per-row scores only where a reference exists (prompt 1 has none).
    assert rows[1]["exact_match"] == 1.0  # "a & b" == "a & b"
    assert rows[1]["token_f1"] == 1.0
    assert "exact_match" not in rows[2] and "token_f1" not in rows[2] and "rouge_l" not in rows[2]
    # chat on prompt 2: "4" vs "4" -> all three scores 1.
    assert rows[5]["exact_match"] == rows[5]["token_f1"] == rows[5]["rouge_l"] == 1.0


def test_markdown_contains_settings_models_table_and_outputs(written):
    _, paths, metrics = written
    md = paths["md"].read_text(encoding="utf-8")
    assert format_table(metrics) in md
    assert "max_new_tokens" in md
    for m in MODELS:
        assert m["name"] in md and m["source"] in md
    for outs in OUTPUTS.values():
        for o in outs:
            assert o["text"] in md
    # The output that contains a ``` fence is wrapped in a longer fence.
    assert "````\n```python" in md


def _cells(line):
    """Split a markdown table line into stripped cells."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_format_table_values():
    metrics = {
        "base": {"n": 3, "stop_rate": 1 / 3, "mean_length": 6.0},
        "chat": {"n": 3, "stop_rate": 1.0, "mean_length": 2.5, "adherence": 0.5},
    }
    lines = format_table(metrics).splitlines()
    assert len(lines) == 2 + 4  # header, rule, then n / stop_rate / mean_length / adherence
    assert len({len(line) for line in lines}) == 1  # padded: columns line up
    assert _cells(lines[0]) == ["Metric", "Better", "base", "chat"]
    rows = [_cells(line) for line in lines[2:]]
    assert rows == [
        ["Prompts", "", "3", "3"],
        ["Stopped (EOS)", "higher", "33.3%", "100.0%"],  # 1/3 and 1 as percentages
        ["Mean length (tokens)", "", "6.0", "2.5"],
        ["Format adherence", "higher", "-", "50.0%"],  # missing for base
    ]


def test_mismatched_outputs_raise(tmp_path):
    bad = {"base": OUTPUTS["base"][:2], "chat": OUTPUTS["chat"]}
    with pytest.raises(ValueError):
        write_report(tmp_path, MODELS, PROMPTS, bad, _metrics(), SETTINGS)
    with pytest.raises(ValueError):
        write_report(tmp_path, MODELS, PROMPTS, {"base": OUTPUTS["base"]}, _metrics(), SETTINGS)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    (tmp_path / "results.jsonl").write_text("old\n", encoding="utf-8")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(finetune.files.os, "replace", fail)
    with pytest.raises(OSError):
        write_report(tmp_path, MODELS, PROMPTS, OUTPUTS, _metrics(), SETTINGS)
    assert (tmp_path / "results.jsonl").read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
