"""A checked PipelineConfig -> datatrove steps -> one executor per step, run in order.

Each stage becomes a few datatrove steps (a step = one executor: a list of
blocks run by ``tasks`` tasks). Document stages run ``--tasks`` tasks; the
steps that must see every task's output at once run one task.

    synth     make     (N)  SynthBlock -> writer                       -> OUT/synth/
    filter    score    (N)  reader -> QualityFilter -> writer          -> OUT/filter/
    clean     1 filter (N)  reader -> length/repetition -> decontamination
                            -> writer(.work) -> DedupSignature (MinHash stage 1)
              2 buckets (B) datatrove MinhashDedupBuckets (B = LSH bands)
              3 cluster (1) DedupCluster: exact + confirmed near duplicates, first kept
              4 keep   (N)  reader(.work) -> datatrove MinhashDedupFilter -> writer -> OUT/clean/
              5 report (1)  CleanReport                                 -> OUT/clean/report.json
    tokenize  1 units  (N)  TokenizeUnits                               -> OUT/tokenize/.work/
              2 shards (1)  TokenizeAssemble                            -> OUT/tokenize/ + manifest.json

Resume is datatrove's: each step's logging folder (LOGS/<stage>/<step>/)
holds a completion marker per finished task, and a rerun runs only the
tasks without one (and skips whole finished steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phibook import io
from phibook.data.options import CleanConfig
from phibook.errors import PhibookError
from phibook.options import from_table
from phibook.pipeline.config import PipelineConfig

STATE = ".phibook-pipeline.json"
WORK = ".work"
EXECUTORS = ("local", "slurm", "ray")


@dataclass
class Step:
    stage: str
    name: str
    blocks: list[Any]
    tasks: int

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.name}"


def clean_config(opts: dict[str, Any]) -> CleanConfig:
    return from_table(CleanConfig, opts)


def benchmark_cache(cfg: PipelineConfig, work: Path) -> tuple[str | None, int]:
    """The benchmark n-gram hashes, computed once here (not in every task) into WORK/clean/."""
    import numpy as np

    from phibook.data.clean import benchmark_ngrams

    opts = cfg.options["clean"]
    if not opts["benchmarks"]:
        return None, 0
    root = Path(opts["benchmarks"])
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    key = hashlib.sha256(json.dumps([str(root), opts["ngram"], files]).encode()).hexdigest()[:16]
    path = work / "clean" / f"benchmark-ngrams-{key}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        grams = benchmark_ngrams(root, opts["ngram"])
        with io.open_atomic(path, "wb") as f:
            np.save(f, grams)
    return str(path), int(np.load(path, mmap_mode="r").shape[0])


def build_steps(cfg: PipelineConfig, tasks: int) -> list[Step]:
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

    from phibook.pipeline import blocks as b

    out, work = cfg.output, cfg.output / WORK
    steps: list[Step] = []
    files = [str(p.resolve()) for p in cfg.inputs] if cfg.inputs else None
    prev_dir: str | None = None  # the previous document stage's folder (None: read the input files)
    skip_bad = bool(cfg.options.get("clean", {}).get("skip_bad"))

    def reader(counts_dir: str | None = None) -> Any:
        if prev_dir is None:
            return b.PhibookReader(files=files, skip_bad=skip_bad, counts_dir=counts_dir)
        return b.PhibookReader(stage_dir=prev_dir, counts_dir=counts_dir)

    for stage in cfg.stages:
        opts = cfg.options[stage]
        stage_out = str(out / stage)
        if stage == "synth":
            steps.append(Step(stage, "make", [b.SynthBlock(str(work / "synth"), opts), b.PhibookWriter(stage_out),
                                              b.task_done_point], tasks))
        elif stage == "filter":
            flt = b.QualityFilter(str(work / "filter" / "counts"), opts["classifier"], opts["threshold"],
                                  opts["embedder"], opts["batch_size"])
            steps.append(Step(stage, "score", [reader(), flt, b.PhibookWriter(stage_out), b.task_done_point], tasks))
        elif stage == "clean":
            ccfg = clean_config(opts)
            cwork = work / "clean"
            counts = str(cwork / "counts")
            ngrams, n_grams = benchmark_cache(cfg, work)
            first = [reader(counts), b.LengthRepetitionFilter(counts, ccfg)]
            if ngrams:
                first.append(b.DecontaminationFilter(counts, ngrams, ccfg.ngram))
            first += [b.PhibookWriter(str(cwork / "filtered")), b.DedupSignature(str(cwork), ccfg)]
            steps.append(Step(stage, "1-filter", first, tasks))
            if ccfg.near_dup:
                mh = b.minhash_config(ccfg)
                steps.append(Step(stage, "2-buckets", [MinhashDedupBuckets(
                    input_folder=str(cwork / "minhash"), output_folder=str(cwork / "buckets"), config=mh)],
                    mh.num_buckets))
            steps.append(Step(stage, "3-cluster", [b.DedupCluster(str(cwork), ccfg, tasks)], 1))
            steps.append(Step(stage, "4-keep", [
                b.PhibookReader(stage_dir=str(cwork / "filtered")),
                MinhashDedupFilter(input_folder=str(cwork / "remove")),
                b.PhibookWriter(stage_out), b.task_done_point], tasks))
            inputs = [str(p) for p in cfg.inputs] if prev_dir is None else [prev_dir]
            steps.append(Step(stage, "5-report", [b.CleanReport(str(cwork), stage_out, inputs, n_grams, tasks)], 1))
        elif stage == "tokenize":
            args = (stage_out, opts, files if prev_dir is None else None, prev_dir, tasks)
            steps.append(Step(stage, "1-units", [b.TokenizeUnits(*args), b.task_done_point], tasks))
            steps.append(Step(stage, "2-shards", [b.TokenizeAssemble(*args)], 1))
        if stage != "tokenize":
            prev_dir = stage_out
    return steps


def check_state(cfg: PipelineConfig, tasks: int) -> dict[str, Any]:
    """A rerun must use the same tasks and stages, or task r's files would mean something else."""
    state = {"stages": cfg.stages, "tasks": tasks, "inputs": [str(p.resolve()) for p in cfg.inputs]}
    path = cfg.output / STATE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old and old != state:
            what = [k for k in state if old.get(k) != state[k]]
            raise PhibookError(
                f"{cfg.output} was started with other {' and '.join(what)} ({', '.join(f'{k}={old.get(k)}' for k in what)}); "
                f"rerun with the same settings to continue it, or use a new output folder"
            )
    return state


def make_executor(kind: str, step: Step, logs: Path, workers: int, cfg: PipelineConfig, depends: Any = None) -> Any:
    logging_dir = str(logs / step.stage / step.name)
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(step.blocks, tasks=step.tasks, workers=max(1, min(workers, step.tasks)),
                                     logging_dir=logging_dir)
    if kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        ray_opts = cfg.options["ray"]
        return RayPipelineExecutor(step.blocks, tasks=step.tasks, workers=max(1, min(workers, step.tasks)),
                                   logging_dir=logging_dir, cpus_per_task=ray_opts["cpus_per_task"],
                                   mem_per_cpu_gb=ray_opts["mem_per_cpu_gb"])
    from datatrove.executor.slurm import SlurmPipelineExecutor

    s = cfg.options["slurm"]
    return SlurmPipelineExecutor(
        step.blocks, tasks=step.tasks, time=s["time"], partition=s["partition"], cpus_per_task=s["cpus_per_task"],
        mem_per_cpu_gb=s["mem_per_cpu_gb"], workers=workers if workers > 0 else -1,
        job_name=f"{s['job_name']}-{step.stage}-{step.name}", qos=s["qos"], env_command=s["env_command"],
        sbatch_args=s["sbatch_args"], depends=depends, logging_dir=logging_dir,
        slurm_logs_folder=str(logs / "slurm" / step.stage / step.name),
    )


def _say(msg: str) -> None:
    print(f"phibook pipeline: {msg}", file=sys.stderr, flush=True)


def run_pipeline(cfg: PipelineConfig, executor: str = "local", tasks: int = 1, workers: int = 1,
                 logs: str | Path | None = None) -> list[dict[str, Any]]:
    """Run (or, for Slurm, submit) every step; returns one record per step (seconds, tasks)."""
    if executor not in EXECUTORS:
        raise PhibookError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if tasks < 1 or workers < (0 if executor == "slurm" else 1):
        raise PhibookError(f"--tasks and --workers must be >= 1, got {tasks} and {workers}")
    if executor == "slurm" and not cfg.options["slurm"]["partition"]:
        raise PhibookError(f"{cfg.path}: --executor slurm needs [slurm] partition = \"NAME\" (and time, "
                           "cpus_per_task, env_command as your cluster wants)")
    logs = Path(logs) if logs else cfg.output / ".logs"
    state = check_state(cfg, tasks)
    steps = build_steps(cfg, tasks)  # computes the benchmark n-grams: the last check that can fail
    cfg.output.mkdir(parents=True, exist_ok=True)
    io.write_json(cfg.output / STATE, state)
    # Fault points in the task processes take down everything under this process (phibook.faults.kill_tree).
    os.environ["PHIBOOK_PIPELINE_ROOT"] = str(os.getpid())
    if executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.options["ray"]["address"] or os.environ.get("RAY_ADDRESS"),
                     log_to_driver=False)
    records = []
    if executor == "slurm":
        chain: list[Any] = []
        for step in steps:
            chain.append(make_executor("slurm", step, logs, workers, cfg, depends=chain[-1] if chain else None))
        chain[-1].run()  # submits the whole chain, each job array depending on the one before
        records = [{"step": step.label, "job_id": ex.job_id} for step, ex in zip(steps, chain)]
        _say(f"submitted {len(steps)} Slurm job arrays; logs and launch scripts under {logs}")
        return records
    for step in steps:
        ex = make_executor(executor, step, logs, workers, cfg)
        start = time.perf_counter()
        try:
            ex.run()
        except PhibookError:
            raise
        except Exception as exc:  # a task's crash arrives here through the pool; name the step and its logs
            raise PhibookError(f"step {step.label} failed ({type(exc).__name__}: {exc}); task logs under "
                               f"{logs / step.stage / step.name}/logs; fix and rerun to continue") from exc
        incomplete = ex.get_incomplete_ranks(skip_completed=True)
        if incomplete:
            raise PhibookError(f"step {step.label}: tasks {incomplete} did not finish; see {logs / step.stage / step.name}"
                               "/logs and rerun to retry them")
        seconds = time.perf_counter() - start
        records.append({"step": step.label, "tasks": step.tasks, "seconds": round(seconds, 3)})
        _say(f"{step.label}: {step.tasks} tasks done in {seconds:.1f}s")
    return records
