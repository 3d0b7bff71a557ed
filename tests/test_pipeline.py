"""`phibook pipeline run`: datatrove pipelines give what the single-machine verbs give.

Planted data: real textbook paragraphs in six input files (so four tasks each
read different files), with exact copies, near copies and benchmark questions
planted in other files than their originals, i.e. across task boundaries.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from phibook.cli import main as cli_main  # noqa: E402
from phibook.data.clean import CleanConfig, clean, shingle_set, words  # noqa: E402
from phibook.data.shards import load_manifest  # noqa: E402
from phibook.data.tokenize import tokenize_inputs  # noqa: E402
from phibook.model.tokenizer import Tokenizer, train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOOKS = "corpora/library_of_phi/textbooks"
TOML = """\
[pipeline]
input = ["raw/*.jsonl"]
output = "{out}"
stages = ["clean", "tokenize"]

[clean]
near_dup_threshold = 0.8
benchmarks = "bench"

[tokenize]
tokenizer = "tok"
shard_tokens = 9000
val_fraction = 0.1
{extra}"""


def _jaccard(a: str, b: str) -> float:
    x, y = shingle_set(words(a), 5), shingle_set(words(b), 5)
    return len(x & y) / len(x | y)


def _paragraphs(shared: Path, n: int) -> list[str]:
    """Distinct real paragraphs, none a natural near duplicate of another (so only planted ones count)."""
    out: list[str] = []
    for path in sorted((shared / BOOKS).glob("*.md")):
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            para = " ".join(para.split())
            if len(para.split()) < 60 or para.startswith(("#", "|", "$")):
                continue
            if all(_jaccard(para, p) < 0.3 for p in out[-40:]) and para not in out:
                out.append(para)
                if len(out) == n:
                    return out
    return out


@pytest.fixture(scope="module")
def planted(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    paras = _paragraphs(shared_dir, 60)
    assert len(paras) == 60
    files: list[list[dict]] = [[] for _ in range(6)]
    for i, p in enumerate(paras):
        files[i % 6].append({"id": f"d{i}", "text": p, "source": "books", "meta": {"i": i}})
    # Copies go into the file three places on (another task's share under --tasks 4).
    for i in range(0, 30, 6):
        files[(i + 3) % 6].append({"id": f"exact{i}", "text": "  " + paras[i].upper() + " ", "source": "dup"})
    for i in range(1, 31, 6):
        w = paras[i].split()
        w[-1] = "zebra"
        files[(i + 3) % 6].append({"id": f"near{i}", "text": " ".join(w), "source": "dup", "meta": {}})
    arc = [json.loads(x) for x in (shared_dir / "benchmarks/arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines()]
    for k, q in enumerate([q for q in arc if len(q["question"]["stem"].split()) >= 16][:4]):
        files[5 - k].append({"id": f"bench{k}", "text": f"A quiz for our class today. {q['question']['stem']} Think."})
    files[2].append({"id": "short", "text": "too short"})
    raw = root / "raw"
    raw.mkdir()
    for k, docs in enumerate(files):
        random.Random(k).shuffle(docs)
        (raw / f"part-{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bench").mkdir()
    shutil.copy(shared_dir / "benchmarks/arc_easy/ARC-Easy-Test.jsonl", root / "bench")
    train_bpe([next((shared_dir / BOOKS).glob("*Interfacial*.md"))], 400, root / "tok")
    return {"root": root, "inputs": sorted(raw.glob("*.jsonl"))}


def _toml(root: Path, out: str, extra: str = "", name: str | None = None) -> Path:
    path = root / (name or f"{out}.toml")
    path.write_text(TOML.format(out=out, extra=extra))
    return path


def _run(toml: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "phibook.cli", "pipeline", "run", str(toml), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=toml.parent,
                          env={**os.environ, **(env or {})})


def _outputs(out: Path) -> dict[str, bytes]:
    """Every result file of a run, by relative name (logs and work folders excluded)."""
    found = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            data = p.read_bytes()
            if p.name == "manifest.json":  # paths inside differ between output folders
                m = json.loads(data)
                data = json.dumps([m["shards"][i]["sha256"] for i in range(len(m["shards"]))]).encode()
            found[str(rel)] = data
    return found


@pytest.fixture(scope="module")
def local_run(planted: dict) -> Path:
    r = _run(_toml(planted["root"], "out_local"), "--tasks", "4", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return planted["root"] / "out_local"


@pytest.fixture(scope="module")
def single(planted: dict) -> dict:
    """The single-machine verbs over the concatenated input: the reference."""
    root = planted["root"]
    report = clean(planted["inputs"], root / "single.jsonl", CleanConfig(near_dup_threshold=0.8),
                   benchmarks=root / "bench", report_path=root / "single.report.json", progress=False)
    tokenize_inputs([root / "single.jsonl"], root / "tok", root / "single_tok", val_fraction=0.1,
                    shard_tokens=9000, workers=1, progress=False)
    return {"report": report, "clean": root / "single.jsonl", "tok": root / "single_tok"}


def test_local_four_tasks_equals_single_machine_clean_and_tokenize(planted: dict, local_run: Path,
                                                                   single: dict) -> None:
    # The kept documents, byte for byte and in input order, whatever task found each duplicate.
    parts = sorted((local_run / "clean").glob("*.jsonl"))
    assert [p.name for p in parts] == [f"{r:05d}.jsonl" for r in range(4)]
    assert b"".join(p.read_bytes() for p in parts) == single["clean"].read_bytes()
    rep = json.loads((local_run / "clean" / "report.json").read_text())
    ref = json.loads((planted["root"] / "single.report.json").read_text())
    assert rep["removed"] == ref["removed"] == {"exact_duplicate": 5, "near_duplicate": 5,
                                                 "benchmark_contamination": 4, "too_short": 1}
    assert (rep["read"], rep["kept"]) == (ref["read"], ref["kept"]) == (75, 60)
    assert rep["examples"] == ref["examples"]
    assert rep["tasks"] == 4

    # Token shards: phibook's format, byte-identical to `phibook tokenize` over the single-machine output.
    manifest = load_manifest(local_run / "tokenize")
    manifest.validate_files()
    ref_m = load_manifest(single["tok"])
    assert [(s.file, s.split, s.tokens, s.documents, s.sha256) for s in manifest.shards] == \
        [(s.file, s.split, s.tokens, s.documents, s.sha256) for s in ref_m.shards]
    assert len(manifest.split_shards("train")) >= 2 and manifest.split_shards("val")
    # ... and they decode to the kept documents.
    tok = Tokenizer.from_file(local_run / "tokenize" / "tokenizer.json")
    decoded = []
    for shard in manifest.shards:
        ids = manifest.open_shard(shard).astype(np.int64)
        ends = np.flatnonzero(ids == manifest.eos_id)
        starts = np.r_[0, ends[:-1] + 1]
        decoded += [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)]
    kept = [json.loads(line)["text"] for line in single["clean"].read_text().splitlines()]
    assert sorted(decoded) == sorted(kept)
    assert not (local_run / "tokenize" / ".work").exists()


def test_killed_pipeline_reruns_to_identical_output(planted: dict, local_run: Path) -> None:
    toml = _toml(planted["root"], "out_kill")
    out = planted["root"] / "out_kill"
    # Killed inside a task (a half-written output file on disk) ...
    r = _run(toml, "--tasks", "4", "--workers", "2", env={"PHIBOOK_FAULT_INJECT": "pipeline.doc_written@4"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert list((out / ".work" / "clean" / "filtered").glob(".*.tmp-*")), "the kill left no partial file"
    assert not (out / "clean" / "report.json").exists()
    # ... then, on the rerun, after task 2 of some later step has finished but before it is marked done.
    r = _run(toml, "--tasks", "4", "--workers", "2", env={"PHIBOOK_FAULT_INJECT": "pipeline.task_done@2"})
    assert r.returncode == -9, r.stderr[-2000:]
    r = _run(toml, "--tasks", "4", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # datatrove's completion markers were used: finished steps and tasks were skipped, not redone
    assert "have already been completed" in r.stderr and "already completed tasks" in r.stderr
    assert _outputs(out) == _outputs(local_run)
    # A finished pipeline rerun does nothing and changes nothing.
    r = _run(toml, "--tasks", "4", "--workers", "2")
    assert r.returncode == 0 and _outputs(out) == _outputs(local_run)


def test_rerun_with_other_task_count_is_refused(planted: dict, local_run: Path) -> None:
    code = cli_main(["pipeline", "run", str(_toml(planted["root"], "out_local")), "--tasks", "3"])
    assert code == 2


BAD = {
    "unknown_stage": ('stages = ["clean", "tokenize"]', 'stages = ["clean", "tokenise"]',
                      "unknown stage 'tokenise'; did you mean 'tokenize'?"),
    "unknown_option": ("near_dup_threshold = 0.8", "near_dup_treshold = 0.8",
                       "[clean] unknown option 'near_dup_treshold'; did you mean 'near_dup_threshold'"),
    "missing_folder": ('input = ["raw/*.jsonl"]', 'input = ["nowhere/*.jsonl"]', "folder"),
    "glob_matches_nothing": ('input = ["raw/*.jsonl"]', 'input = ["raw/*.parquet"]', "matches no files"),
    "dedup_after_tokenize": ('stages = ["clean", "tokenize"]', 'stages = ["tokenize", "clean"]',
                             "'clean' cannot come after 'tokenize'"),
    "missing_tokenizer": ('tokenizer = "tok"', 'tokenizer = "no_tok"', "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_is_one_clear_error_before_anything_runs(planted: dict, case: str, capsys) -> None:
    old, new, message = BAD[case]
    text = TOML.format(out=f"out_bad_{case}", extra="")
    assert old in text
    toml = planted["root"] / f"bad_{case}.toml"
    toml.write_text(text.replace(old, new))
    code = cli_main(["pipeline", "run", str(toml), "--tasks", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and str(toml) in err and "Traceback" not in err
    if case == "missing_folder":
        assert "nowhere" in err and "does not exist" in err
    assert not (planted["root"] / f"out_bad_{case}").exists()


def test_bad_pipeline_exit_code_from_the_command_line(planted: dict) -> None:
    toml = planted["root"] / "bad_cli.toml"
    toml.write_text(TOML.format(out="out_bad_cli", extra="[tokenize2]\nx = 1\n").replace("[tokenize]\n", "[tokenize]\n"))
    r = _run(toml)
    assert r.returncode == 2
    assert "unknown table [tokenize2]; did you mean 'tokenize'?" in r.stderr and "Traceback" not in r.stderr
    assert not (planted["root"] / "out_bad_cli").exists()


def _slurm_submit(planted: dict, tmp_path: Path, out: str) -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    """Submit the planted pipeline to a stand-in `sbatch` on PATH that records each call."""
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "sbatch_calls.jsonl"
    (shim / "sbatch").write_text(f"""#!{sys.executable}
import json, sys
calls = open({str(calls)!r}, "a")
n = sum(1 for _ in open({str(calls)!r})) if calls.tell() else 0
calls.write(json.dumps({{"args": sys.argv[1:-1], "script": open(sys.argv[-1]).read()}}) + "\\n")
print(f"Submitted batch job {{1000 + n}}")
""")
    (shim / "sbatch").chmod(0o755)
    (shim / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames` inside a task
    (shim / "scontrol").chmod(0o755)
    extra = '[slurm]\npartition = "cpu"\ntime = "02:00:00"\ncpus_per_task = 2\nenv_command = "source venv/bin/activate"\n'
    toml = _toml(planted["root"], out, extra)
    r = _run(toml, "--executor", "slurm", "--tasks", "4", env={"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"})
    jobs = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return r, jobs, shim


def test_slurm_submits_the_chain_of_job_arrays(planted: dict, tmp_path: Path) -> None:
    """No cluster here: a stand-in `sbatch` on PATH records what datatrove would submit."""
    r, jobs, _ = _slurm_submit(planted, tmp_path, "out_slurm")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.loads(r.stdout.strip().splitlines()[-1])["steps"]
    assert [s["step"] for s in steps] == ["clean/1-filter", "clean/2-buckets", "clean/3-cluster", "clean/4-keep",
                                          "clean/5-report", "tokenize/1-units", "tokenize/2-shards"]
    arrays = [j for j in jobs if "launch_pickled_pipeline" in j["script"]]
    assert len(arrays) == 7
    logs = planted["root"] / "out_slurm" / ".logs"
    want_tasks = [4, 9, 1, 4, 1, 4, 1]
    prev_id = None
    for step, job, tasks in zip(steps, arrays, want_tasks):
        script = job["script"]
        assert f"#SBATCH --array=0-{tasks - 1}\n" in script
        assert "#SBATCH --partition=cpu\n" in script and "#SBATCH --cpus-per-task=2\n" in script
        assert "#SBATCH --time=02:00:00\n" in script and "source venv/bin/activate" in script
        assert f"launch_pickled_pipeline {logs / step['step']}/executor.pik" in script
        assert (logs / step["step"] / "executor.pik").is_file()
        dep = [a for a in job["args"] if a.startswith("--dependency=")]
        assert dep == ([f"--dependency=afterok:{prev_id}"] if prev_id else [])
        prev_id = step["job_id"]
    # The pickled step is the real pipeline: 4 tasks of reader -> filters -> writer -> signatures.
    import dill

    ex = dill.loads((logs / "clean/1-filter/executor.pik").read_bytes())
    assert ex.world_size == 4
    assert [type(b).__name__ for b in ex.pipeline] == ["PhibookReader", "LengthRepetitionFilter",
                                                       "DecontaminationFilter", "PhibookWriter", "DedupSignature"]
    assert not (planted["root"] / "out_slurm" / "clean").exists()  # submitted, nothing ran here


@pytest.mark.slow
@pytest.mark.ci  # an acceptance check of the issue: CI runs it (with the datatrove and ray extras)
def test_ray_executor_gives_the_local_output(planted: dict, local_run: Path) -> None:
    """A Ray instance on loopback with 2 CPUs, started (and shut down) by this test; about 90 s here,
    most of it Ray's own start-up and per-task actors. Run it alone with:
    python -m pytest tests/test_pipeline.py -m slow -k ray"""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        r = _run(_toml(planted["root"], "out_ray"), "--executor", "ray", "--tasks", "4", "--workers", "2",
                 env={"RAY_ADDRESS": address})
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        ray.shutdown()
    assert _outputs(planted["root"] / "out_ray") == _outputs(local_run)


def test_synth_stage_makes_what_synth_run_makes(planted: dict) -> None:
    """The synthetic path's first stage: each task makes its share of the plan; together, the same
    documents (ids and texts) as `phibook synth run` with the same seed, then tokenized."""
    from phibook.data.synth.prompts import load_templates, load_topics
    from phibook.data.synth.run import run_synth
    from phibook.data.synth.teachers import BuiltinTeacher

    root = planted["root"]
    toml = root / "synth.toml"
    toml.write_text('[pipeline]\noutput = "out_synth"\nstages = ["synth", "tokenize"]\n'
                    '[synth]\nnum_docs = 20\nseed = 3\n[tokenize]\ntokenizer = "tok"\n')
    r = _run(toml, "--tasks", "3", "--workers", "2", "--logs", str(root / "synth_logs"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (root / "synth_logs" / "synth" / "make" / "completions").iterdir()) == \
        ["00000", "00001", "00002"]
    assert not (root / "out_synth" / ".logs").exists()
    templates = load_templates()
    run_synth(root / "single_synth.jsonl", 20, BuiltinTeacher(templates), load_topics(), templates, seed=3,
              progress=False)
    made = [json.loads(line) for p in sorted((root / "out_synth" / "synth").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    ref = [json.loads(line) for line in (root / "single_synth.jsonl").read_text().splitlines()]
    assert sorted((d["id"], d["text"]) for d in made) == sorted((d["id"], d["text"]) for d in ref)
    assert [d["meta"]["index"] for d in made] == [*range(0, 20, 3), *range(1, 20, 3), *range(2, 20, 3)]
    assert sum(s.documents for s in load_manifest(root / "out_synth" / "tokenize").shards) == 20


@pytest.mark.parametrize("name", ["phi-1.5-web.toml", "synthetic.toml"])
def test_shipped_examples_are_valid(name: str) -> None:
    import tomllib

    from phibook.pipeline.config import check_tables

    path = REPO / "examples" / "pipelines" / name
    stages, options = check_tables(path, tomllib.loads(path.read_text()))
    assert stages[-1] == "tokenize" and "clean" in stages
    assert options["tokenize"]["tokenizer"].endswith("shared/tokenizer/codegen-mono")


def test_synthetic_example_loads_as_shipped(shared_dir: Path) -> None:
    from phibook.pipeline.config import load_pipeline

    cfg = load_pipeline(REPO / "examples" / "pipelines" / "synthetic.toml")  # its ../shared paths resolve
    assert cfg.stages == ["synth", "clean", "tokenize"] and cfg.inputs == []


def test_filter_stage_keeps_what_filter_apply_keeps(planted: dict) -> None:
    """The phi-1.5-web path's first stage: the quality classifier as a datatrove filter block gives
    `phibook filter apply --threshold` 's kept documents and scores, byte for byte."""
    from phibook.data.filter.apply import apply_filter
    from phibook.data.filter.classifier import save_classifier, train
    from phibook.data.filter.embed import HashEmbedder, embed_texts

    root = planted["root"]
    docs = [json.loads(line) for p in planted["inputs"] for line in p.read_text().splitlines()]
    emb = HashEmbedder()
    X = embed_texts(emb, [d["text"] for d in docs], 64)
    y = np.array([d.get("source") == "books" for d in docs], dtype=int)
    model, _ = train(X, y, "logreg", 0.25, 0)
    save_classifier(root / "clf.joblib", model, {"embedder": emb.name, "embedder_spec": "hash", "dim": emb.dim,
                                                 "max_tokens": 512, "label_threshold": 3.0})
    toml = root / "filter.toml"
    toml.write_text('[pipeline]\ninput = ["raw/*.jsonl"]\noutput = "out_filter"\nstages = ["filter"]\n'
                    '[filter]\nclassifier = "clf.joblib"\nthreshold = 0.5\n')
    r = _run(toml, "--tasks", "3", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = apply_filter(planted["inputs"], root / "clf.joblib", root / "apply_out", threshold=0.5, progress=False)
    assert 0 < summary["kept"] < summary["total"]
    ours = b"".join(p.read_bytes() for p in sorted((root / "out_filter" / "filter").glob("*.jsonl")))
    ref = b"".join((root / "apply_out" / p.name).read_bytes() for p in planted["inputs"])
    assert ours == ref


@pytest.mark.slow
def test_slurm_job_arrays_run_to_the_local_output(planted: dict, local_run: Path, tmp_path: Path) -> None:
    """Plays the scheduler: runs every submitted array task (SLURM_ARRAY_TASK_ID=i, the pickled
    executor, as `launch_pickled_pipeline` does) in dependency order, then compares with the local run."""
    r, jobs, shim = _slurm_submit(planted, tmp_path, "out_slurm_run")
    assert r.returncode == 0, r.stderr[-3000:]
    play = ("import dill, os, sys\n"
            "for i in range(int(sys.argv[2])):\n"
            "    os.environ['SLURM_ARRAY_TASK_ID'] = str(i)\n"
            "    dill.load(open(sys.argv[1], 'rb')).run()\n")
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "SLURM_NODELIST": "localhost",
           "SLURM_JOB_ID": "1"}
    for job in jobs:
        if "launch_pickled_pipeline" not in job["script"]:
            continue  # datatrove's stats-merging jobs
        pik = job["script"].split("launch_pickled_pipeline ")[1].split()[0]
        size = int(job["script"].split("#SBATCH --array=0-")[1].split()[0]) + 1
        p = subprocess.run([sys.executable, "-c", play, pik, str(size)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    assert _outputs(planted["root"] / "out_slurm_run") == _outputs(local_run)
