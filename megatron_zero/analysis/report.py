"""The single-file HTML report of a behaviour analysis.

`render_report` fills a Jinja2 template (autoescaped: responses are model output and may contain HTML) with the
trend plots (plots.py) inlined as base64, so the page is one portable file. Besides the per-step tables it shows
real responses: a few of the first and the last step, and per behaviour a few of the early and of the late
steps, each with the judge's cue highlighted. Look at it headless with
``python tools/screenshot_report.py report.html``.
"""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any, Optional

import jinja2

from megatron_zero.analysis.behaviors import BEHAVIORS
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS, REPETITION_NGRAM, REPETITION_THRESHOLD
from megatron_zero.analysis.plots import PLOT_CAPTIONS
from megatron_zero.analysis.summary import STAGES, AnalysisResult, ResponseAnalysis, stage_steps

MAX_EXAMPLE_CHARS = 4000
# The prompt is context for the response: its end (the question) matters most, but a long prompt is clipped.
MAX_PROMPT_CHARS = 600

_TEMPLATE = """\
{% macro example(ex) %}<details{% if ex.open %} open{% endif %}>
<summary>step {{ ex.step }} &middot; <span class="{{ 'correct' if ex.correct else 'wrong' }}">{{ 'correct' if ex.correct else 'wrong' }}</span>
(reward {{ ex.reward }}) &middot; {{ ex.num_tokens }} tokens{% if ex.cues %} &middot; {{ ex.cues|join(", ") }}{% endif %}</summary>
<div class="prompt">{{ ex.prompt }} <span class="meta">(answer {{ ex.ground_truth }})</span></div>
<pre>{% for part in ex.parts %}{% if part.cue %}<mark title="{{ part.cue }}">{{ part.text }}</mark>{% else %}{{ part.text }}{% endif %}{% endfor %}</pre>
</details>{% endmacro %}
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
mark { background: #ffe08a; padding: 0 1px; }
.prompt { font-family: monospace; font-size: 0.82em; color: #444; margin-top: 6px; }
.correct { color: #1e7e34; font-weight: 600; } .wrong { color: #b02a37; font-weight: 600; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ num_responses }} responses over {{ steps|length }} step(s); behaviours judged on
{{ num_judged }} responses by the <b>{{ judge }}</b> judge ({{ judge_description }}){% if num_judge_errors %},
with {{ num_judge_errors }} judge error(s) answered by the rule fallback{% endif %}. Generated {{ generated_at }}.</p>

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

<h2>Cognitive behaviours per step (% of judged responses, {{ judge }} judge)</h2>
<div class="scroll"><table>
<tr><th>step</th>{% for b in behaviors %}<th>{{ b.title }}</th>{% endfor %}<th>judged</th><th>judge errors</th></tr>
{% for s in steps %}<tr><td>{{ s.step }}</td>{% for b in behaviors %}<td>{{ s.behavior_rates[b.name]|pct }}</td>{% endfor %}
<td>{{ s.num_judged }}</td><td>{{ s.num_judge_errors }}</td></tr>
{% endfor %}</table></div>

<h2>Reflection keywords (mean count per response)</h2>
{% if keywords_seen %}<div class="scroll"><table>
<tr><th>step</th>{% for k in keywords_seen %}<th>{{ k }}</th>{% endfor %}</tr>
{% for s in steps %}<tr><td>{{ s.step }}</td>{% for k in keywords_seen %}<td>{{ "%.2f"|format(s.keyword_means[k]) }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% if keywords_unseen %}<p class="meta">Never used: {{ keywords_unseen|join(", ") }}.</p>{% endif %}
{% else %}<p class="meta">No response uses any reflection keyword ({{ keywords|join(", ") }}), so there is no table.</p>
{% endif %}

<h2>Responses, early and late</h2>
<p class="meta">The first responses of the first and of the last step, one per prompt.
Below, per behaviour: early = the first third of the steps, late = the last third. Detected behaviour cues are
<mark>highlighted</mark>.</p>
<div class="grid">{% for stage in stages %}<div><h3>{{ stage.name }} (step {{ stage.steps|join(", ") }})</h3>
{% for ex in stage.samples %}{{ example(ex) }}{% endfor %}</div>
{% endfor %}</div>

<h2>Example responses per behaviour</h2>
{% for b in behaviors %}<h3>{{ b.title }}</h3>
<div class="grid">{% for stage in b.stages %}<div><h4>{{ stage.name }}</h4>
{% if not stage.examples %}<p class="meta">No judged response of the {{ stage.name }} steps shows this behaviour.</p>{% endif %}
{% for ex in stage.examples %}{{ example(ex) }}{% endfor %}</div>
{% endfor %}</div>{% endfor %}

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


def highlighted_parts(text: str, cues: dict[str, str]) -> list[dict[str, str]]:
    """`text` cut into parts, each {"text", "cue"}: "cue" names the behaviour whose evidence the part is, or is ""
    for plain text. Evidence is found verbatim (an LLM judge's paraphrase that is not in the text is not marked);
    where two cues overlap, the earlier one wins. The template escapes every part, so marking adds no HTML."""
    spans = []
    for behavior, evidence in cues.items():
        start = text.find(evidence) if evidence else -1
        if start >= 0:
            spans.append((start, start + len(evidence), behavior))
    parts, position = [], 0
    for start, end, behavior in sorted(spans):
        if start < position:
            continue
        parts += [{"text": text[position:start], "cue": ""}, {"text": text[start:end], "cue": behavior}]
        position = end
    parts.append({"text": text[position:], "cue": ""})
    return [part for part in parts if part["text"]]


def _example(response: ResponseAnalysis, open_: bool = False) -> dict[str, Any]:
    record = response.record
    text = _clip(record.response)
    evidence = response.verdict.evidence if response.verdict else {}
    cues = {b: e for b, e in evidence.items() if response.verdict.behaviors.get(b)}
    return {
        "step": record.step,
        "prompt": _clip(record.prompt, MAX_PROMPT_CHARS),
        "ground_truth": record.ground_truth,
        "correct": record.correct,
        "reward": record.reward,
        "num_tokens": record.num_tokens,
        "cues": [f"{b.replace('_', ' ')}: \u201c{e}\u201d" for b, e in cues.items()],
        "parts": highlighted_parts(text, cues),
        "open": open_,
    }


def render_report(result: AnalysisResult, plots: dict[str, Path],
                  title: str = "megatron-zero behaviour analysis") -> str:
    """The report as one HTML string; `plots` are the PNGs from `save_plots`, embedded as base64."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(pct=_pct, num=_num)
    steps_of_stage = stage_steps([s.step for s in result.steps])
    behaviors = [
        {
            "name": b,
            "title": b.replace("_", " "),
            "stages": [
                {"name": stage,
                 "examples": [_example(ex, open_=i == 0) for i, ex in enumerate(result.examples(b, stage))]}
                for stage in STAGES
            ],
        }
        for b in BEHAVIORS
    ]
    stages = [
        {"name": stage, "steps": steps_of_stage[stage][:1] if stage == "early" else steps_of_stage[stage][-1:],
         "samples": [_example(ex, open_=True) for ex in result.stage_samples(stage)]}
        for stage in STAGES
    ]
    # A keyword no response uses gets no column: a table of zeros says nothing.
    keywords_seen = [k for k in REFLECTION_KEYWORDS if any(s.keyword_means[k] > 0 for s in result.steps)]
    return environment.from_string(_TEMPLATE).render(
        title=title,
        generated_at=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        judge=result.judge,
        judge_description=result.judge_description,
        num_responses=len(result.responses),
        num_judged=sum(s.num_judged for s in result.steps),
        num_judge_errors=result.num_judge_errors,
        steps=result.steps,
        behaviors=behaviors,
        stages=stages,
        keywords=REFLECTION_KEYWORDS,
        keywords_seen=keywords_seen,
        keywords_unseen=[k for k in REFLECTION_KEYWORDS if k not in keywords_seen],
        repetition={"ngram": REPETITION_NGRAM, "threshold": REPETITION_THRESHOLD},
        plots=[
            {"caption": PLOT_CAPTIONS[name], "data": base64.b64encode(Path(path).read_bytes()).decode("ascii")}
            for name, path in plots.items()
        ],
        inputs=result.inputs,
    )
