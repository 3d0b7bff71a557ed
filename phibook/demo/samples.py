"""Sample generations in each of the report's prompt formats: the one part of a report that runs a model.

The demo's "samples" stage calls it, and so does `phibook report RUN_DIR` for a
plain training run with a small model, before the renderer (report.py) reads
the samples.json it wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from phibook import io
from phibook.errors import PhibookError

# The report's own completion example (section 5), then prompts for the other formats.
SAMPLE_PROMPTS = {
    "completion": "Alice was so tired when she got back home so she went",
    "step-by-step": "Maya has 12 apples. Maya buys 3 bags with 4 apples in each bag. How many apples does Maya have now?",
    "qa": "Liam puts the ball in the basket and goes outside to play. While Liam is away, Sofia moves the ball "
    "from the basket to the drawer. When Liam comes back, where will Liam look for the ball first?",
    "chat": "How many minutes are there in 3 hours?",
    "code": "def sum_of_evens(numbers):\nReturn the sum of the even numbers in the list.",
}
# `phibook report RUN_DIR` samples a plain run only below this size (a CPU does it in seconds).
SAMPLE_MAX_PARAMS = 60_000_000


def sample_generations(model_dir: Path, max_new_tokens: int = 96, progress: bool = True) -> list[dict[str, Any]]:
    """One greedy generation per report prompt format (phibook.inference.templates), with its stop strings."""
    from tqdm import tqdm

    from phibook.inference.generate import Generator, SamplingParams
    from phibook.inference.templates import get_template

    gen = Generator.from_path(model_dir)
    out = []
    for fmt, prompt in tqdm(SAMPLE_PROMPTS.items(), desc="samples", unit="prompt", disable=not progress,
                            file=sys.stderr):
        template = get_template(fmt)
        text = template.format(prompt)
        room = gen.context - len(gen.tokenizer.encode(text))
        if room < 8:  # a model with a very short context (a test-sized one) skips the long prompts
            out.append({"format": fmt, "prompt": text, "completion": "", "finish_reason": "skipped",
                        "tokens": 0, "note": f"prompt does not fit the model's {gen.context}-token context"})
            continue
        params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0.0,
                                repetition_penalty=1.1, stop=template.stops(prompt))
        c = gen.generate([text], params)[0]
        out.append({"format": fmt, "prompt": text, "completion": c.text, "finish_reason": c.finish_reason,
                    "tokens": c.completion_tokens})
    return out


def write_samples(samples: list[dict[str, Any]], out: Path, model_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "samples.json", {"model": str(model_dir), "samples": samples})
    parts = [f"# Sample generations\n\nModel: `{model_dir}`; greedy, repetition penalty 1.1, "
             "each format's stop strings (phibook/inference/templates.py).\n"]
    for s in samples:
        parts.append(f"## {s['format']}\n\n```text\n{s['prompt']}{s['completion']}\n```\n\n"
                     f"({s['tokens']} tokens, finish: {s['finish_reason']})\n")
    io.write_bytes(out / "samples.md", "\n".join(parts).encode("utf-8"))


def sample_training_run(run_dir: str | Path, out: str | Path | None = None, progress: bool = True) -> Path | None:
    """Write samples.json/.md into ``out`` (default ``run_dir``) from a training run's newest checkpoint.

    Does nothing (returns None) unless ``run_dir`` is a plain `phibook train`
    run directory (not a demo directory) with no samples yet, whose newest
    checkpoint has a tokenizer and a model under SAMPLE_MAX_PARAMS parameters.
    """
    from phibook.model.config import PhiConfig
    from phibook.weights.checkpoint import find_checkpoint

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    config = run_dir / "config.resolved.json"
    if (run_dir / "stages.json").exists() or (run_dir / "samples.json").exists() or not config.exists():
        return None
    try:
        model = json.loads(config.read_text(encoding="utf-8")).get("model") or {}
        n = PhiConfig.from_dict(model).num_params()
    except Exception:  # noqa: BLE001 - an unreadable or unknown config just means no samples
        return None
    try:
        ckpt = find_checkpoint(run_dir)
    except PhibookError:
        return None
    if n > SAMPLE_MAX_PARAMS or not (ckpt / "tokenizer.json").exists():
        return None
    write_samples(sample_generations(ckpt, progress=progress), out, ckpt)
    return out / "samples.json"
