"""The results JSON `phibook eval` writes, and the table it prints (compact by default; with the
report's numbers beside ours under --compare).

Results JSON (one object):
  phibook_version, date (UTC ISO 8601), model {path, fingerprint, source}, limit, batch_size,
  data_dir, device, dtype,
  results {task: {metric: value, metric + "_stderr": stderr, "n": docs, "truncated": requests cut to fit,
                  "prompt_settings": {...}, "report": {model: number from the report},
                  "data": {"layout": "hf-parquet", "files": [...]} (the benchmark files read, when known)}},
  samples {task: [per-doc records]}   (only with --log-samples)
A NaN (stderr of a single doc) is written as null, so the file is strict JSON.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from phibook.eval import report_numbers as rn
from phibook.version import __version__

# Short column headers for the report's models, in the report's row order.
SHORT_NAMES = {
    "phi-1.5 (1.3B)": "phi-1.5",
    "phi-1.5-web (1.3B)": "phi-web",
    "phi-1.5-web-only (1.3B)": "phi-web-only",
    "Llama-65B": "Llama-65B",
    "Vicuna-13B": "Vicuna-13B",
    "Llama2-7B": "Llama2-7B",
    "Llama-7B": "Llama-7B",
    "MPT-7B": "MPT-7B",
    "Falcon-7B": "Falcon-7B",
    "Falcon-rw-1.3B": "Falcon-rw-1.3B",
    "OPT-1.3B": "OPT-1.3B",
    "GPT-Neo-2.7B": "GPT-Neo-2.7B",
    "GPT2-XL-1.5B": "GPT2-XL",
}


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def task_entry(task, outcome: dict) -> dict[str, Any]:
    """One task's block of the results JSON from run_task's outcome."""
    entry: dict[str, Any] = {}
    for metric, (value, stderr) in outcome["metrics"].items():
        entry[metric] = _finite(value)
        entry[f"{metric}_stderr"] = _finite(stderr)
    entry["n"] = outcome["n"]
    # Requests whose prompt/context lost tokens from the left to fit the model's context.
    entry["truncated"] = outcome.get("truncated", 0)
    entry["higher_is_better"] = dict(task.metrics)
    entry["prompt_settings"] = dict(task.prompt_settings)
    entry["report_metric"] = report_metric(task.name, list(task.metrics))
    entry["report"] = {m: rn.REPORT_NUMBERS[m][task.name] for m in rn.REPORT_NUMBERS if task.name in rn.REPORT_NUMBERS[m]}
    source = getattr(task, "data_source", None)
    if source is not None:  # which files, in which layout (original release, hub copy, ...)
        entry["data"] = source.as_json()
    return entry


def report_metric(task: str, metrics: list[str]) -> str | None:
    return rn.REPORT_METRIC.get(task, metrics[0] if metrics else None)


def build_results(
    entries: dict[str, dict],
    *,
    model_path: str,
    fingerprint: str | None,
    source: str | None,
    limit: int | None,
    batch_size: int,
    data_dir: str | None,
    device: str,
    dtype: str,
    samples: dict[str, list] | None = None,
    sandbox: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "phibook_version": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"path": model_path, "fingerprint": fingerprint, "source": source},
        "limit": limit,
        "batch_size": batch_size,
        "data_dir": data_dir,
        "device": device,
        "dtype": dtype,
        "results": entries,
    }
    if sandbox is not None:  # how model-written programs ran (code tasks only)
        out["sandbox"] = sandbox
    if samples is not None:
        out["samples"] = samples
    return out


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


NOT_METRICS = {"n", "truncated", "higher_is_better", "prompt_settings", "report_metric", "report", "data"}


def metric_names(entry: dict[str, Any]) -> list[str]:
    """The metric keys of a task entry, without stderrs and per-group ("acc:<subject>") values."""
    return [k for k in entry if k not in NOT_METRICS and not k.endswith("_stderr") and ":" not in k]


def _render(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# How a metric judges one item, for the note under a table when every item scored the same.
METRIC_MEANING = {
    "acc": ("by log-likelihood", "the choice with the highest log-likelihood"),
    "acc_norm": ("by length-normalized score", "the choice with the highest log-likelihood per character"),
}


def uniform_notes(results: dict[str, Any]) -> list[str]:
    """A line for each value of exactly 0 or 1 with a stderr of 0 (or none, for one item): every
    item scored the same, which "0.0000 ± 0.0000" alone does not say."""
    notes = []
    for task, entry in results["results"].items():
        n = entry.get("n")
        for metric in metric_names(entry):
            value, stderr = entry.get(metric), entry.get(f"{metric}_stderr")
            if value not in (0.0, 1.0) or stderr not in (0.0, None) or not n:
                continue
            items = "the only item" if n == 1 else f"all {n} items"
            if metric in METRIC_MEANING:
                by, pick = METRIC_MEANING[metric]
                what = (f"{items} wrong {by} ({pick} was never the gold answer)" if value == 0.0
                        else f"{items} right {by} ({pick} was always the gold answer)")
            else:
                what = f"{items} scored {value:g}"
            why = ("a stderr of 0 means every item scored the same, not that the number is exact" if n > 1
                   else "one item has no stderr")
            shown = f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"
            notes.append(f"note: {task} {metric} = {shown} on {n} item{'s' if n != 1 else ''}: {what}; {why}.")
    return notes


def format_table(results: dict[str, Any], compare: bool = False, peers: bool = True) -> str:
    """A plain-text table. By default compact: task | metric | value ± stderr | n, one row per
    task and metric. `compare` (phibook eval --compare) adds the report's numbers: task | metric |
    n | ours ± stderr | phi-1.5 (report) | peers (report), the report's numbers on the row of the
    metric they are comparable with (acc for the multiple-choice tasks). Per-subject MMLU metrics
    ("acc:<subject>") stay in the JSON only. A line under the table explains any value where every
    item scored the same (0.0000 ± 0.0000).
    """
    if not compare:
        rows = [["task", "metric", "value ± stderr", "n"]]
        for task, entry in results["results"].items():
            for metric in metric_names(entry):
                value, stderr = entry.get(metric), entry.get(f"{metric}_stderr")
                cell = _fmt(value, stderr) if stderr is not None or value is None else f"{value:.4f} ± n/a"
                rows.append([task, metric, cell, str(entry.get("n", ""))])
        return "\n".join(_render(rows, right={3}) + uniform_notes(results))
    models = [m for m in rn.REPORT_NUMBERS if m != rn.PHI15] if peers else []
    header = ["task", "metric", "n", "ours ± stderr", "phi-1.5 (report)"] + [SHORT_NAMES.get(m, m) for m in models]
    rows = [header]
    for task, entry in results["results"].items():
        for metric in metric_names(entry):
            is_report = metric == entry.get("report_metric")
            row = [task, metric, str(entry["n"]), _fmt(entry.get(metric), entry.get(f"{metric}_stderr"))]
            row.append(rn.report_cell(rn.PHI15, task) if is_report and task in rn.REPORT_NUMBERS[rn.PHI15] else "")
            for m in models:
                row.append(rn.report_cell(m, task) if is_report and task in rn.REPORT_NUMBERS[m] else "")
            rows.append(row)
    return "\n".join(_render(rows) + uniform_notes(results))
