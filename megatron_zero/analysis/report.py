"""Plots and the single-file HTML report of a behaviour analysis.

`save_plots` draws four PNGs across steps with matplotlib's Agg canvas (no display, no pyplot state):
response length (correct vs wrong), behaviour rates, box / clip / stop / repeat ratios with accuracy,
and reflection-keyword counts. `render_report` fills a Jinja2 template (autoescaped: responses are
model output and may contain HTML) with those images inlined as base64, so the page is one portable
file. Look at it headless with ``python tools/screenshot_report.py report.html``.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import jinja2
from matplotlib.figure import Figure

from megatron_zero.analysis.behaviors import BEHAVIORS
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS, REPETITION_NGRAM, REPETITION_THRESHOLD

if TYPE_CHECKING:
    from megatron_zero.analysis.pipeline import AnalysisResult, StepSummary

MAX_EXAMPLE_CHARS = 4000
PLOT_CAPTIONS = {
    "lengths": "Mean response length (tokens): correct vs wrong",
    "behaviors": "Cognitive behaviours (% of judged responses)",
    "ratios": "Accuracy and box / clip / stop / repeat ratios (%)",
    "keywords": "Reflection keywords (mean count per response)",
}


def _series(values: Sequence[Optional[float]], scale: float = 1.0) -> list[float]:
    return [float("nan") if v is None else scale * v for v in values]


def _line_plot(path: Path, title: str, ylabel: str, xs: list[int], series: dict[str, list[float]]) -> None:
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for label, ys in series.items():
        axes.plot(xs, ys, marker="o", markersize=4, label=label)
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    # Below the axes, so the legend never hides a line.
    axes.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    figure.savefig(path, dpi=110)


def save_plots(steps: Sequence["StepSummary"], plot_dir: str | Path) -> dict[str, Path]:
    """Write the four trend plots into `plot_dir`; returns name -> path (names as in PLOT_CAPTIONS)."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    xs = [s.step for s in steps]
    series = {
        "lengths": (
            "tokens",
            {
                "all": _series([s.mean_length for s in steps]),
                "correct": _series([s.mean_length_correct for s in steps]),
                "wrong": _series([s.mean_length_wrong for s in steps]),
            },
        ),
        "behaviors": (
            "% of judged responses",
            {b.replace("_", " "): _series([s.behavior_rates[b] for s in steps], 100) for b in BEHAVIORS},
        ),
        "ratios": (
            "%",
            {
                name.replace("_", " "): _series([getattr(s, name) for s in steps], 100)
                for name in ("accuracy", "box_ratio", "clip_ratio", "stop_ratio", "repeat_ratio", "reflection_ratio")
            },
        ),
        "keywords": (
            "mean count per response",
            {k: _series([s.keyword_means[k] for s in steps]) for k in REFLECTION_KEYWORDS},
        ),
    }
    paths = {}
    for name, (ylabel, lines) in series.items():
        paths[name] = plot_dir / f"{name}.png"
        _line_plot(paths[name], PLOT_CAPTIONS[name], ylabel, xs, lines)
    return paths


_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; font-size: 0.9em; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; background: #fafafa; }
figure img { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 4px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fbfbfb; }
details { margin: 8px 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 6px 10px; }
summary { cursor: pointer; font-size: 0.9em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: 8px;
      max-height: 420px; overflow: auto; font-size: 0.82em; }
.evidence { color: #1a5a96; font-style: italic; }
.correct { color: #1e7e34; font-weight: 600; } .wrong { color: #b02a37; font-weight: 600; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ num_responses }} responses over {{ steps|length }} step(s); behaviours judged by
<b>{{ judge }}</b> on {{ num_judged }} responses{% if num_judge_errors %}, with {{ num_judge_errors }}
judge error(s) answered by the rule fallback{% endif %}. Generated {{ generated_at }}.</p>

<h2>Trends across steps</h2>
<div class="grid">
{% for plot in plots %}<figure><img alt="{{ plot.caption }}" src="data:image/png;base64,{{ plot.data }}"></figure>
{% endfor %}</div>

<h2>Per-step summary</h2>
<div class="scroll"><table>
<tr><th>step</th><th>responses</th><th>accuracy</th><th>mean length</th><th>length correct</th>
<th>length wrong</th><th>clip</th><th>stop</th><th>box</th><th>repeat</th><th>reflection</th></tr>
{% for s in steps %}<tr><td>{{ s.step }}</td><td>{{ s.num_responses }}</td><td>{{ s.accuracy|pct }}</td>
<td>{{ s.mean_length|num }}</td><td>{{ s.mean_length_correct|num }}</td><td>{{ s.mean_length_wrong|num }}</td>
<td>{{ s.clip_ratio|pct }}</td><td>{{ s.stop_ratio|pct }}</td><td>{{ s.box_ratio|pct }}</td>
<td>{{ s.repeat_ratio|pct }}</td><td>{{ s.reflection_ratio|pct }}</td></tr>
{% endfor %}</table></div>
<p class="meta">Lengths in tokens. clip / stop: share cut at max length / ended by the end token; box: has
\\boxed{}; repeat: share of looping responses (windowed {{ repetition.ngram }}-gram Jaccard &ge; {{ repetition.threshold }}); reflection: share with
at least one reflection keyword.</p>

<h2>Cognitive behaviours per step (% of judged responses)</h2>
<div class="scroll"><table>
<tr><th>step</th>{% for b in behaviors %}<th>{{ b.title }}</th>{% endfor %}<th>judged</th><th>judge errors</th></tr>
{% for s in steps %}<tr><td>{{ s.step }}</td>{% for b in behaviors %}<td>{{ s.behavior_rates[b.name]|pct }}</td>{% endfor %}
<td>{{ s.num_judged }}</td><td>{{ s.num_judge_errors }}</td></tr>
{% endfor %}</table></div>

<h2>Reflection keywords (mean count per response)</h2>
<div class="scroll"><table>
<tr><th>step</th>{% for k in keywords %}<th>{{ k }}</th>{% endfor %}</tr>
{% for s in steps %}<tr><td>{{ s.step }}</td>{% for k in keywords %}<td>{{ "%.2f"|format(s.keyword_means[k]) }}</td>{% endfor %}</tr>
{% endfor %}</table></div>

<h2>Example responses per behaviour</h2>
{% for b in behaviors %}<h3>{{ b.title }}</h3>
{% if not b.examples %}<p class="meta">No judged response shows this behaviour.</p>{% endif %}
{% for ex in b.examples %}<details{% if loop.first %} open{% endif %}>
<summary>step {{ ex.step }} &middot; <span class="{{ 'correct' if ex.correct else 'wrong' }}">{{ 'correct' if ex.correct else 'wrong' }}</span>
(reward {{ ex.reward }}) &middot; {{ ex.num_tokens }} tokens &middot; judge: {{ ex.source }}
{% if ex.evidence %}&middot; <span class="evidence">&ldquo;{{ ex.evidence }}&rdquo;</span>{% endif %}</summary>
<pre>{{ ex.response }}</pre>
</details>
{% endfor %}{% endfor %}

<h2>Inputs</h2>
<ul>{% for path in inputs %}<li><code>{{ path }}</code></li>{% endfor %}</ul>
</body>
</html>
"""


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _clip(text: str, max_chars: int = MAX_EXAMPLE_CHARS) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + f"\n[... {len(text) - max_chars} more characters]"


def render_report(result: "AnalysisResult", plots: dict[str, Path], title: str = "megatron-zero behaviour analysis") -> str:
    """The report as one HTML string; `plots` are the PNGs from `save_plots`, embedded as base64."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(pct=_pct, num=_num)
    behaviors = [
        {
            "name": b,
            "title": b.replace("_", " "),
            "examples": [
                {
                    "step": ex.record.step,
                    "correct": ex.record.correct,
                    "reward": ex.record.reward,
                    "num_tokens": ex.record.num_tokens,
                    "source": ex.verdict.source,
                    "evidence": ex.verdict.evidence.get(b, ""),
                    "response": _clip(ex.record.response),
                }
                for ex in result.examples(b)
            ],
        }
        for b in BEHAVIORS
    ]
    return environment.from_string(_TEMPLATE).render(
        title=title,
        generated_at=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        judge=result.judge,
        num_responses=len(result.responses),
        num_judged=sum(s.num_judged for s in result.steps),
        num_judge_errors=result.num_judge_errors,
        steps=result.steps,
        behaviors=behaviors,
        keywords=REFLECTION_KEYWORDS,
        repetition={"ngram": REPETITION_NGRAM, "threshold": REPETITION_THRESHOLD},
        plots=[
            {"caption": PLOT_CAPTIONS[name], "data": base64.b64encode(Path(path).read_bytes()).decode("ascii")}
            for name, path in plots.items()
        ],
        inputs=result.inputs,
    )
