"""The results JSON `phibook eval` writes, and the table it prints beside the report's numbers.

Results JSON (one object):
  phibook_version, date (UTC ISO 8601), model {path, fingerprint, source}, limit, batch_size,
  data_dir, device, dtype,
  results {task: {metric: value, metric + "_stderr": stderr, "n": docs, "truncated": requests cut to fit,
                  "prompt_settings": {...}, "report": {model: number from the report}}},
  samples {task: [per-doc records]}   (only with --log-samples)
A NaN (stderr of a single doc) is written as null, so the file is strict JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


NOT_METRICS = {"n", "truncated", "higher_is_better", "prompt_settings", "report_metric", "report"}


def metric_names(entry: dict[str, Any]) -> list[str]:
    """The metric keys of a task entry, without stderrs and per-group ("acc:<subject>") values."""
    return [k for k in entry if k not in NOT_METRICS and not k.endswith("_stderr") and ":" not in k]


def format_table(results: dict[str, Any], peers: bool = True) -> str:
    """A plain-text table: task | metric | n | ours ± stderr | phi-1.5 (report) | peers (report).

    Report numbers appear on the row of the metric they are comparable with (acc for the
    multiple-choice tasks); per-subject MMLU metrics ("acc:<subject>") stay in the JSON only.
    """
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
