"""`phibook eval`: run the report's benchmarks on a checkpoint and print them beside the report's numbers."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Evaluate a checkpoint (a phibook checkpoint, a training run directory, or a Hugging Face phi
directory such as the released phi-1.5) on the report's benchmarks, with lm-evaluation-harness's
prompts and metrics: zero-shot winogrande, arc_easy, arc_challenge, boolq, siqa, piqa, hellaswag,
openbookqa (acc, acc_norm) and 2-shot mmlu (per subject + average), plus the generative tasks
registered by other modules. Prints a compact table (task, metric, value ± stderr, n; --compare adds
the report's Tables 2-4 beside ours) and writes a results JSON.

Benchmark files are local; nothing is downloaded. They are looked for in --data-dir, else
$PHIBOOK_DATA_DIR, else ../shared/benchmarks beside the current directory or the repository
(the same rule as `phibook demo`): one folder per task, holding either the original release files
(arc_easy/ARC-Easy-Test.jsonl, boolq/val.jsonl, piqa/valid.jsonl + valid-labels.lst,
mmlu/{dev,test}/*.csv, ...) or a Hugging Face hub copy of the split, as parquet or jsonl
(arc_easy/ARC-Easy/test-00000-of-00001.parquet, piqa/validation.jsonl, ...). The layout is detected
from the file and printed per task. See docs/eval.md for where to get each file.
"""

EPILOG = """\
examples:
  phibook eval --model runs/phi-small --tasks arc_easy,boolq --data-dir ~/benchmarks --limit 100
  phibook eval --model ~/phi-1_5 --tasks all --data-dir ~/benchmarks --output phi15.json --batch-size 32
  phibook eval --model ~/phi-1_5 --tasks humaneval --data-dir ~/benchmarks --samples 20 --temperature 0.8

Prompts longer than the model's context are cut from the left, as lm-evaluation-harness does:
log-likelihood contexts keep what fits with the continuation; generation prompts keep their last
max(context - max_new_tokens, context / 2) tokens. The command prints a warning per task, and
the results JSON counts them per task ("truncated").
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a checkpoint on the report's benchmarks",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH",
                   help="checkpoint directory, training run directory (newest checkpoint), or HF phi directory")
    p.add_argument("--tasks", required=True, metavar="LIST",
                   help="comma-separated task names, or 'all' (every registered task); "
                        "'list' prints the known names and exits")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder of benchmark files, one subfolder per task (default: $PHIBOOK_DATA_DIR, else "
                        "../shared/benchmarks beside the current directory or the repository); nothing is downloaded")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N documents of each task (per subject for mmlu)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="continuation rows per forward pass for log-likelihoods; prompts per batch for generation "
                        "(default: 16)")
    p.add_argument("--output", metavar="FILE.json", default=None,
                   help="write the results JSON here (atomically); default: print the table only")
    p.add_argument("--compare", action="store_true",
                   help="print the report's numbers beside ours: columns task, metric, n, ours ± stderr, "
                        "phi-1.5 (report) and each peer model of the report's Tables 2-4 (default: the compact "
                        "table task, metric, value ± stderr, n)")
    p.add_argument("--log-samples", action="store_true",
                   help="include per-document records (prompts, log-likelihoods, metrics) in the results JSON")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="code tasks (humaneval, mbpp): N sampled programs per problem and the unbiased "
                        "pass@k for k in 1, 10, 100 up to N (default: 1 greedy program, pass@1)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="code tasks: sampling temperature (default: 0 = greedy with one sample, 0.8 with "
                        "--samples > 1); top_p is 0.95 when sampling")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="UNSAFE: run model-written programs (humaneval, mbpp, gsm8k) without the bubblewrap jail, "
                        "with only resource limits: they can read your files and reach the network. Without this "
                        "flag, a code task stops at once when the jail cannot be built or verified. The results "
                        "JSON records which way programs ran.")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    from phibook.commands.generate import add_dtype_arg, add_quant_args

    add_dtype_arg(p, "fp32", "weight dtype (default: fp32, so scores match lm-evaluation-harness; auto picks bf16 "
                  "only on CPUs with native bf16 (AVX512-BF16 or AMX) or on CUDA, else fp32). Log-probabilities "
                  "are always computed in float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_quant_args(p)
    p.set_defaults(func=run)


def resolve_tasks(spec: str) -> list[str]:
    from phibook.errors import PhibookError
    from phibook.eval.task import task_names

    known = task_names()
    if spec.strip() == "all":
        # "all" means the report's benchmarks: mmlu's per-subject tasks are inside "mmlu".
        return [n for n in known if not n.startswith("mmlu_")]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise PhibookError("--tasks is empty; give a comma-separated list or 'all'")
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(n for n in known if not n.startswith("mmlu_")) + ", mmlu_<subject>"
        raise PhibookError(f"unknown task(s) {', '.join(unknown)}; known tasks: {shown}")
    return list(dict.fromkeys(names))


def build_tasks(names: list[str], samples: int | None, temperature: float | None) -> list:
    """Task instances; --samples/--temperature go to the code tasks (and are refused without one)."""
    from phibook.errors import PhibookError
    from phibook.eval.generative import CodeTask
    from phibook.eval.task import TASKS, get_task, load_task_modules

    load_task_modules()
    code = [n for n in names if n in TASKS and issubclass(TASKS[n], CodeTask)]
    if (samples is not None or temperature is not None) and not code:
        flags = " and ".join(f for f, v in (("--samples", samples), ("--temperature", temperature)) if v is not None)
        known = ", ".join(sorted(n for n, cls in TASKS.items() if issubclass(cls, CodeTask)))
        raise PhibookError(f"{flags} only apply to the code tasks ({known}); none is in --tasks")
    if temperature is not None and not (temperature >= 0 and temperature < float("inf")):
        raise PhibookError(f"--temperature must be a finite number >= 0, got {temperature}")
    options = {}
    if samples is not None:
        options["samples"] = samples
    if temperature is not None:
        options["temperature"] = temperature
    return [get_task(n, **options) if n in code else get_task(n) for n in names]


def check_sandbox(tasks: list, unsafe: bool) -> dict | None:
    """For tasks that run model-written code: the verified jail (or the unsafe mode), else a
    clear error now, before the model loads. None when no task runs code."""
    from phibook.sandbox import runner as sandbox

    code_tasks = [task for task in tasks if task.runs_code]
    if not code_tasks:
        return None
    if unsafe:
        for task in code_tasks:
            task.unsafe_sandbox = True
        print("phibook eval: warning: --unsafe-no-sandbox: model-written programs run WITHOUT the jail "
              "(no namespaces, no seccomp; they can read your files and use the network)", file=sys.stderr)
        return sandbox.describe(unsafe=True)
    sandbox.require_sandbox()
    return sandbox.describe()


def truncation_warning(task, outcome: dict, context: int) -> str | None:
    """One line saying how many requests were cut to fit the model's context, and how."""
    n = outcome.get("truncated", 0)
    if not n:
        return None
    if task.output_type == "generate":
        from phibook.eval.runner import prompt_keep

        new = getattr(task, "max_new_tokens", None) or 0
        keep = prompt_keep(context, new)
        return (f"phibook eval: warning: {task.name}: {n} of {outcome.get('n_requests', '?')} prompts did not fit "
                f"the model's context of {context} tokens with {new} new tokens; each kept its last {keep} tokens "
                f"(left truncation, as lm-evaluation-harness does; up to {min(new, context - keep)} new tokens); "
                "programs and scores still use the full prompt")
    return (f"phibook eval: warning: {task.name}: {n} of {outcome.get('n_requests', '?')} requests were longer "
            f"than the model's context of {context} tokens; their contexts lost their first tokens so that "
            "context + continuation fit (left truncation, as lm-evaluation-harness does)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phibook.errors import PhibookError
    from phibook.eval.data_dir import require_data_dir
    from phibook.eval.task import task_names

    if args.tasks.strip() == "list":
        print("\n".join(task_names()))
        return 0
    if args.limit is not None and args.limit < 1:
        raise PhibookError(f"--limit must be >= 1, got {args.limit}")
    names = resolve_tasks(args.tasks)
    data_dir = require_data_dir(args.data_dir)
    tasks = build_tasks(names, args.samples, args.temperature)
    # Read every task's files before loading the model, so a missing file fails in a second;
    # say which files, in which layout, each task reads.
    for task in tasks:
        task.load_docs(data_dir, 1)
        source = getattr(task, "data_source", None)
        if source is not None:
            print(f"phibook eval: {task.name}: {source.describe()}", file=sys.stderr)
    sandbox = check_sandbox(tasks, args.unsafe_no_sandbox)

    from phibook.eval.results import build_results, format_table, task_entry
    from phibook.eval.runner import Runner, run_task
    from phibook.inference.load import load_inference_model
    from phibook.io import write_json

    # The loader of generate, chat and serve. With --quant the model's linears become int8/int4
    # modules; the runner uses the model unchanged.
    loaded = load_inference_model(args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                  save_quant=args.save_quant)
    dtype = loaded.model.embed.weight.dtype  # what was used (auto's choice); never quantized
    if loaded.tokenizer is None:
        raise PhibookError(f"{args.model}: no tokenizer.json found beside the model; evaluation needs one")
    runner = Runner(loaded.model, loaded.tokenizer, batch_size=args.batch_size, progress=not args.no_progress)

    entries, samples = {}, {}
    for task in tasks:
        outcome = run_task(runner, task, data_dir, args.limit, log_samples=args.log_samples)
        entries[task.name] = task_entry(task, outcome)
        if args.log_samples:
            samples[task.name] = outcome["samples"]
        warning = truncation_warning(task, outcome, loaded.config.max_seq_len)
        if warning:
            print(warning, file=sys.stderr)
    results = build_results(
        entries,
        model_path=str(loaded.path),
        fingerprint=loaded.fingerprint,
        source=loaded.source,
        limit=args.limit,
        batch_size=args.batch_size,
        data_dir=str(Path(data_dir).resolve()),
        device=args.device,
        dtype=str(dtype).removeprefix("torch.") + (f"+{args.quant}" if args.quant else ""),
        samples=samples if args.log_samples else None,
        sandbox=sandbox,
    )
    print(format_table(results, compare=args.compare))
    if args.output:
        # allow_nan=False: a NaN metric is a bug to see, not a JSON file other tools cannot read.
        write_json(args.output, results, ensure_ascii=False, allow_nan=False, default=str)
        print(f"results written to {Path(args.output)}", file=sys.stderr)
    return 0
