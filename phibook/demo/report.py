"""report.md + report.html for a demo directory or any training run directory.

The report is built as a list of sections made of a few block kinds
(paragraph, table, image, preformatted text), then rendered twice: Markdown
(images as PNG files beside it) and one self-contained HTML file (CSS inline,
images as base64 data: URIs, no scripts, no external URLs) that opens from
disk. Plots are matplotlib PNGs drawn with the Agg backend.

What goes in depends on what the directory holds: a demo directory
(stages.json) gives every section; a plain run directory gives configuration,
loss curves and throughput, the samples `phibook report` wrote beside it
(phibook.demo.samples), and any `phibook eval` results JSON found in it. This
module only reads and renders: it never loads or runs a model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibook.demo.stages import STAGE_TITLES, STAGES
from phibook.errors import PhibookError
from phibook.io import write_bytes

# Chance accuracy of the zero-shot multiple-choice tasks (1 / number of choices).
CHANCE = {"winogrande": 1 / 2, "arc_easy": 1 / 4, "arc_challenge": 1 / 4, "boolq": 1 / 2, "siqa": 1 / 3,
          "piqa": 1 / 2, "hellaswag": 1 / 4, "openbookqa": 1 / 4}

CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;
background:#f6f8fa;margin:0}
main{max-width:1060px;margin:0 auto;padding:24px 32px 48px;background:#fff;box-shadow:0 0 12px #0001}
h1{font-size:28px;margin:8px 0 4px}h2{font-size:21px;border-bottom:2px solid #d0d7de;padding-bottom:4px;
margin-top:36px}h3{font-size:16px;margin:20px 0 6px}
.lead{color:#57606a;margin:0 0 12px}
nav{font-size:14px;margin:12px 0 4px}nav a{margin-right:14px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:10px 0 14px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
img{max-width:100%;height:auto;border:1px solid #d0d7de;border-radius:4px;margin:6px 0}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;padding:10px 12px;white-space:pre-wrap;
word-break:break-word;font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre .prompt{color:#8250df;font-weight:600}
.note{color:#57606a;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{flex:1 1 180px;border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;background:#f6f8fa}
.card b{display:block;font-size:22px}.card span{color:#57606a;font-size:13px}
"""


# --------------------------------------------------------------------------- blocks


@dataclass
class Image:
    name: str  # file name for the Markdown copy
    png: bytes
    alt: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns


@dataclass
class Pre:
    text: str
    prompt: str = ""  # shown highlighted before text


@dataclass
class Cards:
    items: list[tuple[str, str]]  # (value, label)


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)  # str (paragraph) | Table | Image | Pre | Cards | ("h3", s)


# --------------------------------------------------------------------------- reading


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise PhibookError(f"cannot read {path}: {exc}") from exc


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records, skipping a torn last line."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def unigram_entropy(manifest_path: Path, split: str = "train") -> float | None:
    """Entropy (nats/token) of the shards' token frequencies: the loss of a model that ignores context."""
    import numpy as np

    from phibook.data.shards import load_manifest

    try:
        m = load_manifest(manifest_path)
    except (PhibookError, OSError):
        return None
    counts = np.zeros(m.vocab_size + 1, dtype=np.int64)
    for shard in m.split_shards(split):
        path = m.shard_path(shard)
        if not path.exists():
            return None
        counts += np.bincount(np.fromfile(path, dtype=m.np_dtype), minlength=len(counts))[: len(counts)]
    total = counts.sum()
    if not total:
        return None
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


@dataclass
class ReportData:
    root: Path
    run_dir: Path | None
    demo: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None
    clean: dict[str, Any] | None = None
    samples: dict[str, Any] | None = None
    eval_results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    entropy: float | None = None


def gather(path: str | Path) -> ReportData:
    root = Path(path)
    if not root.is_dir():
        raise PhibookError(f"{root} is not a directory (want a demo output or a training run directory)")
    if (root / "stages.json").exists():
        d = ReportData(root, root / "run", demo=_load(root / "stages.json"))
        d.before, d.after = _load(root / "eval/before.json"), _load(root / "eval/after.json")
        d.heldout, d.clean = _load(root / "eval/heldout.json"), _load(root / "data/clean_report.json")
        manifest = root / "shards/manifest.json"
    elif (root / "metrics.jsonl").exists() or (root / "config.resolved.json").exists():
        d = ReportData(root, root)
        manifest = None
    else:
        raise PhibookError(f"{root} holds neither stages.json (a demo) nor metrics.jsonl (a training run)")
    if d.run_dir is not None and d.run_dir.is_dir():
        d.config = _load(d.run_dir / "config.resolved.json")
        d.metrics = read_metrics(d.run_dir)
        if manifest is None and d.config and d.config.get("data"):
            p = Path(d.config["data"])
            manifest = p if p.suffix == ".json" else p / "manifest.json"
    d.samples = _load(root / "samples.json")
    for p in sorted(root.glob("*.json")) + sorted(root.glob("eval/*.json")):
        obj = _load(p)
        if isinstance(obj, dict) and "phibook_version" in obj and isinstance(obj.get("results"), dict):
            d.eval_results.append((str(p.relative_to(root)), obj))
    if manifest is not None and manifest.exists():
        d.entropy = unigram_entropy(manifest)
    return d


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def loss_plot(d: ReportData) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in d.metrics if r.get("loss") is not None]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    steps = [r["step"] for r in recs]
    tokens = [r.get("tokens", 0) / 1e6 for r in recs]
    losses = [r["loss"] for r in recs]
    vals = [r for r in d.metrics if r.get("val_loss") is not None]
    step0 = d.before.get("val_loss") if d.before else None
    for ax, xs, label in ((axes[0], steps, "step"), (axes[1], tokens, "tokens trained (millions)")):
        ax.plot(xs, losses, color="#9ecae1", lw=0.8, label="train loss")
        ax.plot(xs, _smooth(losses, max(1, len(losses) // 40)), color="#2171b5", lw=1.8, label="train loss (smoothed)")
        vx = [r["step"] if label == "step" else r.get("tokens", 0) / 1e6 for r in vals]
        vy = [r["val_loss"] for r in vals]
        if step0 is not None:
            vx, vy = [0.0, *vx], [step0, *vy]
        if vy:
            ax.plot(vx, vy, "o-", color="#e6550d", ms=4, lw=1.5, label="validation loss")
        if d.entropy is not None:
            ax.axhline(d.entropy, color="#636363", ls="--", lw=1, label=f"unigram entropy {d.entropy:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Loss curves", fontsize=12)
    fig.tight_layout()
    return _png(fig)


def throughput_plot(d: ReportData) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in d.metrics if r.get("tokens_per_s")]
    if len(recs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(10.5, 2.8))
    tps = [r["tokens_per_s"] for r in recs]
    ax.plot([r["step"] for r in recs], tps, color="#bdbdbd", lw=0.8, label="per step")
    ax.plot([r["step"] for r in recs], _smooth(tps, max(1, len(tps) // 30)), color="#31a354", lw=1.8,
            label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training throughput", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def bar_label(percent: float) -> str:
    """A bar's label, with the table's precision: 2.5 is "2.5%", never a rounded "2%"."""
    return _pct(percent / 100)


def accuracy_plot(before: dict[str, Any], after: dict[str, Any]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(after["exercises"]["per_kind"])
    if not kinds:
        return None
    b = [before["exercises"]["per_kind"].get(k, {}).get("accuracy", 0.0) * 100 for k in kinds]
    a = [after["exercises"]["per_kind"][k]["accuracy"] * 100 for k in kinds]
    kinds.append("overall")
    b.append(before["exercises"]["overall"]["accuracy"] * 100)
    a.append(after["exercises"]["overall"]["accuracy"] * 100)
    fig, ax = plt.subplots(figsize=(10.5, 3.2))
    xs = range(len(kinds))
    ax.bar([x - 0.2 for x in xs], b, width=0.4, color="#bdbdbd", label="before training (step 0)")
    ax.bar([x + 0.2 for x in xs], a, width=0.4, color="#3182bd", label="after training")
    for x, v in zip(xs, a, strict=True):
        ax.text(x + 0.2, v + 1, bar_label(v), ha="center", fontsize=8)
    # One word a line: ten kinds side by side in 10.5 inches leave no room for "word problem" next
    # to "unit conversion" on one line (their labels ran together).
    ax.set_xticks(list(xs), [k.replace("_", "\n") for k in kinds], fontsize=8)
    ax.set_ylabel("exact-answer accuracy (%)")
    ax.set_ylim(0, max(10, max(a + b) * 1.2))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Held-out exercises (unseen questions)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- sections


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _machine() -> str:
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = ""
    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); {load} at report time")


def summary_section(d: ReportData) -> Section:
    s = Section("summary", "Summary")
    cards = []
    last = d.metrics[-1] if d.metrics else None
    vals = [r for r in d.metrics if r.get("val_loss") is not None]
    if last:
        cards.append((_f(last.get("tokens", 0)), f"tokens trained in {last['step']:,} steps"))
        cards.append((_f(last["loss"]), "final train loss"))
    if vals:
        cards.append((_f(vals[-1]["val_loss"]), "final validation loss"))
    if d.entropy is not None:
        cards.append((_f(d.entropy), "unigram entropy of the corpus"))
    if d.before and d.after:
        cards.append((f"{_pct(d.before['exercises']['overall']['accuracy'])} → "
                      f"{_pct(d.after['exercises']['overall']['accuracy'])}", "held-out exercise accuracy"))
    if d.demo:
        cards.append((f"{sum(st.get('seconds', 0) for st in d.demo['stages'].values()) / 60:.1f} min",
                      f"stage time (budget {d.demo['options']['minutes']:g} min)"))
    s.blocks.append(Cards(cards))
    if d.demo:
        s.blocks.append(
            "The phi-1.5 recipe end to end at toy scale: a built-in offline teacher writes textbook-style "
            "documents with verified exercises, the corpus is deduplicated and decontaminated, a BPE tokenizer "
            "is trained on it, and a phi-architecture model is pretrained from scratch on this CPU with the "
            "report's optimizer recipe. The numbers below are for that tiny model; phi-1.5's own numbers "
            "(1.3B parameters, 150B tokens) appear only for scale.")
    return s


def config_section(d: ReportData) -> Section:
    s = Section("configuration", "Configuration")
    cfg = d.config or {}
    model = cfg.get("model") or {}
    if model:
        n = _params(model)
        s.blocks.append(("h3", "Model"))
        s.blocks.append(Table(["field", "value"], [
            ["preset", str(cfg.get("preset", "-"))], ["parameters", _f(n)],
            ["layers x width x heads", f"{model.get('n_layer')} x {model.get('d_model')} x {model.get('n_head')}"],
            ["MLP width", _f(model.get("d_ff") or 4 * int(model.get("d_model", 0)))],
            ["rotary dims / base", f"{model.get('rotary_dim')} / {model.get('rope_base')}"],
            ["vocab (embedding rows)", _f(model.get("vocab_size"))], ["context", _f(model.get("max_seq_len"))],
        ]))
    if cfg:
        s.blocks.append(("h3", "Training"))
        keys = [("optimizer", f"AdamW betas ({cfg.get('beta1')}, {cfg.get('beta2')}), eps {cfg.get('eps')}, "
                              f"weight decay {cfg.get('weight_decay')}"),
                ("learning rate", f"{cfg.get('lr')} {cfg.get('lr_schedule')}, warm-up {cfg.get('warmup_steps')} steps"),
                ("batch", f"{cfg.get('global_batch')} sequences x {cfg.get('seq_len')} tokens "
                          f"(micro {cfg.get('micro_batch')} x accum {cfg.get('grad_accum')})"),
                ("max steps", _f(cfg.get("max_steps"))), ("precision / device", f"{cfg.get('precision')} / "
                                                                             f"{cfg.get('device')}"),
                ("gradient clipping", str(cfg.get("grad_clip"))), ("seed", str(cfg.get("seed"))),
                ("data", str(cfg.get("data")))]
        s.blocks.append(Table(["setting", "value"], [[k, v] for k, v in keys]))
        if d.demo:
            s.blocks.append(
                "The report's recipe is AdamW (0.9, 0.98), eps 1e-7, weight decay 0.1, constant LR 2e-4 with no "
                f"warm-up, 2048 x 2048-token batches. The demo keeps that shape but uses LR {cfg.get('lr')} and "
                f"{cfg.get('global_batch')} x {cfg.get('seq_len')}-token batches: a model this small, given minutes "
                "of CPU, learns far more from many small steps at a higher rate.")
    if d.demo and d.demo.get("train_plan"):
        train_stats = (d.demo.get("stages", {}).get("train") or {}).get("stats") or {}
        s.blocks.append(time_plan_sentence(d.demo["train_plan"], train_stats))
    s.blocks.append(f"Machine: {_machine()}.")
    return s



def time_plan_sentence(plan: dict[str, Any], stats: dict[str, Any]) -> str:
    """What the budget planned and what training did: the calibration gives only an estimate, the
    trainer re-plans from its measured rate and stops when the time budget is spent."""
    budget = plan.get("time_budget_s", plan.get("train_budget_seconds"))
    text = (f"Time plan: {budget:.0f} s of the budget were left for training; the calibration steps measured "
            f"{plan['calibrated_step_seconds']} s/step")
    if plan.get("estimated_steps") is not None:
        text += f" (about {plan['estimated_steps']:,} steps)"
    text += ", and the trainer re-planned from its measured rate as it went"
    if stats.get("steps"):
        text += f": it trained {stats['steps']:,} steps"
        if stats.get("train_elapsed") is not None:
            text += f" in {stats['train_elapsed']:.0f} s"
        if stats.get("stopped_by"):
            text += f", stopped by {stats['stopped_by']}"
    if plan.get("min_steps"):
        text += (f". It never trains fewer than {plan['min_steps']:,} steps, the fewest at which this model "
                 "shows learning, even when a busy machine makes that overrun the budget")
    return text + "."


def _params(model: dict[str, Any]) -> int | None:
    try:
        from phibook.model.config import PhiConfig

        return PhiConfig.from_dict(model).num_params()
    except Exception:  # noqa: BLE001 - an unknown config layout just leaves the count out
        return None


def data_section(d: ReportData) -> Section | None:
    if not d.demo:
        return None
    st = {k: v.get("stats", {}) for k, v in d.demo["stages"].items()}
    s = Section("data", "Data")
    rows = []
    if "synth" in st:
        rows.append(["synthetic documents (built-in teacher)", _f(st["synth"].get("documents"))])
        if st["synth"].get("text_documents"):
            rows.append(["documents from --text files", _f(st["synth"]["text_documents"])])
    if "clean" in st:
        rows.append(["kept after cleaning", _f(st["clean"].get("kept"))])
    if "tokenizer" in st:
        rows.append(["tokenizer vocabulary (BPE)", f"{_f(st['tokenizer'].get('vocab_size'))} "
                                                   f"(asked for {_f(st['tokenizer'].get('target_vocab_size'))})"])
    if "tokenize" in st:
        t = st["tokenize"]
        rows.append(["tokens: train / validation", f"{_f(t.get('train_tokens'))} / {_f(t.get('val_tokens'))}"])
        rows.append(["documents: train / validation", f"{_f(t.get('train_documents'))} / {_f(t.get('val_documents'))}"])
        rows.append(["characters per token", _f(t.get("chars_per_token"), 2)])
    if d.entropy is not None:
        rows.append(["unigram entropy of the training tokens", f"{d.entropy:.3f} nats/token"])
    s.blocks.append(Table(["", "value"], rows))
    c = st.get("clean")
    if c:
        s.blocks.append(("h3", "What cleaning removed"))
        removed = c.get("removed") or {}
        reasons = ["exact_duplicate", "near_duplicate", "benchmark_contamination", "too_short", "too_long", "repetitive"]
        reasons += [r for r in removed if r not in reasons]
        s.blocks.append(Table(["reason", "documents removed"], [[r.replace("_", " "), _f(removed.get(r, 0))]
                                                               for r in reasons], numeric={1}))
        against = c.get("decontaminated_against")
        s.blocks.append(f"Read {_f(c.get('read'))} documents, kept {_f(c.get('kept'))}. Decontamination: "
                        + (f"13-gram overlap with {_f(c.get('benchmark_ngrams'))} benchmark n-grams from {against}."
                           if against else "skipped (no benchmark files found)."))
        ex = (d.clean or {}).get("examples") or {}
        shown = [(r, e) for r, items in ex.items() for e in items[:2]]
        if shown:
            s.blocks.append(Table(["reason", "document", "detail"],
                                  [[r.replace("_", " "), e["id"], e["detail"][:120]] for r, e in shown[:8]]))
    return s


def training_section(d: ReportData, images: list[Image]) -> Section:
    s = Section("training", "Training")
    png = loss_plot(d)
    if png:
        img = Image("report-loss.png", png, "train and validation loss against step and tokens")
        images.append(img)
        s.blocks.append(img)
        s.blocks.append("The dashed line is the unigram entropy of the training tokens: the loss of the best "
                        "model that ignores context. Validation loss is measured on held-out documents "
                        + ("(the first point is the untrained model)." if d.before else "."))
    else:
        s.blocks.append("No metrics.jsonl records yet.")
    png = throughput_plot(d)
    if png:
        img = Image("report-throughput.png", png, "training tokens per second against step")
        images.append(img)
        s.blocks.append(img)
    if d.metrics:
        last = d.metrics[-1]
        vals = [r for r in d.metrics if r.get("val_loss") is not None]
        tps = sorted(r["tokens_per_s"] for r in d.metrics if r.get("tokens_per_s"))
        rows = [["steps", _f(last["step"])], ["tokens trained", _f(last.get("tokens"))],
                ["final train loss", _f(last.get("loss"))],
                ["final validation loss", _f(vals[-1]["val_loss"]) if vals else "-"],
                ["median tokens/s", _f(tps[len(tps) // 2], 0) if tps else "-"],
                ["median MFU", _pct(sorted(r.get("mfu", 0) for r in d.metrics)[len(d.metrics) // 2])],
                ["training time", f"{_f(last.get('elapsed'), 1)} s"]]
        s.blocks.append(Table(["", "value"], rows))
    return s


# A kind is "learned" when its held-out accuracy beats both the step-0 model and chance by at least this
# much, and by two standard errors of the after-training accuracy (a 40-question kind: about 10-16 points).
LEARNED_MARGIN = 0.10


def _kind_info(kind: str) -> tuple[float, str]:
    """(chance, why_hard) from the kind's definition next to its generator; unknown kinds get (0, "")."""
    from phibook.data.synth.exercises import KINDS

    info = KINDS.get(kind)
    return (info.chance, info.why_hard) if info else (0.0, "")


def kind_verdicts(before: dict[str, Any], after: dict[str, Any],
                  notes: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per kind: before, after, chance and whether the model learned it, from the eval JSON.

    "learned": after >= max(before, chance) + max(LEARNED_MARGIN, 2 standard errors);
    "format only": above the step-0 model by that margin but not above chance (it answers in the
    right shape, picking an option, without the skill); "not learned": neither. Kinds in ``notes``
    with no held-out questions get "no held-out questions".
    """
    bk, ak = before["exercises"]["per_kind"], after["exercises"]["per_kind"]
    out: dict[str, dict[str, Any]] = {}
    for kind, a in ak.items():
        chance, why = _kind_info(kind)
        b = bk.get(kind, {}).get("accuracy", 0.0)
        p, n = a["accuracy"], max(1, a["n"])
        margin = max(LEARNED_MARGIN, 2 * math.sqrt(max(p * (1 - p), 1 / n) / n))
        if p >= max(b, chance) + margin:
            verdict = "learned"
        elif p >= b + margin:
            verdict = "format only"
        else:
            verdict = "not learned"
        out[kind] = {"before": b, "after": p, "n": a["n"], "chance": chance, "margin": margin,
                     "verdict": verdict, "why_hard": why}
    for kind in notes or {}:
        if kind not in out:
            chance, why = _kind_info(kind)
            out[kind] = {"before": None, "after": None, "n": 0, "chance": chance, "margin": None,
                         "verdict": "no held-out questions", "why_hard": why, "note": notes[kind]}
    return out


def learned_paragraphs(verdicts: dict[str, dict[str, Any]]) -> list[Any]:
    """The sentence naming what the model learned and the "not learned at this scale, and why" paragraph."""
    def name(k: str) -> str:
        return k.replace("_", " ")

    learned = [k for k, v in verdicts.items() if v["verdict"] == "learned"]
    rest = [k for k, v in verdicts.items() if v["verdict"] != "learned"]
    blocks: list[Any] = []
    if learned:
        blocks.append("Learned (a clear gain on questions it never saw): " + ", ".join(
            f"{name(k)} ({_pct(verdicts[k]['before'])} → {_pct(verdicts[k]['after'])})" for k in learned) + ".")
    else:
        blocks.append("Learned: no kind gained clearly over the step-0 model and chance in this run.")
    if rest:
        blocks.append(("h3", "Not learned at this scale, and why"))
        for k in rest:
            v = verdicts[k]
            if v["verdict"] == "no held-out questions":
                what = f"not scored ({v['note']})"
            elif v["verdict"] == "format only":
                what = (f"{_pct(v['before'])} → {_pct(v['after'])}, no better than chance ({_pct(v['chance'])}): "
                        "it learned the answer's shape, not the skill")
            else:
                what = f"{_pct(v['before'])} → {_pct(v['after'])}"
            blocks.append(f"{name(k)}: {what}. " + (f"Why: {v['why_hard']}." if v["why_hard"] else ""))
    return blocks


def exercises_section(d: ReportData, images: list[Image]) -> Section | None:
    if not (d.before and d.after):
        return None
    s = Section("exercises", "Held-out exercises: before and after training")
    notes = (d.heldout or {}).get("notes") or {}
    s.blocks.append(
        "Exercises from the built-in teacher's generators with a different seed, keeping only questions that "
        f"appear in none of the {(d.heldout or {}).get('training_questions', 0):,} training exercises. Prompt "
        "\"Question: {q}\\nAnswer:\", greedy decoding, the answer cut at the end of its first sentence, exact "
        "match (phibook.data.synth.exercises.extract_answer). Before = the step-0 model (the trainer's init).")
    png = accuracy_plot(d.before, d.after)
    if png:
        img = Image("report-exercises.png", png, "held-out exercise accuracy before and after training")
        images.append(img)
        s.blocks.append(img)
    rows = []
    bk, ak = d.before["exercises"]["per_kind"], d.after["exercises"]["per_kind"]
    verdicts = kind_verdicts(d.before, d.after, notes)
    for kind, a in ak.items():
        b = bk.get(kind, {})
        v = verdicts[kind]
        gain = a["accuracy"] - b.get("accuracy", 0.0)
        rows.append([kind.replace("_", " "), _f(a["n"]), _pct(v["chance"]), f"{_pct(b.get('accuracy'))}",
                     f"{_pct(a['accuracy'])} ({a['correct']}/{a['n']})", f"{100 * gain:+.1f}", v["verdict"]])
    bo, ao = d.before["exercises"]["overall"], d.after["exercises"]["overall"]
    rows.append(["overall", _f(ao["n"]), "", _pct(bo["accuracy"]), f"{_pct(ao['accuracy'])} ({ao['correct']}/{ao['n']})",
                 f"{100 * (ao['accuracy'] - bo['accuracy']):+.1f}", ""])
    s.blocks.append(Table(["kind", "questions", "chance", "before (step 0)", "after training", "change (points)",
                           "verdict"], rows, numeric={1, 2, 3, 4, 5}))
    s.blocks.append("Chance is what answering in the right format without the skill would score (picking one of "
                    "the options the question names); a kind counts as learned when it gains at least "
                    f"{100 * LEARNED_MARGIN:.0f} points (and two standard errors) over both the step-0 model and "
                    "chance.")
    s.blocks.extend(learned_paragraphs(verdicts))
    for kind, note in notes.items():
        if kind in ak:  # (kinds with no held-out question are explained with the not-learned ones)
            s.blocks.append(f"{kind.replace('_', ' ')}: {note}.")
    # One right and one wrong answer of each kind, where there are any.
    shown = []
    for kind in ak:
        for ok in (True, False):
            shown += [r for r in d.after["exercises"]["items"] if r["kind"] == kind and r["correct"] == ok][:1]
    if shown:
        s.blocks.append(("h3", "Examples (after training)"))
        s.blocks.append(Table(["", "kind", "question", "expected", "model said"],
                              [["✓" if r["correct"] else "✗", r["kind"].replace("_", " "), r["question"][:200],
                                r["answer"], r["output"].strip()[:90] or "(nothing)"] for r in shown]))
    return s


def benchmarks_section(d: ReportData) -> Section | None:
    s = Section("benchmarks", "Benchmarks beside the report's numbers")
    from phibook.eval import report_numbers as rn

    if d.after:
        mc_after, mc_before = d.after.get("benchmarks", {}), (d.before or {}).get("benchmarks", {})
        if not mc_after.get("results"):
            reason = mc_after.get("skipped") or "no benchmark files were found"
            s.blocks.append(f"Skipped: {reason}.")
            return s
        s.blocks.append(
            f"Zero-shot multiple choice with lm-evaluation-harness's prompts (phibook eval), the first "
            f"{mc_after.get('limit')} items of each benchmark in {mc_after.get('data_dir')}. Our model is a "
            "toy: expect chance level. phi-1.5's column is the report's (Tables 2-3: 1.3B parameters, "
            "150B training tokens), shown only for scale: it is not the same model or the same item subset.")
        before_limit = mc_before.get("limit")
        if before_limit is not None and mc_after.get("limit") is not None and before_limit < mc_after["limit"]:
            s.blocks.append(
                f"The step-0 column is on the first {before_limit} items of each benchmark only (the untrained "
                "model's scoring is capped to bound the baseline stage's time), so it and the trained column are "
                "comparable in expectation, not item for item.")
        rows = []
        for task, entry in mc_after["results"].items():
            metric = entry.get("report_metric") or "acc"
            before = (mc_before.get("results") or {}).get(task, {}).get(metric)
            rows.append([task, _f(entry.get("n")), _f(CHANCE.get(task)), _f(before), _f(entry.get(metric)),
                         rn.report_cell(rn.PHI15, task)])
        s.blocks.append(Table(["task", "n", "chance", "our model, step 0", "our model, trained",
                               "phi-1.5 1.3B (report)"], rows, numeric={1, 2, 3, 4, 5}))
        missing = mc_after.get("missing") or {}
        if missing:
            s.blocks.append("Not found: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
        return s
    if d.eval_results:
        for name, res in d.eval_results:
            rows = []
            for task, entry in res["results"].items():
                metric = entry.get("report_metric") or "acc"
                rows.append([task, _f(entry.get("n")), _f(entry.get(metric)), rn.report_cell(rn.PHI15, task)])
            s.blocks.append(("h3", name))
            s.blocks.append(Table(["task", "n", "ours", "phi-1.5 1.3B (report)"], rows, numeric={1, 2, 3}))
        return s
    return None


def samples_section(d: ReportData) -> Section | None:
    if not d.samples:
        return None
    s = Section("samples", "Sample generations")
    s.blocks.append(f"One greedy generation in each of the report's prompt formats (section 5; "
                    f"phibook/inference/templates.py), repetition penalty 1.1, from {d.samples.get('model')}. "
                    "The prompt is highlighted.")
    for smp in d.samples["samples"]:
        s.blocks.append(("h3", f"{smp['format']}"))
        s.blocks.append(Pre(_shown(smp), prompt=smp["prompt"]))
    return s


def _shown(sample: dict[str, Any]) -> str:
    """A completion for display: runs of blank lines (an undertrained model emits many) folded."""
    if sample.get("finish_reason") == "skipped":
        return f"[skipped: {sample.get('note', '')}]"
    text = re.sub(r"\n{3,}", "\n\n", sample["completion"]).rstrip()
    if not text.strip():
        return "[no text: the model produced only whitespace or stopped at once]"
    return text + ("" if sample.get("finish_reason") != "length" else " [...]")


def timings_section(d: ReportData) -> Section | None:
    if not d.demo:
        return None

    s = Section("timings", "Timings")
    st = d.demo["stages"]
    rows, total = [], 0.0
    tk = st.get("tokenize", {}).get("stats", {})
    corpus = (tk.get("train_tokens") or 0) + (tk.get("val_tokens") or 0)
    for name in STAGES:
        if name not in st:
            continue
        rec, stats = st[name], st[name].get("stats", {})
        secs = float(rec.get("seconds", 0))
        total += secs
        rows.append([name, STAGE_TITLES[name], _f(secs, 1), _rate(name, stats, secs, corpus), rec.get("load", "")])
    rows.append(["total", "", _f(total, 1), "", ""])
    s.blocks.append(Table(["stage", "what", "seconds", "throughput", "load avg (1 min)"], rows, numeric={2, 3}))
    s.blocks.append(f"Stage seconds are this machine's wall time for the run that finished each stage "
                    f"(the demo was started {d.demo.get('runs', 1)} time(s); a rerun reuses finished stages).")
    return s


def _rate(name: str, stats: dict[str, Any], secs: float, corpus_tokens: int) -> str:
    """Throughput of a stage; the data stages all handle the same corpus, so they are
    compared in corpus tokens (as the demo's tokenizer counts them) per second."""
    if not secs:
        return ""
    if name in ("synth", "clean", "tokenizer", "tokenize") and corpus_tokens:
        docs = {"synth": stats.get("documents"), "clean": stats.get("read")}.get(name)
        extra = f", {docs / secs:,.0f} docs/s" if docs else ""
        return f"{corpus_tokens / secs:,.0f} tokens/s{extra}"
    if name == "train" and stats.get("tokens_per_s_median"):
        return f"{stats['tokens_per_s_median']:,.0f} tokens/s (median step)"
    if name == "samples" and stats.get("tokens"):
        return f"{stats['tokens'] / secs:,.1f} tokens/s (incl. load)"
    return ""


def build_sections(d: ReportData) -> tuple[list[Section], list[Image]]:
    images: list[Image] = []
    sections = [summary_section(d), config_section(d), data_section(d), training_section(d, images),
                exercises_section(d, images), benchmarks_section(d), samples_section(d), timings_section(d)]
    return [s for s in sections if s is not None], images


# --------------------------------------------------------------------------- rendering


def _md_table(t: Table) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, t.header)) + " |",
             "|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.header))) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", subtitle, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, str):
                out += [b, ""]
            elif isinstance(b, tuple):
                out += [f"### {b[1]}", ""]
            elif isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Image):
                out += [f"![{b.alt}]({b.name})", ""]
            elif isinstance(b, Pre):
                out += ["```text", b.prompt + b.text, "```", ""]
            elif isinstance(b, Cards):
                out += ["".join(f"- **{v}** {label}\n" for v, label in b.items)]
    return "\n".join(out).rstrip() + "\n"


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    e = html.escape
    nav = "".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections)
    body = [f"<h1>{e(title)}</h1>", f'<p class="lead">{e(subtitle)}</p>', f"<nav>{nav}</nav>"]
    for s in sections:
        body.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, str):
                body.append(f"<p>{e(b)}</p>")
            elif isinstance(b, tuple):
                body.append(f"<h3>{e(b[1])}</h3>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{e(h)}</th>" for h in b.header)
                rows = "".join(
                    "<tr>" + "".join(f'<td{" class=num" if i in b.numeric else ""}>{e(str(c))}</td>'
                                     for i, c in enumerate(r)) + "</tr>" for r in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                body.append(f'<img src="data:image/png;base64,{data}" alt="{e(b.alt)}">')
            elif isinstance(b, Pre):
                body.append(f'<pre><span class="prompt">{e(b.prompt)}</span>{e(b.text)}</pre>')
            elif isinstance(b, Cards):
                body.append('<div class="cards">' + "".join(
                    f'<div class="card"><b>{e(v)}</b><span>{e(label)}</span></div>' for v, label in b.items) + "</div>")
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def write_report(path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write report.md, report.html (and the Markdown's PNGs) for a demo or run directory.

    A pure renderer: it reads what the directory holds (and samples.json in
    ``out``, where `phibook report` writes a plain run's samples) and never
    loads or runs a model.
    """
    d = gather(path)
    out = Path(out) if out else d.root
    out.mkdir(parents=True, exist_ok=True)
    if d.samples is None:
        d.samples = _load(out / "samples.json")
    sections, images = build_sections(d)
    if d.demo:
        title = "phibook demo report"
        subtitle = (f"The phi-1.5 recipe on a {d.demo['options']['minutes']:g}-minute CPU budget; "
                    f"output directory {d.root.resolve()}; started {d.demo.get('created', '?')}.")
    else:
        title = f"phibook training report: {d.root.name}"
        subtitle = f"Run directory {d.root.resolve()}."
    for img in images:
        write_bytes(out / img.name, img.png)
    write_bytes(out / "report.md", render_markdown(title, subtitle, sections).encode("utf-8"))
    write_bytes(out / "report.html", render_html(title, subtitle, sections).encode("utf-8"))
    return [out / "report.md", out / "report.html"] + [out / img.name for img in images]
