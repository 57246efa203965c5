"""Response and behaviour analysis across training steps: metrics, judges, plots, HTML report.

Public entry points: `analyze` and `write_analysis` (pipeline), `AnalysisResult` / `StepSummary` (summary),
`make_judge` / `JUDGES` (behaviors),
`load_samples` / `SampleRecord` (records). CLI: ``python tools/analyze_behaviors.py --help``.
"""

from megatron_zero.analysis.behaviors import BEHAVIORS, JUDGES, LLMJudge, RuleJudge, Verdict, make_judge
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS, has_box, keyword_counts, repetition_ratio
from megatron_zero.analysis.pipeline import analyze, write_analysis
from megatron_zero.analysis.records import SampleRecord, load_samples, sample_files_in, write_samples
from megatron_zero.analysis.summary import AnalysisResult, StepSummary

__all__ = [
    "BEHAVIORS",
    "JUDGES",
    "REFLECTION_KEYWORDS",
    "AnalysisResult",
    "LLMJudge",
    "RuleJudge",
    "SampleRecord",
    "StepSummary",
    "Verdict",
    "analyze",
    "has_box",
    "keyword_counts",
    "load_samples",
    "make_judge",
    "repetition_ratio",
    "sample_files_in",
    "write_analysis",
    "write_samples",
]
