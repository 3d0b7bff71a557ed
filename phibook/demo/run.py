"""`phibook demo`: the whole phi-1.5 recipe, small, on a laptop CPU, in a time budget.

Stages, in order, each a plain call into the stage's own module:

    synth      built-in teacher -> data/synth.jsonl (+ --text files -> data/text.jsonl)
    clean      dedup + decontamination -> data/clean.jsonl, data/clean_report.json
    tokenizer  byte-level BPE on the cleaned documents -> tokenizer/tokenizer.json
    tokenize   shards + manifest.json with a validation split -> shards/
    baseline   the step-0 model (init/) scored before training -> eval/before.json
    train      phi-tiny with the report's recipe -> run/ (metrics.jsonl, checkpoints/)
    evaluate   the trained model on the same items -> eval/after.json
    samples    one generation per report prompt format -> samples.json, samples.md
    report     report.md + report.html

Resumable through its own outputs: DIR/stages.json (written atomically after
each stage) records what finished, its outputs, stats and seconds. A rerun
skips ("reusing") every recorded stage whose outputs still exist; the stage
that was interrupted resumes through its module's own resumability (synth
appends, tokenize keeps finished units, train continues its newest checkpoint).

The time budget is the contract, kept by measurement: training first runs a
few calibration steps to size validation intervals and announce an estimate,
then trains with the trainer's ``time_budget_s`` (the remaining budget, minus
what the stages after training will need, estimated from the baseline stage):
the trainer stops at the step where its training time runs out, re-projecting
the final step from the recent rate as it goes, so a busy start does not shrink
the run. The plan and the trainer's checkpoints (which carry the training
seconds spent) are recorded, so a killed run resumes into the same budget.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibook import io
from phibook.demo.samples import SAMPLE_PROMPTS, sample_generations, write_samples
from phibook.demo.stages import PRESET, STAGE_TITLES, STAGES
from phibook.documents import read_documents
from phibook.errors import PhibookError

STATE_FILE = "stages.json"
FORMAT = "phibook-demo"

# Training recipe: the report's shape (AdamW 0.9/0.98, eps 1e-7, wd 0.1, constant LR, no
# warm-up, bf16 where the hardware has it) with two changes for a 4M-parameter model that
# gets minutes, not weeks: LR 2e-3 instead of 2e-4 (a tiny model at 2e-4 barely leaves the
# unigram plateau in a few hundred steps) and a global batch of 8 x 256 tokens instead of
# 2048 x 2048 (many small steps learn more per CPU-second at this size).
TRAIN_SETTINGS = {
    "lr": 2e-3,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "global_batch": 8,
    "micro_batch": 8,
    "seq_len": 256,
    "device": "cpu",
    "log_every": 25,
}
CALIBRATION_STEPS = 6
# The fewest steps the demo trains, whatever the budget: about 400K tokens, where phi-tiny has
# learned the exercises' answer format and beats the untrained model on held-out questions.
# Below it the report would show nothing learned, so a machine too slow (or too busy) for the
# budget overruns it, and says which of the two it is, rather than show nothing.
MIN_TRAIN_STEPS = 200
# The trainer's max_steps: this many times the calibration's estimate, room for a machine that
# was busy during calibration and quiet afterwards (the time budget, not this, ends training).
STEP_CAP_FACTOR = 10
# A checkpoint every this many seconds of training, so a kill loses little.
SAVE_EVERY_S = 20.0
# The untrained model is scored on at most this many items of each benchmark (it scores about
# chance, and this bounds the baseline stage's time); the trained model on mc_limit(minutes).
BASELINE_MC_LIMIT = 20
# Held-out answers are generated up to these stops: answer_span keeps only the text before the
# first newline and the first ". ", so nothing after them can change the score.
ANSWER_STOPS = ["\n", ". "]
VAL_FRACTION = 0.05
TOKENIZER_VOCAB = 4096
EVAL_SEQUENCES = 32
# Benchmarks scored on small --limit subsets (zero-shot multiple choice, the report's Tables 2-3).
MC_TASKS = ["winogrande", "arc_easy", "arc_challenge", "boolq", "siqa", "piqa", "hellaswag", "openbookqa"]


@dataclass
class DemoOptions:
    out: Path = Path("demo-out")
    minutes: float = 15.0
    texts: list[Path] = field(default_factory=list)
    data_dir: Path | None = None  # benchmark files; None = look in the usual places
    seed: int = 0
    progress: bool = True  # progress bars on stderr, every stage's and the trainer's

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a rerun must match it to reuse stages)."""
        return {"seed": self.seed, "texts": sorted(str(Path(t).resolve()) for t in self.texts)}


# --------------------------------------------------------------------------- sizes from the budget


def corpus_docs(minutes: float) -> int:
    """Documents to synthesize: about 100 tokens of corpus per second of budget (~320 tokens a
    document), so that training (a 2-core CPU reaches 1-4K tokens/s on phi-tiny) sees it a few times."""
    return max(300, round(minutes * 120))


def heldout_per_kind(minutes: float) -> int:
    return int(min(50, max(40, minutes * 4)))


def mc_limit(minutes: float) -> int:
    return int(min(100, max(10, minutes * 3)))


# --------------------------------------------------------------------------- state file


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PhibookError(f"cannot read {path}: {exc}") from exc


class StageState:
    """DIR/stages.json: which stages finished, with their outputs, stats and seconds."""

    def __init__(self, out: Path, opts: DemoOptions) -> None:
        self.path = out / STATE_FILE
        if self.path.exists():
            self.data = _read_json(self.path)
            if self.data.get("format") != FORMAT:
                raise PhibookError(f"{self.path} is not a phibook demo state file")
            if self.data.get("identity") != opts.identity():
                raise PhibookError(
                    f"{out} holds a demo run made with other options ({self.data.get('identity')}); "
                    "rerun with the same --seed and --text files, or choose another --out"
                )
        else:
            self.data = {"format": FORMAT, "version": 1, "identity": opts.identity(),
                         "options": {"minutes": opts.minutes, "seed": opts.seed,
                                     "texts": [str(t) for t in opts.texts]},
                         "created": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
        self.data.setdefault("runs", 0)
        self.data["runs"] += 1

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def done(self, name: str, out: Path) -> bool:
        rec = self.stages.get(name)
        return bool(rec) and all((out / p).exists() for p in rec.get("outputs", []))

    def record(self, name: str, seconds: float, outputs: list[str], stats: dict[str, Any]) -> None:
        self.stages[name] = {"seconds": round(seconds, 2), "outputs": outputs, "stats": stats,
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load": _load_average()}
        self.save()

    def save(self) -> None:
        io.write_json(self.path, self.data, ensure_ascii=False, default=str)

    def spent(self) -> float:
        return sum(float(s.get("seconds", 0)) for s in self.stages.values())


def _load_average() -> str:
    # Recorded per stage: the machine is shared, and timings mean little without it.
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# --------------------------------------------------------------------------- benchmark folder


def find_benchmarks(data_dir: str | Path | None) -> Path | None:
    """--data-dir, else $PHIBOOK_DATA_DIR, else ../shared/benchmarks beside the cwd or the repo:
    phibook eval's rule (phibook.eval.data_dir.find_data_dir); None when nothing is found."""
    from phibook.eval.data_dir import find_data_dir

    return find_data_dir(data_dir)


# --------------------------------------------------------------------------- stages 1-4: data


def text_documents(paths: list[Path], out: Path, max_chars: int = 4000) -> int:
    """--text files -> document JSONL: paragraphs grouped into documents of at most ~max_chars."""
    import hashlib

    docs = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise PhibookError(f"--text {path}: cannot read it ({exc})") from exc
        chunk: list[str] = []
        size = 0
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        for i, para in enumerate(paragraphs):
            chunk.append(para)
            size += len(para)
            if size >= max_chars or i == len(paragraphs) - 1:
                body = "\n\n".join(chunk)
                did = hashlib.sha1(f"{Path(path).name}\0{len(docs)}\0{body}".encode()).hexdigest()[:16]
                docs.append({"id": did, "text": body, "source": "text", "meta": {"file": str(path)}})
                chunk, size = [], 0
    if not docs:
        raise PhibookError("--text files hold no text: " + ", ".join(map(str, paths)))
    io.write_text(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return len(docs)


def stage_synth(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.data.synth.prompts import load_templates, load_topics
    from phibook.data.synth.run import run_synth
    from phibook.data.synth.teachers import BuiltinTeacher

    n = corpus_docs(ctx.opts.minutes)
    say(f"  the built-in offline teacher writes {n} textbook/exercise documents (verified worked solutions)")
    templates = load_templates()
    st = run_synth(ctx.out / "data/synth.jsonl", n, BuiltinTeacher(templates), load_topics(), templates,
                   seed=ctx.opts.seed, progress=ctx.opts.progress)
    outputs = ["data/synth.jsonl"]
    stats = {"documents": st.planned, "written_now": st.written, "reused": st.already_done,
             "failed": st.failed, "approx_tokens": st.completion_tokens,
             "chars": (ctx.out / "data/synth.jsonl").stat().st_size}
    if ctx.opts.texts:
        stats["text_documents"] = text_documents(ctx.opts.texts, ctx.out / "data/text.jsonl")
        outputs.append("data/text.jsonl")
        say(f"  + {stats['text_documents']} documents from --text files")
    return outputs, stats


def stage_clean(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.data.clean import CleanConfig, clean

    inputs = [ctx.out / p for p in ctx.state.stages["synth"]["outputs"]]
    bench = ctx.benchmarks
    say("  exact + MinHash near-duplicate removal, length/repetition filters, "
        + (f"13-gram decontamination against {bench}" if bench else "no benchmark files found: no decontamination"))
    rep = clean(inputs, ctx.out / "data/clean.jsonl", CleanConfig(), benchmarks=bench,
                report_path=ctx.out / "data/clean_report.json", progress=ctx.opts.progress)
    stats = {"read": rep.read, "kept": rep.kept, "removed": dict(rep.removed),
             "benchmark_ngrams": rep.benchmark_ngrams, "decontaminated_against": str(bench) if bench else None}
    return ["data/clean.jsonl", "data/clean_report.json"], stats


def stage_tokenizer(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.model.tokenizer import train_bpe

    say(f"  byte-level BPE (codegen/GPT-2 shape), up to {TOKENIZER_VOCAB} tokens, on the cleaned documents")
    tok = train_bpe([ctx.out / "data/clean.jsonl"], TOKENIZER_VOCAB, ctx.out / "tokenizer",
                    show_progress=ctx.opts.progress and sys.stderr.isatty())
    return ["tokenizer/tokenizer.json"], {"vocab_size": tok.vocab_size, "target_vocab_size": TOKENIZER_VOCAB,
                                          "fingerprint": tok.fingerprint}


def stage_tokenize(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.data.tokenize import tokenize_inputs

    say(f"  shards + manifest.json, {VAL_FRACTION:.0%} of documents held out for validation loss")
    src = ctx.out / "data/clean.jsonl"
    t0 = time.perf_counter()
    m = tokenize_inputs([src], ctx.out / "tokenizer/tokenizer.json", ctx.out / "shards",
                        val_fraction=VAL_FRACTION, workers=min(2, os.cpu_count() or 1), progress=ctx.opts.progress)
    secs = time.perf_counter() - t0
    train_tok, val_tok = m.total_tokens("train"), m.total_tokens("val")
    docs = {s: sum(x.documents for x in m.split_shards(s)) for s in ("train", "val")}
    chars = sum(len(doc["text"]) for doc in read_documents([src]))
    return ["shards/manifest.json"], {
        "train_tokens": train_tok, "val_tokens": val_tok, "train_documents": docs["train"],
        "val_documents": docs["val"], "chars": chars,
        "chars_per_token": round(chars / max(1, train_tok + val_tok), 3),
        "tokens_per_s": round((train_tok + val_tok) / secs, 1) if secs else None,
    }


# --------------------------------------------------------------------------- held-out exercises


def training_questions(paths: list[Path]) -> set[str]:
    """Every exercise question the training documents carry (the built-in teacher's meta)."""
    questions: set[str] = set()
    for doc in read_documents(paths):
        for e in (doc.get("meta") or {}).get("exercises") or []:
            questions.add(e["question"])
    return questions


def heldout_exercises(seen: set[str], per_kind: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Exercises from the same generators with another seed, none of whose questions is in ``seen``.

    Kinds whose whole question space is covered by training (one-digit facts, the ten Python
    functions) yield none; the note says so instead of scoring memorization as generalization.
    Every kind, the ones a model of the demo's size can learn in minutes
    (``KindInfo.difficulty == "minutes"``) and the ones out of its reach alike, gets ``per_kind``
    questions: enough for a per-kind accuracy the report can call learned or not.
    """
    from phibook.data.synth.exercises import KINDS

    items, notes = [], {}
    for kind, info in KINDS.items():
        want = per_kind
        rng = random.Random(f"phibook-demo-heldout:{seed}:{kind}")
        chosen: dict[str, Any] = {}
        draws = 0
        while len(chosen) < want and draws < want * 40:
            draws += 1
            e = info.make(rng)
            if e.question not in seen and e.question not in chosen:
                chosen[e.question] = e
        if not chosen:
            notes[kind] = f"no unseen question in {draws} draws: training covers this kind's question space"
        elif len(chosen) < want:
            notes[kind] = f"only {len(chosen)} unseen questions in {draws} draws"
        items += [{"kind": e.kind, "question": e.question, "answer": e.answer} for e in chosen.values()]
    return items, notes


NUMERIC_KINDS = ("fact", "arithmetic", "word_problem", "compare")


def answer_span(text: str, kind: str) -> str:
    """The answer in a continuation of "Question: q\\nAnswer:": the training layout is
    "Answer: {answer}. {explanation}", so cut at the first line and sentence end, then let
    ``extract_answer`` pick the number (arithmetic kinds) or the phrase."""
    from phibook.data.synth.exercises import extract_answer

    first = text.strip().split("\n", 1)[0]
    first = first.split(". ", 1)[0]
    if kind in NUMERIC_KINDS and not first.lstrip("-")[:1].isdigit():
        return ""  # the answer must lead: "What is 0 + 9?" is a new question, not the answer 0
    return extract_answer(first, kind)


def answer_tokens(tokenizer, items: list[dict[str, Any]]) -> int:
    """New tokens enough for the longest expected answer in ``items``: " {answer}." as the
    training layout writes it, plus 2 for a differently split answer."""
    return max((len(tokenizer.encode(f" {it['answer']}.")) for it in items), default=0) + 2


def score_exercises(gen, items: list[dict[str, Any]], progress: bool, batch: int = 32) -> dict[str, Any]:
    """Greedy answers to "Question: {q}\\nAnswer:", exact match after ``answer_span``.

    Generation is bounded (an untrained model never stops by itself): each batch gets the new
    tokens its longest expected answer needs (``answer_tokens``) and every row stops at
    ``ANSWER_STOPS``, past which ``answer_span`` reads nothing."""
    from tqdm import tqdm

    from phibook.inference.generate import SamplingParams

    rows = []
    caps, generated = [], 0
    bar = tqdm(total=len(items), desc="exercises", unit="q", disable=not progress, file=sys.stderr)
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        caps.append(answer_tokens(gen.tokenizer, chunk))
        params = SamplingParams(max_new_tokens=caps[-1], temperature=0.0, stop=list(ANSWER_STOPS))
        outs = gen.generate([f"Question: {it['question']}\nAnswer:" for it in chunk], params)
        for it, out in zip(chunk, outs, strict=True):
            got = answer_span(out.text, it["kind"])
            rows.append({**it, "output": out.text, "got": got, "correct": got == it["answer"]})
            generated += out.completion_tokens
        bar.update(len(chunk))
    bar.close()
    per_kind: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = per_kind.setdefault(r["kind"], {"n": 0, "correct": 0})
        k["n"] += 1
        k["correct"] += int(r["correct"])
    for k in per_kind.values():
        k["accuracy"] = k["correct"] / k["n"]
    n, c = len(rows), sum(r["correct"] for r in rows)
    generation = {"max_new_tokens": max(caps, default=0), "max_new_tokens_per_batch": caps,
                  "stop": list(ANSWER_STOPS), "generated_tokens": generated}
    return {"per_kind": per_kind, "overall": {"n": n, "correct": c, "accuracy": c / n if n else 0.0},
            "generation": generation, "items": rows}


def score_benchmarks(model, tokenizer, data_dir: Path | None, limit: int, progress: bool) -> dict[str, Any]:
    """Zero-shot multiple choice on the first ``limit`` items of each benchmark found."""
    from phibook.eval.results import task_entry
    from phibook.eval.runner import Runner, run_task
    from phibook.eval.task import get_task

    if data_dir is None:
        return {"skipped": "no benchmark folder found (pass --data-dir or set PHIBOOK_DATA_DIR)", "results": {}}
    runner = Runner(model, tokenizer, batch_size=32, progress=progress)
    results, missing = {}, {}
    for name in MC_TASKS:
        task = get_task(name)
        try:
            task.load_docs(data_dir, 1)
        except PhibookError as exc:
            missing[name] = str(exc)
            continue
        results[name] = task_entry(task, run_task(runner, task, data_dir, limit))
    return {"limit": limit, "data_dir": str(data_dir), "results": results, "missing": missing}


def evaluate_model(ctx: Demo, model_dir: Path, name: str, mc_cap: int | None = None) -> dict[str, Any]:
    """Held-out exercises + benchmark subsets for one checkpoint -> eval/{name}.json; ``mc_cap``
    bounds the items scored per benchmark (the baseline's cost), recorded beside the limit."""
    from phibook.inference.generate import Generator
    from phibook.weights.checkpoint import load_model

    loaded = load_model(model_dir)
    items = _read_json(ctx.out / "eval/heldout.json")["items"]
    gen = Generator(loaded.model, loaded.tokenizer)
    say(f"  {len(items)} held-out exercises, greedy, exact answer")
    t0 = time.perf_counter()
    ex = score_exercises(gen, items, ctx.opts.progress)
    ex_secs = time.perf_counter() - t0
    full = mc_limit(ctx.opts.minutes)
    limit = min(full, mc_cap) if mc_cap else full
    capped = f" (capped from {full} for the untrained model)" if limit < full else ""
    say(f"  benchmarks (zero-shot, first {limit} items each{capped}): "
        + (str(ctx.benchmarks) if ctx.benchmarks else "none found, skipped"))
    t0 = time.perf_counter()
    mc = score_benchmarks(loaded.model, loaded.tokenizer, ctx.benchmarks, limit, ctx.opts.progress)
    mc["limit_uncapped"] = full
    mc_secs = time.perf_counter() - t0
    from phibook.train.trainer import validation_loss

    val = validation_loss(loaded.model, ctx.out / "shards/manifest.json", TRAIN_SETTINGS["seq_len"], EVAL_SEQUENCES)
    result = {"model": str(model_dir), "exercises": ex, "benchmarks": mc, "val_loss": val,
              "seconds": {"exercises": round(ex_secs, 2), "benchmarks": round(mc_secs, 2)}}
    io.write_json(ctx.out / f"eval/{name}.json", result, ensure_ascii=False, default=str)
    o = ex["overall"]
    say(f"  exercise accuracy {o['correct']}/{o['n']} = {o['accuracy']:.1%}"
        + (f", validation loss {val:.3f}" if val is not None else ""))
    return result


def stage_baseline(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    """The step-0 model (the trainer's own init, same seed) saved to init/ and scored."""
    from phibook.model.tokenizer import Tokenizer
    from phibook.train.config import model_config
    from phibook.train.trainer import build_model
    from phibook.weights.checkpoint import save_checkpoint

    (ctx.out / "eval").mkdir(exist_ok=True)
    seen = training_questions([ctx.out / "data/clean.jsonl"])
    items, notes = heldout_exercises(seen, heldout_per_kind(ctx.opts.minutes), ctx.opts.seed)
    io.write_json(ctx.out / "eval/heldout.json", {"items": items, "notes": notes, "training_questions": len(seen)}, ensure_ascii=False, default=str)

    tok = Tokenizer.from_file(ctx.out / "tokenizer/tokenizer.json")
    cfg = ctx.train_config(max_steps=1)
    mcfg = model_config(cfg, tok.vocab_size, log=lambda m: None)
    model = build_model(mcfg, cfg.seed)  # the trainer's own step-0 model
    save_checkpoint(ctx.out / "init", model, tok)
    say(f"  step-0 model: {PRESET}, {mcfg.num_params() / 1e6:.1f}M parameters -> init/")
    res = evaluate_model(ctx, ctx.out / "init", "before", mc_cap=BASELINE_MC_LIMIT)
    gen = res["exercises"]["generation"]
    return ["init/model.safetensors", "eval/heldout.json", "eval/before.json"], {
        "heldout": len(items), "training_questions": len(seen), "accuracy": res["exercises"]["overall"]["accuracy"],
        "val_loss": res["val_loss"], "params": mcfg.num_params(), "eval_seconds": res["seconds"],
        # what bounds this stage's cost (the untrained model never stops generating by itself)
        "caps": {"max_new_tokens": gen["max_new_tokens"], "stop": gen["stop"],
                 "generated_tokens": gen["generated_tokens"],
                 "benchmark_items": res["benchmarks"].get("limit"),
                 "benchmark_items_uncapped": res["benchmarks"].get("limit_uncapped")},
    }


# --------------------------------------------------------------------------- training


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
    return out


def pick_precision(cpuinfo: str | None = None) -> tuple[str, str]:
    """(bf16 | fp32, why) from the CPU's features, not from a timing (under load a timing flips):
    bf16 autocast where bf16 matmuls run on bf16 units (AVX512-BF16 or AMX), else fp32, since
    bf16 would be converted to fp32 and back around every multiply."""
    from phibook.train.peak import precision_choice

    return precision_choice(cpuinfo)


def plan_steps(step_seconds: float, time_budget_s: float, elapsed: float, done_steps: int) -> dict[str, Any]:
    """The training plan from the calibration's rate: the trainer's time budget (the contract:
    training stops when it is spent, however many steps that is), the step estimate it implies
    (for validation intervals and the announcement), the floor and the cap of the step count."""
    estimate = done_steps + max(0, int((time_budget_s - elapsed) / step_seconds))
    planned = max(MIN_TRAIN_STEPS, estimate)
    return {
        "max_steps": planned,  # the estimate at calibration (time_budget_s decides the real count)
        "estimated_steps": estimate,
        "min_steps": MIN_TRAIN_STEPS,
        "step_cap": planned * STEP_CAP_FACTOR,
        "time_budget_s": round(time_budget_s, 1),
        "eval_every": max(1, planned // 15),
        "save_every_s": SAVE_EVERY_S,
    }


def main_train_config(ctx: Demo, plan: dict[str, Any]):
    """The trainer's settings for the planned run: stop when the time budget is spent."""
    return ctx.train_config(max_steps=plan["step_cap"], time_budget_s=plan["time_budget_s"],
                            min_steps=plan["min_steps"], eval_every=plan["eval_every"], save_every=0,
                            save_every_s=plan["save_every_s"])


def stage_train(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.train.peak import busy_note
    from phibook.train.trainer import train

    run_dir = ctx.out / "run"
    data = ctx.out / "shards/manifest.json"
    plan = ctx.state.data.get("train_plan")

    def go(cfg) -> None:
        resume = run_dir.is_dir() and any(run_dir.iterdir())
        rc = train(cfg, data, run_dir, resume=resume)
        if rc:
            raise PhibookError(f"training stopped with exit code {rc}; see {run_dir}")

    t0 = time.perf_counter()
    budget = ctx.train_budget()
    if "precision" not in ctx.state.data:
        ctx.state.data["precision"], ctx.state.data["precision_reason"] = pick_precision()
        ctx.state.save()
    say(f"  precision: {ctx.state.data['precision']} ({ctx.state.data.get('precision_reason', 'recorded')})")
    tokens_per_step = TRAIN_SETTINGS["global_batch"] * TRAIN_SETTINGS["seq_len"]
    if plan is None:
        say(f"  calibration: {CALIBRATION_STEPS} steps to measure this machine's speed")
        go(ctx.train_config(max_steps=CALIBRATION_STEPS, eval_every=0, save_every=CALIBRATION_STEPS))
        recs = read_metrics(run_dir)
        # Skip the first steps (allocator and thread warm-up); take the median of the rest.
        tps = sorted(r["tokens_per_s"] for r in recs[2:] or recs)
        step_s = tokens_per_step / tps[len(tps) // 2]
        # The trainer's budget counts its loop's seconds (its metrics' elapsed, continued across
        # runs); what this stage spends outside the loop (a trainer's setup: the calibration's,
        # and one more for the run) comes off it.
        elapsed = float(recs[-1].get("elapsed", 0.0))
        outside = max(0.0, time.perf_counter() - t0 - elapsed)
        plan = {**plan_steps(step_s, budget - 2 * outside, elapsed, len(recs)),
                "calibrated_step_seconds": round(step_s, 4), "train_budget_seconds": round(budget, 1)}
        ctx.state.data["train_plan"] = plan
        ctx.state.save()
        say(f"  plan: {step_s:.3f} s/step measured -> about {plan['estimated_steps']} steps "
            f"({plan['estimated_steps'] * tokens_per_step:,} tokens) in the {plan['time_budget_s']:.0f} s of "
            "training the budget leaves; training stops when those seconds are spent, re-measuring its rate "
            "as it goes")
        if plan["estimated_steps"] < MIN_TRAIN_STEPS:
            why = busy_note() or "this machine is too slow for the budget"
            say(f"  note: {why}: training at least the minimum of {MIN_TRAIN_STEPS} steps (about "
                f"{MIN_TRAIN_STEPS * step_s / 60:.1f} minutes at the calibration's rate), past the budget if "
                "the rate does not improve")
    else:
        say(f"  continuing the recorded plan: {plan['time_budget_s']:.0f} s of training, at least "
            f"{plan['min_steps']} steps")
    go(main_train_config(ctx, plan))
    recs = read_metrics(run_dir)
    last = recs[-1]
    vals = [r for r in recs if r.get("val_loss") is not None]
    tps = [r["tokens_per_s"] for r in recs]
    spent = float(last.get("elapsed", 0.0))
    stopped = ("the step cap" if last["step"] >= plan["step_cap"] else
               "the minimum step count, past the time budget" if last["step"] == plan["min_steps"]
               else "the time budget")
    say(f"  trained {last['step']} steps in {spent:.0f} s of training (estimated {plan['estimated_steps']} at "
        f"calibration; stopped by {stopped})")
    stats = {
        "steps": last["step"], "tokens": last["tokens"], "final_loss": last["loss"],
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "tokens_per_s_median": sorted(tps)[len(tps) // 2], "train_elapsed": last.get("elapsed"),
        "time_budget_s": plan["time_budget_s"], "estimated_steps": plan["estimated_steps"], "stopped_by": stopped,
        "mfu_median": sorted(r.get("mfu", 0.0) for r in recs)[len(recs) // 2],
        "precision": ctx.state.data["precision"], "precision_reason": ctx.state.data.get("precision_reason"),
        "preset": PRESET, **{k: TRAIN_SETTINGS[k] for k in ("lr", "global_batch", "seq_len")},
    }
    return ["run/metrics.jsonl", "run/config.resolved.json"], stats


# --------------------------------------------------------------------------- after training


def latest_model(run_dir: Path) -> Path:
    from phibook.weights.checkpoint import find_checkpoint

    return find_checkpoint(run_dir)


def stage_evaluate(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    model_dir = latest_model(ctx.out / "run")
    say(f"  the trained model ({model_dir.name}) on the same held-out items and benchmark subsets")
    res = evaluate_model(ctx, model_dir, "after")
    before = _read_json(ctx.out / "eval/before.json")
    return ["eval/after.json"], {
        "accuracy_before": before["exercises"]["overall"]["accuracy"],
        "accuracy_after": res["exercises"]["overall"]["accuracy"], "val_loss": res["val_loss"],
        "eval_seconds": res["seconds"],
    }


def stage_samples(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    model_dir = latest_model(ctx.out / "run")
    say(f"  one greedy generation in each of the report's formats: {', '.join(SAMPLE_PROMPTS)}")
    samples = sample_generations(model_dir, progress=ctx.opts.progress)
    write_samples(samples, ctx.out, model_dir)
    return ["samples.json", "samples.md"], {"samples": len(samples),
                                            "tokens": sum(s["tokens"] for s in samples)}


def stage_report(ctx: Demo) -> tuple[list[str], dict[str, Any]]:
    from phibook.demo.report import write_report

    paths = write_report(ctx.out, ctx.out)
    return [p.name for p in paths], {}


STAGE_FUNCS: dict[str, Callable[[Demo], tuple[list[str], dict[str, Any]]]] = {
    "synth": stage_synth, "clean": stage_clean, "tokenizer": stage_tokenizer, "tokenize": stage_tokenize,
    "baseline": stage_baseline, "train": stage_train, "evaluate": stage_evaluate, "samples": stage_samples,
    "report": stage_report,
}


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        if opts.minutes <= 0:
            raise PhibookError(f"--minutes must be > 0, got {opts.minutes}")
        self.out = Path(opts.out)
        if self.out.exists() and not self.out.is_dir():
            raise PhibookError(f"--out {self.out} exists and is not a directory")
        for t in opts.texts:
            if not Path(t).is_file():
                raise PhibookError(f"--text {t}: no such file")
        self.benchmarks = find_benchmarks(opts.data_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "data").mkdir(exist_ok=True)
        self.state = StageState(self.out, opts)
        recorded = self.state.data["options"]["minutes"]
        if recorded != opts.minutes:
            say(f"phibook demo: note: {self.out} was planned for --minutes {recorded}; keeping that budget")
            self.opts.minutes = recorded

    def train_config(self, **overrides):
        from phibook.train.config import resolve_config

        values = {**TRAIN_SETTINGS, "seed": self.opts.seed, "eval_sequences": EVAL_SEQUENCES,
                  "precision": self.state.data.get("precision", "fp32"), "progress": self.opts.progress,
                  **overrides}
        return resolve_config(preset=PRESET, values=values)

    def train_budget(self) -> float:
        """Seconds left for training: the budget minus the stages done, minus what the stages
        after training need, with a floor of 30 seconds. The evaluate stage does the baseline's
        work on the same model shape, except that it scores every benchmark item the baseline's
        cap left out, so its estimate is the baseline's seconds with the benchmark part scaled up."""
        rec = self.state.stages.get("baseline", {})
        base = float(rec.get("seconds", 30.0))
        stats = rec.get("stats", {})
        caps = stats.get("caps") or {}
        mc_secs = float((stats.get("eval_seconds") or {}).get("benchmarks", 0.0))
        if caps.get("benchmark_items") and caps.get("benchmark_items_uncapped"):
            base += mc_secs * (caps["benchmark_items_uncapped"] / caps["benchmark_items"] - 1)
        after = 1.1 * base + 15.0  # evaluate ~ the uncapped baseline; samples + report ~ 15 s
        return max(30.0, self.opts.minutes * 60 - self.state.spent() - after)

    def run(self) -> Path:
        start = time.perf_counter()
        say(f"phibook demo: {self.out} ({self.opts.minutes:g}-minute budget, seed {self.opts.seed})")
        for i, name in enumerate(STAGES, 1):
            title = f"[{i}/{len(STAGES)}] {name}: {STAGE_TITLES[name]}"
            if name != "report" and self.state.done(name, self.out):
                rec = self.state.stages[name]
                say(f"{title}\n  reusing {', '.join(rec['outputs'])} (finished {rec['finished']}, "
                    f"{rec['seconds']:.1f}s)")
                continue
            say(title)
            t0 = time.perf_counter()
            outputs, stats = STAGE_FUNCS[name](self)
            secs = time.perf_counter() - t0
            self.state.record(name, secs, outputs, stats)
            if name == "report":  # the report's timing table needs the report stage's own time too
                STAGE_FUNCS[name](self)
            say(f"  done in {secs:.1f}s")
        total = time.perf_counter() - start
        say(f"phibook demo: finished in {total:.0f}s this run ({self.state.spent():.0f}s of stage time in all); "
            f"open {self.out / 'report.html'}")
        return self.out / "report.html"


def run_demo(opts: DemoOptions) -> Path:
    """Run (or resume) the demo in ``opts.out``; returns the path of report.html."""
    return Demo(opts).run()


