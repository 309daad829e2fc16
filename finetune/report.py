"""Side-by-side reports for ``finetune compare`` / ``finetune eval``.

:func:`write_report` turns the generations of several models (typically the
base model and the fine-tuned chat model) on the same prompts into three files:

* ``report.md``     -- settings, the models, the metric table, then every
  prompt with every model's output;
* ``report.html``   -- the same, self-contained (inline CSS, the bar chart as
  a base64 PNG), with outputs side by side. Model outputs are untrusted text,
  so every piece of data is passed through :func:`html.escape`;
* ``results.jsonl`` -- one JSON object per prompt per model, for scripting.

Files are written atomically (:func:`finetune.files.write_text`: a temp file
in the same directory, then ``os.replace``) so an interrupted run never leaves
a half-written report.

:func:`format_table` renders the metric table as markdown, which also reads
well in a terminal; the CLI prints it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from finetune.files import write_text
from finetune.metrics import (
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    RATE_METRICS,
    has_reference,
    reference_scores,
)

__all__ = ["write_report", "format_table"]

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RESULTS_JSONL = "results.jsonl"

# Shown in the "Better" column of the table.
_DIRECTION = {True: "higher", False: "lower", None: ""}

# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------


def _format_value(key: str, value: Any) -> str:
    """Format one metric for display: rates as percentages, counts as ints."""
    if value is None:
        return "-"
    if key in RATE_METRICS:
        return f"{100 * value:.1f}%"
    if key == "n":
        return str(int(value))
    if key in ("mean_length", "median_length"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _metric_keys(metrics: dict[str, dict]) -> list[str]:
    """Metric names present for any model: known ones in METRIC_LABELS order,
    then unknown ones in order of first appearance."""
    present: list[str] = []
    for model_metrics in metrics.values():
        for key in model_metrics:
            if key not in present:
                present.append(key)
    known = [k for k in METRIC_LABELS if k in present]
    return known + [k for k in present if k not in METRIC_LABELS]


def format_table(metrics: dict[str, dict]) -> str:
    """Markdown table of ``metrics`` (model name -> summarize() dict).

    Metrics are rows, models are columns; rates are shown as percentages and
    a missing value as ``-``. Cells are padded so the table also lines up
    when printed to a terminal.
    """
    models = list(metrics)
    header = ["Metric", "Better", *models]
    rows = [
        [
            METRIC_LABELS.get(key, key),
            _DIRECTION[HIGHER_IS_BETTER.get(key)],
            *(_format_value(key, metrics[m].get(key)) for m in models),
        ]
        for key in _metric_keys(metrics)
    ]
    # A "|" inside a cell would split it into two columns.
    cells = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        # Text columns left-aligned, value columns right-aligned.
        padded = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * widths[0], "-" * widths[1], *("-" * (w - 1) + ":" for w in widths[2:])]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *map(line, cells[1:])])


def _status(row: dict) -> str:
    """One-line description of an output: length, stop reason, scores."""
    stop = "stopped" if row["stopped"] else "hit max_new_tokens"
    if row["stopped"] and "ended_turn" in row:
        stop = "ended its turn" if row["ended_turn"] else "stopped at end of text"
    unit = "token" if row["n_tokens"] == 1 else "tokens"
    parts = [f"{row['n_tokens']} {unit}, {stop}"]
    if "exact_match" in row:
        parts.append(
            f"exact match {'yes' if row['exact_match'] else 'no'}, "
            f"F1 {_format_value('token_f1', row['token_f1'])}, "
            f"ROUGE-L {_format_value('rouge_l', row['rouge_l'])}"
        )
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# Rows (shared by all three files)
# ---------------------------------------------------------------------------


def _validate(models: list[dict], prompts: list[dict], outputs: dict[str, list]) -> None:
    for model in models:
        name = model["name"]
        if name not in outputs:
            raise ValueError(f"no outputs for model {name!r}")
        if len(outputs[name]) != len(prompts):
            raise ValueError(
                f"model {name!r} has {len(outputs[name])} outputs for {len(prompts)} prompts"
            )


def _build_rows(
    models: list[dict], prompts: list[dict], outputs: dict[str, list]
) -> list[list[dict]]:
    """One row per prompt per model (``rows[prompt_index][model_index]``),
    with the per-row reference scores computed once for all renderers."""
    table = []
    for i, prompt in enumerate(prompts):
        reference = prompt.get("reference")
        per_model = []
        for model in models:
            out = outputs[model["name"]][i]
            row = {
                "prompt_index": i,
                "prompt": prompt["prompt"],
                "reference": reference,
                "model": model["name"],
                "text": out["text"],
                "n_tokens": len(out["token_ids"]),
                "stopped": bool(out["stopped"]),
            }
            if "ended_turn" in out:
                row["ended_turn"] = bool(out["ended_turn"])
            if has_reference(reference):
                row.update(reference_scores(out["text"], reference))
            per_model.append(row)
        table.append(per_model)
    return table


# ---------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------


def _fence(text: str) -> str:
    """A fenced code block that ``text`` cannot close early: the fence is
    longer than the longest run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _render_markdown(
    models: list[dict], rows: list[list[dict]], metrics: dict[str, dict], settings: dict
) -> str:
    lines = ["# Model comparison", "", "## Settings", ""]
    # Values as code spans so e.g. "<|im_end|>" is not taken for an HTML tag.
    lines += [f"- `{key}`: `{value}`" for key, value in settings.items()] or ["- (none)"]
    lines += ["", "## Models", ""]
    for model in models:
        line = f"- **{model['name']}**"
        if model.get("description"):
            line += f": {model['description']}"
        if model.get("source"):
            line += f" (source: `{model['source']}`)"
        lines.append(line)
    lines += ["", "## Metrics", "", format_table(metrics), "", "## Outputs", ""]
    for per_model in rows:
        first = per_model[0] if per_model else None
        if first is None:  # no models: nothing to show per prompt
            continue
        lines += [f"### Prompt {first['prompt_index'] + 1}", "", _fence(first["prompt"]), ""]
        if has_reference(first["reference"]):
            lines += ["**Reference**", "", _fence(first["reference"]), ""]
        for row in per_model:
            lines += [f"#### {row['model']} ({_status(row)})", "", _fence(row["text"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #222; }
h1, h2, h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #eef7ee; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6;
      padding: 0.6em; margin: 0.3em 0; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(var(--cols), minmax(0, 1fr));
        gap: 0.8em; }
.head { font-weight: bold; }
.cell .status { color: #666; font-size: 0.85em; }
.prompt { border-top: 2px solid #ddd; padding-top: 0.5em; }
img.chart { max-width: 100%; }
"""

_ARROWS = {True: " \u2191", False: " \u2193", None: ""}


def _e(value: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _best_model(key: str, metrics: dict[str, dict]) -> str | None:
    """The model with the best value of ``key``, or None when there is no
    direction, fewer than two values, or a tie."""
    direction = HIGHER_IS_BETTER.get(key)
    values = {m: v[key] for m, v in metrics.items() if v.get(key) is not None}
    if direction is None or len(values) < 2:
        return None
    best = (max if direction else min)(values.values())
    winners = [m for m, v in values.items() if v == best]
    return winners[0] if len(winners) == 1 else None


def _html_metric_table(metrics: dict[str, dict]) -> str:
    models = list(metrics)
    head = "".join(f"<th>{_e(m)}</th>" for m in models)
    body = []
    for key in _metric_keys(metrics):
        label = METRIC_LABELS.get(key, key) + _ARROWS[HIGHER_IS_BETTER.get(key)]
        best = _best_model(key, metrics)
        cells = "".join(
            f'<td class="num{" best" if m == best else ""}">'
            f"{_e(_format_value(key, metrics[m].get(key)))}</td>"
            for m in models
        )
        body.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return f"<table><tr><th>Metric</th>{head}</tr>{''.join(body)}</table>"


def _chart_png_base64(metrics: dict[str, dict]) -> str | None:
    """Grouped bar chart of the metrics as a base64 PNG, or None if there is
    nothing to plot. Rates (in %) and lengths (in tokens) get separate panels
    because their scales differ."""
    # Imported here: matplotlib is slow to import and only the HTML needs it.
    # Figure + FigureCanvasAgg avoids pyplot's global state and backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = _metric_keys(metrics)
    panels = [
        ([k for k in keys if k in RATE_METRICS], "%", 100.0),
        ([k for k in keys if k in ("mean_length", "median_length")], "tokens", 1.0),
    ]
    panels = [p for p in panels if p[0]]
    if not panels or not metrics:
        return None

    widths = [max(2, len(p[0])) for p in panels]
    fig = Figure(figsize=(min(14, 2.5 + 1.4 * sum(widths)), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    models = list(metrics)
    bar_width = 0.8 / len(models)
    for p, (ax, (panel_keys, unit, scale)) in enumerate(zip(axes, panels)):
        for j, model in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * bar_width for i in range(len(panel_keys))]
            # A metric missing for this model is drawn as a zero-height bar.
            ys = [scale * (metrics[model].get(k) or 0.0) for k in panel_keys]
            bars = ax.bar(xs, ys, bar_width, label=model)
            ax.bar_label(bars, fmt="%.0f" if unit == "%" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(panel_keys)))
        ax.set_xticklabels([METRIC_LABELS.get(k, k) for k in panel_keys], fontsize=8)
        ax.set_ylabel(unit)
        if unit == "%":
            ax.set_ylim(0, 125)  # room above 100% for bar labels and legend
        else:
            ax.margins(y=0.15)  # room for the bar labels
        if p == 0:  # one legend is enough: the colours are shared
            ax.legend(fontsize=8, loc="upper left", ncols=len(models))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html_prompt(per_model: list[dict]) -> str:
    first = per_model[0]
    parts = [
        '<section class="prompt">',
        f"<h3>Prompt {first['prompt_index'] + 1}</h3>",
        f"<pre>{_e(first['prompt'])}</pre>",
    ]
    if has_reference(first["reference"]):
        parts.append(f'<div class="head">Reference</div><pre>{_e(first["reference"])}</pre>')
    parts.append(f'<div class="grid" style="--cols: {len(per_model)}">')
    for row in per_model:
        parts.append(
            f'<div class="cell"><div class="head">{_e(row["model"])}</div>'
            f'<div class="status">{_e(_status(row))}</div>'
            f"<pre>{_e(row['text'])}</pre></div>"
        )
    parts += ["</div>", "</section>"]
    return "\n".join(parts)


def _render_html(
    models: list[dict], rows: list[list[dict]], metrics: dict[str, dict], settings: dict
) -> str:
    settings_rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in settings.items()
    )
    model_rows = "".join(
        f"<tr><th>{_e(m['name'])}</th><td>{_e(m.get('source', ''))}</td>"
        f"<td>{_e(m.get('description', ''))}</td></tr>"
        for m in models
    )
    chart = _chart_png_base64(metrics)
    chart_html = (
        f'<img class="chart" alt="Bar chart of the metrics" src="data:image/png;base64,{chart}">'
        if chart
        else ""
    )
    prompts_html = "\n".join(_html_prompt(per_model) for per_model in rows if per_model)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Model comparison</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Model comparison</h1>
<h2>Settings</h2>
<table>{settings_rows}</table>
<h2>Models</h2>
<table><tr><th>Name</th><th>Source</th><th>Description</th></tr>{model_rows}</table>
<h2>Metrics</h2>
{_html_metric_table(metrics)}
{chart_html}
<h2>Outputs</h2>
{prompts_html}
</body>
</html>
"""


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_report(
    out_dir: str | os.PathLike,
    models: list[dict],
    prompts: list[dict],
    outputs: dict[str, list[dict]],
    metrics: dict[str, dict],
    settings: dict,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``results.jsonl`` to ``out_dir``.

    Args:
        out_dir: directory to write to (created if missing).
        models: ``{"name", "source", "description"}`` dicts, in column order.
        prompts: ``{"prompt": str, "reference": str | None}`` dicts.
        outputs: model name -> output dicts (``text``, ``token_ids``,
            ``stopped``), one per prompt in the same order.
        metrics: model name -> :func:`finetune.metrics.summarize` dict.
        settings: decoding settings, shown as given.

    Returns:
        ``{"md": ..., "html": ..., "jsonl": ...}`` paths of the written files.

    Raises:
        ValueError: if a model has no outputs or not one per prompt.
    """
    _validate(models, prompts, outputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _build_rows(models, prompts, outputs)

    paths = {"md": out / REPORT_MD, "html": out / REPORT_HTML, "jsonl": out / RESULTS_JSONL}
    jsonl = "".join(
        json.dumps(row, ensure_ascii=False) + "\n" for per_model in rows for row in per_model
    )
    # files.write_text is atomic: temp file in the same folder, then os.replace.
    write_text(paths["jsonl"], jsonl)
    write_text(paths["md"], _render_markdown(models, rows, metrics, settings))
    write_text(paths["html"], _render_html(models, rows, metrics, settings))
    return paths
