"""The pipeline TOML: parsed and checked completely before any stage runs.

```toml
[pipeline]
input = ["raw/*.jsonl"]          # globs, relative to this file's folder
output = "out"                   # out/<stage>/ for each stage's documents
stages = ["clean", "tokenize"]

[clean]                          # the options of `phibook clean`, same names
near_dup_threshold = 0.8
benchmarks = "../shared/benchmarks"

[tokenize]                       # the options of `phibook tokenize`
tokenizer = "tok"
```

Every mistake found here is one PhibookError naming the file, the table and
the option (with the closest valid names), raised before any folder is made.
"""

from __future__ import annotations

import difflib
import glob
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibook.data.options import (
    CleanConfig,
    CleanInputs,
    FilterOptions,
    SynthOptions,
    TeacherOptions,
    TokenizeOptions,
)
from phibook.errors import PhibookError
from phibook.options import OptionSpec, specs

# Stages that make or change documents (out/<stage>/NNNNN.jsonl) and the one
# that turns them into token shards, which therefore has to come last.
DOCUMENT_STAGES = ("synth", "filter", "clean")
STAGES = (*DOCUMENT_STAGES, "tokenize")
EXECUTOR_TABLES = ("slurm", "ray")
INPUT_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")


def _spec(kind: type | tuple[type, ...], default: Any = None, help: str = "") -> OptionSpec:
    return OptionSpec(kind if isinstance(kind, tuple) else (kind,), default, help=help)


# The stage tables are built from the verbs' own option classes (phibook/data/options.py), so a
# name, default or help is declared once (flag --near-dup-threshold -> near_dup_threshold).
# Left out: [synth] api_key (keys belong in $OPENAI_API_KEY, not in a file that gets shared).
OPTIONS: dict[str, dict[str, OptionSpec]] = {
    "clean": {**specs(CleanConfig), **specs(CleanInputs)},
    "tokenize": specs(TokenizeOptions),
    "filter": specs(FilterOptions),
    "synth": {**specs(SynthOptions), **{k: v for k, v in specs(TeacherOptions).items() if k != "api_key"}},
    "slurm": {
        "partition": _spec(str, None, help="Slurm partition (required with --executor slurm)"),
        "time": _spec(str, "24:00:00"),
        "cpus_per_task": _spec(int, 1),
        "mem_per_cpu_gb": _spec((int, float), 2),
        "qos": _spec(str, "normal"),
        "env_command": _spec(str, None, help="shell line that activates phibook's environment"),
        "job_name": _spec(str, "phibook"),
        "sbatch_args": _spec(dict, None),
    },
    "ray": {
        "cpus_per_task": _spec(int, 1),
        "mem_per_cpu_gb": _spec((int, float), 1),
        "address": _spec(str, None, help="ray.init address (default: $RAY_ADDRESS, else a local instance)"),
    },
}
PIPELINE_KEYS = {"input": "globs of document JSONL", "output": "output folder", "stages": "stage names, in order"}


@dataclass
class PipelineConfig:
    path: Path  # the TOML
    stages: list[str]
    inputs: list[Path]  # files, in the order the globs list them (each glob sorted)
    output: Path
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage / executor table, defaults filled

    @property
    def root(self) -> Path:
        return self.path.parent


def _suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"; valid: {', '.join(valid)}"


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_value(where: str, name: str, value: Any, opt: OptionSpec) -> Any:
    kinds = opt.kind
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if list in kinds and isinstance(value, str):
        value = [value]  # a list option given one value (base_url = "http://...")
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise PhibookError(f"{where} option {name!r} must be {_type_name(opt.kind)}, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise PhibookError(f"{where} option {name!r} must be one of {', '.join(opt.choices)}, got {value!r}")
    return value


def _resolve_inputs(path: Path, raw: Any) -> list[Path]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(g, str) for g in raw):
        raise PhibookError(f"{path}: [pipeline] input must be a glob or a list of globs (strings)")
    files: list[Path] = []
    for pattern in raw:
        full = path.parent / pattern
        matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not matches:
            # Name the folder part of the glob (before the first wildcard) when it is missing: the usual cause.
            parts = Path(pattern).parts
            fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
            folder = path.parent.joinpath(*parts[:fixed])
            if not folder.is_dir():
                raise PhibookError(f"{path}: [pipeline] input {pattern!r}: folder {folder} does not exist")
            raise PhibookError(f"{path}: [pipeline] input {pattern!r} matches no files (looked in {folder})")
        for m in matches:
            if not m.name.lower().endswith(INPUT_SUFFIXES):
                raise PhibookError(f"{path}: [pipeline] input {pattern!r} matches {m}, which is not document JSONL "
                                   f"({', '.join(INPUT_SUFFIXES)})")
            if m.resolve() not in [f.resolve() for f in files]:
                files.append(m)
    return files


def _check_stages(path: Path, stages: Any) -> list[str]:
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise PhibookError(f"{path}: [pipeline] stages must be a non-empty list of stage names ({', '.join(STAGES)})")
    for s in stages:
        if s not in STAGES:
            raise PhibookError(f"{path}: [pipeline] stages: unknown stage {s!r}{_suggest(s, STAGES)}")
    for i, s in enumerate(stages):
        if s in stages[:i]:
            raise PhibookError(f"{path}: [pipeline] stages: {s!r} is listed twice")
    if "tokenize" in stages and stages[-1] != "tokenize":
        after = stages[stages.index("tokenize") + 1]
        raise PhibookError(
            f"{path}: [pipeline] stages: {after!r} cannot come after 'tokenize': tokenize turns documents into "
            "token shards, so no document stage can follow it; make 'tokenize' the last stage"
        )
    if "synth" in stages and stages[0] != "synth":
        raise PhibookError(f"{path}: [pipeline] stages: 'synth' makes the documents, so it must be the first stage "
                           f"(got it after {stages[stages.index('synth') - 1]!r})")
    return stages


def _check_paths(path: Path, options: dict[str, dict[str, Any]]) -> None:
    """Files the stages read must exist now, not an hour into the run."""
    tok = options.get("tokenize", {}).get("tokenizer")
    if tok is not None:
        p = Path(tok)
        if not (p.is_file() or (p / "tokenizer.json").is_file()):
            raise PhibookError(f"{path}: [tokenize] tokenizer {p} is neither a tokenizer.json nor a folder holding one")
    bench = options.get("clean", {}).get("benchmarks")
    if bench is not None and not Path(bench).is_dir():
        raise PhibookError(f"{path}: [clean] benchmarks folder {bench} does not exist")
    clf = options.get("filter", {}).get("classifier")
    if clf is not None and not Path(clf).is_file():
        raise PhibookError(f"{path}: [filter] classifier file {clf} does not exist")
    for key in ("topics", "templates", "web_samples", "checkpoint"):
        value = options.get("synth", {}).get(key)
        if value is not None and not Path(value).exists():
            raise PhibookError(f"{path}: [synth] {key} {value} does not exist")


def _check_ranges(path: Path, options: dict[str, dict[str, Any]]) -> None:
    clean = options.get("clean")
    if clean:
        if not 0 < clean["near_dup_threshold"] < 1:
            raise PhibookError(f"{path}: [clean] near_dup_threshold must be in (0, 1), got "
                               f"{clean['near_dup_threshold']}; set near_dup = false to skip near-dup removal")
        for key in ("num_perm", "shingle", "ngram"):
            if clean[key] < 1:
                raise PhibookError(f"{path}: [clean] {key} must be >= 1, got {clean[key]}")
    tok = options.get("tokenize")
    if tok:
        if not 0.0 <= tok["val_fraction"] < 1.0:
            raise PhibookError(f"{path}: [tokenize] val_fraction must be in [0, 1), got {tok['val_fraction']}")
        for key in ("shard_tokens", "chunk_bytes"):
            if tok[key] < 1:
                raise PhibookError(f"{path}: [tokenize] {key} must be >= 1, got {tok[key]}")
    flt = options.get("filter")
    if flt and flt.get("keep_fraction") is not None:
        raise PhibookError(f"{path}: [filter] keep_fraction needs every document's score before any is kept, which "
                           "a streaming pipeline cannot do; use threshold (e.g. the cut that `phibook filter apply "
                           "--keep-fraction` printed on a sample)")
    if flt and flt.get("threshold") is None:
        raise PhibookError(f"{path}: [filter] needs option 'threshold' ({OPTIONS['filter']['threshold'].help})")
    synth = options.get("synth")
    if synth:
        if synth["num_docs"] < 0:
            raise PhibookError(f"{path}: [synth] num_docs must be >= 0, got {synth['num_docs']}")


def check_tables(path: Path, data: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Tables, option names and types, stage order: (stages, options with defaults filled, paths resolved)."""
    valid_tables = ["pipeline", *STAGES, *EXECUTOR_TABLES]
    for table in data:
        if table not in valid_tables:
            raise PhibookError(f"{path}: unknown table [{table}]{_suggest(table, valid_tables)}")
    pipe = data.get("pipeline")
    if not isinstance(pipe, dict):
        raise PhibookError(f"{path}: needs a [pipeline] table with input, output and stages")
    for key in pipe:
        if key not in PIPELINE_KEYS:
            raise PhibookError(f"{path}: [pipeline] unknown option {key!r}{_suggest(key, list(PIPELINE_KEYS))}")
    stages = _check_stages(path, pipe.get("stages"))
    for table in data:
        if table in STAGES and table not in stages:
            raise PhibookError(f"{path}: table [{table}] is given but {table!r} is not in [pipeline] stages {stages}")

    options: dict[str, dict[str, Any]] = {}
    for table in [*stages, *EXECUTOR_TABLES]:
        given = data.get(table, {})
        if not isinstance(given, dict):
            raise PhibookError(f"{path}: [{table}] must be a table")
        schema = OPTIONS[table]
        for key in given:
            if key not in schema:
                raise PhibookError(f"{path}: [{table}] unknown option {key!r}{_suggest(key, list(schema))}")
        resolved: dict[str, Any] = {}
        for key, opt in schema.items():
            if key not in given:
                if opt.required:
                    raise PhibookError(f"{path}: [{table}] needs option {key!r} ({opt.help})")
                resolved[key] = opt.default
                continue
            value = _check_value(f"{path}: [{table}]", key, given[key], opt)
            if opt.path and value is not None:
                value = str((path.parent / value).resolve())
            resolved[key] = value
        options[table] = resolved
    return stages, options


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Parse and check PIPELINE.toml; raises PhibookError on the first problem."""
    path = Path(path).resolve()  # Slurm and Ray tasks run elsewhere: every path they get is absolute
    if not path.is_file():
        raise PhibookError(f"pipeline file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PhibookError(f"{path}: not valid TOML ({exc})") from exc
    stages, options = check_tables(path, data)
    pipe = data["pipeline"]
    _check_ranges(path, options)
    _check_paths(path, options)

    output = pipe.get("output")
    if not isinstance(output, str) or not output:
        raise PhibookError(f"{path}: [pipeline] needs output = \"FOLDER\" (relative to {path.parent})")
    if stages[0] == "synth":
        if "input" in pipe:
            raise PhibookError(f"{path}: [pipeline] input is not used when the first stage is 'synth' (it makes the "
                               "documents); remove it")
        inputs: list[Path] = []
    else:
        if "input" not in pipe:
            raise PhibookError(f"{path}: [pipeline] needs input = [\"GLOB\", ...] (relative to {path.parent})")
        inputs = _resolve_inputs(path, pipe["input"])
    return PipelineConfig(path=path, stages=stages, inputs=inputs, output=(path.parent / output), options=options)
