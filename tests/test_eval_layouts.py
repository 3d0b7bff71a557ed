"""Benchmark files in the layouts people have: the Hugging Face hub copies (parquet as the hub stores
it, the parquet converter's tree, jsonl, a flat folder of files named by split) read into the same
documents, prompts and requests as the original release files; the layout found is named; errors
name the file and row and write types as a person would.

The hub-layout files are made here, in tmp_path, from the first rows of the original files in
../shared/benchmarks (the conversion mirrors the hub's schemas: allenai/ai2_arc, ybisk/piqa,
allenai/openbookqa, allenai/winogrande, super_glue/boolq, allenai/social_i_qa, cais/mmlu); the
tests that need those files skip when ../shared is absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phibook.errors import PhibookError
from phibook.eval.task import get_task

N = 12  # rows converted per task


@pytest.fixture(scope="module")
def bench(shared_dir: Path) -> Path:
    return shared_dir / "benchmarks"


def jsonl_rows(path: Path, n: int = N) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def lst_labels(path: Path, n: int = N) -> list[str]:
    return [x.strip() for x in path.read_text().split("\n") if x.strip()][:n]


def write(path: Path, rows: list[dict]) -> Path:
    """jsonl, json (datasets' to_json writes JSON lines) or parquet (pyarrow: dicts become structs,
    as the hub stores `choices`), from the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- hub-schema converters
# Each takes the original files of a task folder and returns (split, hub config, hub rows).


def hub_arc(folder: Path, name: str) -> list[dict]:
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in jsonl_rows(folder / name)]


def hub_piqa(folder: Path) -> list[dict]:
    labels = lst_labels(folder / "valid-labels.lst")
    return [dict(r, label=int(label)) for r, label in zip(jsonl_rows(folder / "valid.jsonl"), labels, strict=True)]


def hub_siqa(folder: Path) -> list[dict]:
    labels = lst_labels(folder / "dev-labels.lst")
    return [dict(r, label=label) for r, label in zip(jsonl_rows(folder / "dev.jsonl"), labels, strict=True)]


def hub_openbookqa(folder: Path) -> list[dict]:
    return [{"id": f"q{i}", "question_stem": r["query"],
             "choices": {"text": r["choices"], "label": ["A", "B", "C", "D"][: len(r["choices"])]},
             "answerKey": "ABCD"[r["gold"]]} for i, r in enumerate(jsonl_rows(folder / "openbook_qa.llmfoundry.jsonl"))]


def hub_winogrande(folder: Path, as_int: bool) -> list[dict]:
    return [dict(r, answer=int(r["answer"]) if as_int else r["answer"]) for r in jsonl_rows(folder / "dev.jsonl")]


def hub_boolq(folder: Path) -> list[dict]:
    return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
             "label": int(str(r["label"]).lower() == "true")} for r in jsonl_rows(folder / "val.jsonl")]


CASES = {
    # task: (original folder, converter, split, hub tree path)
    "arc_easy": (lambda f: hub_arc(f, "ARC-Easy-Test.jsonl"), "test", "ARC-Easy/test-00000-of-00001.parquet"),
    "arc_challenge": (lambda f: hub_arc(f, "ARC-Challenge-Test.jsonl"), "test",
                      "ARC-Challenge/test-00000-of-00001.parquet"),
    "piqa": (hub_piqa, "validation", "plain_text/validation-00000-of-00001.parquet"),
    "siqa": (hub_siqa, "validation", "default/validation/0000.parquet"),
    "openbookqa": (hub_openbookqa, "test", "main/test-00000-of-00001.parquet"),
    "winogrande": (lambda f: hub_winogrande(f, as_int=True), "validation",
                   "winogrande_xl/validation-00000-of-00001.parquet"),
    "boolq": (hub_boolq, "validation", "boolq/validation-00000-of-00001.parquet"),
}

# How the converted rows are laid out in the task folder: the hub's tree, or a flat folder of
# files named by split (parquet, jsonl, json), or the hub's tree split in two shards.
CONTAINERS = ["hub-tree", "flat-parquet", "flat-jsonl", "flat-json", "two-shards"]


def lay_out(folder: Path, rows: list[dict], split: str, hub_path: str, container: str) -> list[Path]:
    if container == "hub-tree":
        return [write(folder / hub_path, rows)]
    if container == "two-shards":
        return [write(folder / "data" / f"{split}-00000-of-00002.parquet", rows[:5]),
                write(folder / "data" / f"{split}-00001-of-00002.parquet", rows[5:])]
    ext = container.split("-")[1]
    return [write(folder / f"{split}.{ext}", rows)]


def requests_of(task, docs: list[dict]) -> list:
    return [task.requests(d) for d in docs]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_hub_layouts_give_the_same_requests(bench: Path, tmp_path: Path, name: str, container: str) -> None:
    convert, split, hub_path = CASES[name]
    task = get_task(name)
    original = task.load_docs(bench, N)
    assert len(original) == N

    hub = get_task(name)
    folder = tmp_path / task.folder
    files = lay_out(folder, convert(bench / task.folder), split, hub_path, container)
    docs = hub.load_docs(tmp_path, None)
    assert len(docs) == N
    assert requests_of(hub, docs) == requests_of(task, original)
    assert [d["gold"] for d in docs] == [d["gold"] for d in original]
    fmt = "parquet" if files[0].suffix == ".parquet" else files[0].suffix.lstrip(".")
    assert hub.data_source.layout == f"hf-{fmt}"
    assert hub.data_source.files == files
    # --limit reads only the first rows, across shards too
    assert requests_of(hub, hub.load_docs(tmp_path, 7)) == requests_of(task, original[:7])


def test_original_layouts_are_named(bench: Path) -> None:
    expected = {"arc_easy": "ai2-jsonl", "arc_challenge": "ai2-jsonl", "piqa": "ybisk-jsonl+labels",
                "siqa": "ai2-jsonl+labels", "openbookqa": "llmfoundry-jsonl", "winogrande": "ai2-jsonl+labels",
                "boolq": "superglue-jsonl", "hellaswag": "klosax-text", "mmlu_anatomy": "hendrycks-csv"}
    for name, layout in expected.items():
        task = get_task(name)
        task.load_docs(bench, 2)
        assert task.data_source.layout == layout, name
        assert all(Path(f).exists() for f in task.data_source.files)


def test_winogrande_answer_as_string_or_integer(bench: Path, tmp_path: Path) -> None:
    task = get_task("winogrande")
    original = task.load_docs(bench, N)
    for as_int, sub in ((True, "a"), (False, "b")):
        write(tmp_path / sub / "winogrande" / "validation.jsonl", hub_winogrande(bench / "winogrande", as_int))
        docs = task.load_docs(tmp_path / sub, None)
        assert requests_of(task, docs) == requests_of(task, original)


def test_piqa_flat_valid_jsonl_with_label_per_row(bench: Path, tmp_path: Path) -> None:
    # The release's name, but the hub's rows (label inside): no label file needed.
    write(tmp_path / "piqa" / "valid.jsonl", hub_piqa(bench / "piqa"))
    task = get_task("piqa")
    docs = task.load_docs(tmp_path, None)
    assert requests_of(task, docs) == requests_of(task, get_task("piqa").load_docs(bench, N))
    assert task.data_source.layout == "hf-jsonl"


def test_arc_whole_hub_repo_picks_the_task_config(bench: Path, tmp_path: Path) -> None:
    # `huggingface-cli download allenai/ai2_arc` into arc_easy/ (and arc_challenge/): both configs present
    easy = hub_arc(bench / "arc_easy", "ARC-Easy-Test.jsonl")
    challenge = hub_arc(bench / "arc_challenge", "ARC-Challenge-Test.jsonl")
    for folder in ("arc_easy", "arc_challenge"):
        for config, rows in (("ARC-Easy", easy), ("ARC-Challenge", challenge)):
            for split in ("train", "validation", "test"):
                write(tmp_path / folder / config / f"{split}-00000-of-00001.parquet", rows)
    for name in ("arc_easy", "arc_challenge"):
        task = get_task(name)
        docs = task.load_docs(tmp_path, None)
        assert requests_of(task, docs) == requests_of(task, get_task(name).load_docs(bench, N))
        config = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        assert task.data_source.files == [tmp_path / name / config / "test-00000-of-00001.parquet"]


def test_hellaswag_hub_layout_matches_rowanz_jsonl(tmp_path: Path) -> None:
    row = {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill. [title] Heat it.",
           "ctx_b": "then the MAN", "ctx": "x", "endings": ["scrubs  it [step] hard.", "b", "c", "d"], "label": 2,
           "source_id": "x", "split": "val", "split_type": "indomain"}
    write(tmp_path / "a" / "hellaswag" / "hellaswag_val.jsonl", [row])
    write(tmp_path / "b" / "hellaswag" / "data" / "validation-00000-of-00001.parquet", [dict(row, label="2")])
    task = get_task("hellaswag")
    original = task.load_docs(tmp_path / "a", None)
    assert task.data_source.layout == "rowanz-jsonl"
    hub = task.load_docs(tmp_path / "b", None)
    assert task.data_source.layout == "hf-parquet"
    assert hub == original and requests_of(task, hub) == requests_of(task, original)


def mmlu_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [r for r in csv.reader(fh) if r]


@pytest.mark.parametrize("tree", ["per-subject", "all"])
def test_mmlu_hub_layout(bench: Path, tmp_path: Path, tree: str) -> None:
    subjects = ["anatomy", "astronomy"]
    by_split: dict[str, list[dict]] = {"dev": [], "test": []}
    for subject in subjects:
        for split in ("dev", "test"):
            rows = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                    for r in mmlu_csv_rows(bench / "mmlu" / split / f"{subject}_{split}.csv")[:N]]
            by_split[split] += rows
            if tree == "per-subject":
                write(tmp_path / "mmlu" / subject / f"{split}-00000-of-00001.parquet", rows)
    if tree == "all":
        for split, rows in by_split.items():
            write(tmp_path / "mmlu" / "all" / f"{split}-00000-of-00001.parquet", rows)
    for subject in subjects:
        task = get_task(f"mmlu_{subject}")
        docs = task.load_docs(tmp_path, 5)
        assert task.data_source.layout == "hf-parquet"
        original = get_task(f"mmlu_{subject}").load_docs(bench, 5)
        assert requests_of(task, docs) == requests_of(task, original)


# --------------------------------------------------------------------------- errors


def test_type_errors_read_as_a_person_writes_them(tmp_path: Path) -> None:
    path = write(tmp_path / "boolq" / "val.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": 2}])
    with pytest.raises(PhibookError) as err:
        get_task("boolq").load_docs(tmp_path, None)
    msg = str(err.value)
    assert f"{path}:1: field 'label' should be true/false, 0/1 or the string \"true\"/\"false\", got an integer (2)" \
        in msg
    assert "<class" not in msg
    path.write_text(json.dumps({"question": "q", "passage": 5, "idx": 0, "label": True}) + "\n")
    with pytest.raises(PhibookError, match=r"val\.jsonl:1: field 'passage' should be a string, got an integer \(5\)"):
        get_task("boolq").load_docs(tmp_path, None)
    path.write_text(json.dumps({"question": "q", "passage": "p", "idx": 0, "label": ["yes"]}) + "\n")
    with pytest.raises(PhibookError, match=r"field 'label' should be true/false, 0/1 .*got a list"):
        get_task("boolq").load_docs(tmp_path, None)


def test_parquet_errors_name_the_file_and_row(tmp_path: Path) -> None:
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}, {"goal": "g", "sol1": "a", "sol2": "b", "label": 7}]
    path = write(tmp_path / "piqa" / "validation.parquet", rows)
    with pytest.raises(PhibookError) as err:
        get_task("piqa").load_docs(tmp_path, None)
    assert f"{path}:row 2: field 'label' should be one of 0, 1 (an integer or a string of digits; 0 = sol1, " \
           "1 = sol2), got an integer (7)" in str(err.value)
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10\n")
    with pytest.raises(PhibookError, match=r"validation\.parquet: a Git LFS pointer, not the data"):
        get_task("piqa").load_docs(tmp_path, None)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(PhibookError, match=r"validation\.parquet: cannot read as parquet"):
        get_task("piqa").load_docs(tmp_path, None)


def test_unknown_row_layout_lists_the_known_ones(tmp_path: Path) -> None:
    write(tmp_path / "arc_easy" / "test.jsonl", [{"id": "x", "prompt": "q", "answer": "A"}])
    with pytest.raises(PhibookError, match=r"test\.jsonl:1: not an ARC row in a layout phibook knows: .*AI2's release.*"
                                           r"allenai/ai2_arc.*found fields id, prompt, answer"):
        get_task("arc_easy").load_docs(tmp_path, None)


def test_missing_split_names_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "openbookqa").mkdir()
    write(tmp_path / "openbookqa" / "train.jsonl", [{"question_stem": "q"}])
    with pytest.raises(PhibookError, match=r"openbookqa: none of Main/test\.jsonl, .* found in .*openbookqa, nor a "
                                           r"Hugging Face copy of the test split \(test\.jsonl, test\.parquet, "
                                           r"main/test-00000-of-00001\.parquet"):
        get_task("openbookqa").load_docs(tmp_path, None)


def test_two_copies_of_a_split_is_an_error(tmp_path: Path) -> None:
    row = {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}
    write(tmp_path / "winogrande" / "validation.jsonl", [row])
    write(tmp_path / "winogrande" / "validation.parquet", [row])
    with pytest.raises(PhibookError, match=r"winogrande: several copies of the validation split under"):
        get_task("winogrande").load_docs(tmp_path, None)
    # a whole hub repo: winogrande_xl is the one lm-eval scores
    (tmp_path / "winogrande" / "validation.parquet").unlink()
    (tmp_path / "winogrande" / "validation.jsonl").unlink()
    for config in ("winogrande_xs", "winogrande_xl", "winogrande_debiased"):
        write(tmp_path / "winogrande" / config / "validation-00000-of-00001.parquet", [row])
    task = get_task("winogrande")
    task.load_docs(tmp_path, None)
    assert task.data_source.files[0].parent.name == "winogrande_xl"
