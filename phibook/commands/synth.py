"""`phibook synth run|topics`: synthetic textbook data from a teacher."""

from __future__ import annotations

import argparse
import sys

from phibook.data.options import SynthOptions, TeacherOptions
from phibook.options import add_flags


def _add_teacher_args(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("teacher"), TeacherOptions)


def make_teacher(args: argparse.Namespace, templates=None):
    """The teacher these options describe (phibook.data.synth.teachers.teacher_from_options, which the
    pipeline's synth block calls too); imported lazily so `phibook --help` stays light."""
    from phibook.data.synth.teachers import teacher_from_options

    return teacher_from_options(args, templates)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate synthetic textbook data with a teacher",
                       description="Synthetic textbook-quality data (report section 2.2).")
    verbs = p.add_subparsers(dest="synth_command", metavar="SUBVERB", required=True)

    r = verbs.add_parser(
        "run", help="generate documents (resumable, shardable)",
        description="Plan --num-docs documents from topics x templates (a pure function of --seed), ask the "
        "teacher for each and append them to --out as document JSONL. Kill it and rerun: it continues "
        "with exactly the missing documents. Failed documents are logged to OUT.failures.jsonl and "
        "retried by the next run.",
    )
    _add_teacher_args(r)
    add_flags(r, SynthOptions, skip=("seed", "concurrency"))
    r.add_argument("--out", required=True, help="output document JSONL (appended to; resumable)")
    r.add_argument("--shard", default="0/1", help="i/N: make only documents with index %% N == i")
    add_flags(r, SynthOptions, only=("seed", "concurrency"))
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run_cmd)

    t = verbs.add_parser("topics", help="expand seed topics into N topics",
                         description="Expand the seed taxonomy into --num deduplicated topics with a teacher.")
    _add_teacher_args(t)
    t.add_argument("--seeds", default=None, help="seed topic file (default: built-in taxonomy)")
    t.add_argument("--num", type=int, required=True, help="how many topics to produce (the report used 20K)")
    t.add_argument("--out", required=True, help="topic file to write")
    t.set_defaults(func=topics_cmd)


def run_cmd(args: argparse.Namespace) -> int:
    from phibook.data.synth.prompts import load_templates, load_topics, load_web_samples
    from phibook.data.synth.run import parse_shard, run_synth

    shard = parse_shard(args.shard)
    topics = load_topics(args.topics)
    templates = load_templates(args.templates)
    web = load_web_samples(args.web_samples) if args.web_samples else None
    teacher = make_teacher(args, templates)
    stats = run_synth(args.out, args.num_docs, teacher, topics, templates, web, args.seed, shard,
                      args.concurrency, progress=not args.no_progress)
    print(f"synth: {stats.summary()} -> {args.out}", file=sys.stderr)
    if stats.failed:
        print(f"synth: {stats.failed} documents failed (see {args.out}.failures.jsonl); rerun to retry them",
              file=sys.stderr)
    return 0


def topics_cmd(args: argparse.Namespace) -> int:
    from phibook.data.synth.prompts import load_topics
    from phibook.data.synth.topics import expand_topics, write_topics

    seeds = load_topics(args.seeds)
    topics = expand_topics(seeds, args.num, make_teacher(args))
    write_topics(topics, args.out)
    print(f"synth topics: {len(topics)} topics from {len(seeds)} seeds -> {args.out}", file=sys.stderr)
    return 0
