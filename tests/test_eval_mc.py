"""Multiple-choice tasks: loaders (shared files and original layouts), harness prompts, metrics, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phibook.errors import PhibookError
from phibook.eval.multiple_choice import MMLU_SUBJECTS, hellaswag_preprocess
from phibook.eval.task import LoglikelihoodRequest, get_task, mean_and_stderr

MC_TASKS = ["arc_easy", "arc_challenge", "boolq", "siqa", "piqa", "hellaswag", "openbookqa", "winogrande", "mmlu"]


@pytest.fixture(scope="module")
def bench(shared_dir: Path) -> Path:
    return shared_dir / "benchmarks"


# --------------------------------------------------------------------------- real shared files


@pytest.mark.parametrize(
    "name,count",
    [
        ("arc_easy", 2376),
        ("arc_challenge", 1172),
        ("boolq", 3270),
        ("piqa", 1838),
        ("siqa", 1954),
        ("winogrande", 1267),
        ("hellaswag", 10042),
        ("openbookqa", 500),
        ("mmlu", 14042),
    ],
)
def test_shared_file_counts(bench: Path, name: str, count: int) -> None:
    docs = get_task(name).load_docs(bench, None)
    assert len(docs) == count
    for doc in docs:
        assert 0 <= doc["gold"] < len(doc["choices"])


def test_mmlu_has_57_subjects_with_two_shots(bench: Path) -> None:
    docs = get_task("mmlu").load_docs(bench, 1)
    assert [d["subject"] for d in docs] == MMLU_SUBJECTS
    assert all(len(d["fewshot"]) == 2 for d in docs)
    assert len(get_task("mmlu_anatomy").load_docs(bench, None)) == 135


def test_arc_numeric_and_five_choice_labels(bench: Path) -> None:
    docs = get_task("arc_easy").load_docs(bench, None)
    assert {len(d["choices"]) for d in docs} == {3, 4, 5}
    raw = [json.loads(line) for line in (bench / "arc_easy" / "ARC-Easy-Test.jsonl").open()]
    numeric = [i for i, r in enumerate(raw) if r["answerKey"].isdigit()]
    assert len(numeric) == 97
    i = numeric[0]
    labels = [c["label"] for c in raw[i]["question"]["choices"]]
    assert docs[i]["gold"] == labels.index(raw[i]["answerKey"])


def test_label_files_align(bench: Path) -> None:
    # gold counts straight from the label files
    piqa = get_task("piqa").load_docs(bench, None)
    labels = (bench / "piqa" / "valid-labels.lst").read_text().split()
    assert [d["gold"] for d in piqa] == [int(x) for x in labels]
    siqa = get_task("siqa").load_docs(bench, None)
    labels = (bench / "siqa" / "dev-labels.lst").read_text().split()
    assert [d["gold"] for d in siqa] == [int(x) - 1 for x in labels]
    boolq = get_task("boolq").load_docs(bench, None)
    assert sum(d["gold"] for d in boolq) == 2033


# --------------------------------------------------------------------------- prompts, as the harness renders them


def one(name: str, bench: Path, index: int = 0):
    task = get_task(name)
    doc = task.load_docs(bench, index + 1)[index]
    return task, doc, task.requests(doc)


def test_prompt_arc(bench: Path) -> None:
    _, doc, reqs = one("arc_easy", bench)
    assert reqs[0] == LoglikelihoodRequest(
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert len(reqs) == 4 and doc["gold"] == 0


def test_prompt_boolq(bench: Path) -> None:
    _, doc, reqs = one("boolq", bench)
    assert reqs[0].context.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert reqs[0].context.endswith(
        "than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert [r.continuation for r in reqs] == [" no", " yes"] and doc["gold"] == 0


def test_prompt_siqa(bench: Path) -> None:
    _, doc, reqs = one("siqa", bench)
    assert reqs[0].context == "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA:"
    assert [r.continuation for r in reqs] == [" make a new plan", " Go home and see Riley", " Find somewhere to go"]
    assert doc["gold"] == 2


def test_prompt_piqa(bench: Path) -> None:
    _, doc, reqs = one("piqa", bench)
    assert reqs[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert reqs[1].continuation.startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans")
    assert doc["gold"] == 0


def test_prompt_hellaswag_derived(bench: Path) -> None:
    _, doc, reqs = one("hellaswag", bench)
    assert reqs[0].context == "Roof shingle removal: A man is sitting on a roof. he"
    assert reqs[3].continuation == " starts pulling up roofing on a roof."
    assert doc["gold"] == 3


def test_prompt_openbookqa(bench: Path) -> None:
    _, doc, reqs = one("openbookqa", bench)
    assert reqs[1] == LoglikelihoodRequest(
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
        "After looking over their budget and expenses, they decide the best way to save money is to",
        " quit eating lunch out",
    )
    assert doc["gold"] == 1


def test_prompt_winogrande_partial(bench: Path) -> None:
    _, doc, reqs = one("winogrande", bench)
    assert reqs == [
        LoglikelihoodRequest("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        LoglikelihoodRequest("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert doc["gold"] == 1


def test_prompt_mmlu_two_shot(bench: Path) -> None:
    _, doc, reqs = one("mmlu_abstract_algebra", bench)
    assert reqs[0].context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K "
        "are subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert [r.continuation for r in reqs] == [" A", " B", " C", " D"] and doc["gold"] == 1


# --------------------------------------------------------------------------- original layouts (fixtures)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hellaswag_original_jsonl_preprocessed_like_harness(tmp_path: Path) -> None:
    row = {
        "ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill. [title] Heat it up.",
        "ctx_b": "then the MAN", "endings": ["scrubs  it [step] hard.", "b", "c", "d"], "label": 2,
        "split": "val", "split_type": "indomain", "source_id": "x",
    }
    write_jsonl(tmp_path / "hellaswag" / "hellaswag_val.jsonl", [row])
    task = get_task("hellaswag")
    doc = task.load_docs(tmp_path, None)[0]
    # ctx_b.capitalize() lower-cases the rest; " [title]" -> ". "; brackets removed; double spaces once.
    assert doc["query"] == "Home and Garden: How to clean a grill.. Heat it up. Then the man"
    assert doc["choices"][0] == "scrubs it hard."
    assert doc["gold"] == 2
    assert hellaswag_preprocess(" a [title] b ") == "a. b"


def test_hellaswag_text_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("q\n1\na\nb\nc\nd\nq2\n9\na\nb\nc\nd\n")
    with pytest.raises(PhibookError, match=r"hellaswag_val_full.txt:8: label '9'"):
        get_task("hellaswag").load_docs(tmp_path, None)


def test_openbookqa_original_layout(tmp_path: Path) -> None:
    row = {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [
        {"text": "puppies learning new tricks", "label": "A"}, {"text": "children growing up", "label": "B"},
        {"text": "flowers wilting in a vase", "label": "C"}, {"text": "plants sprouting, blooming and wilting",
                                                             "label": "D"}]}, "answerKey": "D"}
    write_jsonl(tmp_path / "openbookqa" / "Main" / "test.jsonl", [row])
    task = get_task("openbookqa")
    doc = task.load_docs(tmp_path, None)[0]
    reqs = task.requests(doc)
    assert reqs[3] == LoglikelihoodRequest("The sun is responsible for", " plants sprouting, blooming and wilting")
    assert doc["gold"] == 3


def test_boolq_google_dev_layout(tmp_path: Path) -> None:
    row = {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."}
    write_jsonl(tmp_path / "boolq" / "dev.jsonl", [row])
    task = get_task("boolq")
    doc = task.load_docs(tmp_path, None)[0]
    assert task.requests(doc)[1] == LoglikelihoodRequest("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", " yes")
    assert doc["gold"] == 1


def test_arc_numeric_labels_fixture(tmp_path: Path) -> None:
    row = {"id": "x", "question": {"stem": "Two plus two?", "choices": [
        {"text": "3", "label": "1"}, {"text": "4", "label": "2"}, {"text": "5", "label": "3"}]}, "answerKey": "2"}
    write_jsonl(tmp_path / "arc_challenge" / "ARC-Challenge-Test.jsonl", [row])
    doc = get_task("arc_challenge").load_docs(tmp_path, None)[0]
    assert doc["choices"] == ["3", "4", "5"] and doc["gold"] == 1


def test_winogrande_labels_file_fixture(tmp_path: Path) -> None:
    rows = [{"qID": "a", "sentence": "The cup fit in the box because _ was small.", "option1": "the cup",
             "option2": "the box", "answer": "1"}]
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", rows)
    (tmp_path / "winogrande" / "dev-labels.lst").write_text("1\n")
    task = get_task("winogrande")
    doc = task.load_docs(tmp_path, None)[0]
    assert [r.context for r in task.requests(doc)] == ["The cup fit in the box because the cup",
                                                       "The cup fit in the box because the box"]
    assert task.requests(doc)[0].continuation == " was small."


# --------------------------------------------------------------------------- metrics


def test_acc_norm_divides_by_choice_characters() -> None:
    task = get_task("arc_easy")
    doc = {"question": "q", "choices": ["a", "bbbbbbbbbb"], "gold": 1}
    # raw: choice 0 wins (-2 > -5); per character: -2/1 = -2 < -5/10 = -0.5, so choice 1 wins.
    assert task.process_results(doc, [(-2.0, False), (-5.0, False)]) == {"acc": 0.0, "acc_norm": 1.0}
    # ties go to the first index, as numpy.argmax
    assert task.process_results(doc, [(-1.0, True), (-1.0, True)])["acc"] == 0.0


def test_acc_only_tasks_have_no_acc_norm() -> None:
    for name in ("winogrande", "siqa", "boolq", "mmlu"):
        assert "acc_norm" not in get_task(name).metrics


def test_mmlu_aggregate_weighted_and_per_subject() -> None:
    task = get_task("mmlu")
    per_doc = [{"acc": 1.0, "subject": "a"}, {"acc": 0.0, "subject": "a"}, {"acc": 1.0, "subject": "b"}]
    out = task.aggregate(per_doc)
    assert out["acc"][0] == pytest.approx(2 / 3)
    assert out["acc_subject_avg"][0] == pytest.approx(0.75)
    assert out["acc:a"][0] == 0.5 and out["acc:b"][0] == 1.0


def test_mean_and_stderr_sample_std() -> None:
    mean, se = mean_and_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)


# --------------------------------------------------------------------------- bad input


def test_unknown_task_lists_known() -> None:
    with pytest.raises(PhibookError, match="unknown task 'arc_medium'.*arc_easy"):
        get_task("arc_medium")


def test_missing_folder_and_file_named(tmp_path: Path) -> None:
    with pytest.raises(PhibookError, match=r"piqa: data folder .*piqa not found.*valid.jsonl"):
        get_task("piqa").load_docs(tmp_path, None)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(PhibookError, match=r"none of valid-labels.lst found in .*piqa"):
        get_task("piqa").load_docs(tmp_path, None)


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "siqa" / "dev.jsonl"
    path.parent.mkdir()
    path.write_text('{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}\n{oops\n')
    (tmp_path / "siqa" / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(PhibookError, match=r"dev.jsonl:2: not valid JSON"):
        get_task("siqa").load_docs(tmp_path, None)
    path.write_text('{"context": "c", "question": "q", "answerA": "a", "answerB": "b"}\n')
    with pytest.raises(PhibookError, match=r"dev.jsonl:1: missing field 'answerC'"):
        get_task("siqa").load_docs(tmp_path, None)
    (tmp_path / "siqa" / "dev-labels.lst").write_text("4\n")
    path.write_text('{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}\n')
    with pytest.raises(PhibookError, match=r"dev-labels.lst:1: label '4'"):
        get_task("siqa").load_docs(tmp_path, None)


def test_mmlu_bad_csv_row(tmp_path: Path) -> None:
    for split in ("dev", "test"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,B\n")
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text('"multi\nline",a,b,c,d,C\nq,a,b,c,E\n')
    with pytest.raises(PhibookError, match=r"anatomy_test.csv:3: expected 6 columns, got 5"):
        get_task("mmlu_anatomy").load_docs(tmp_path, None)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text('"multi\nline",a,b,c,d,C\n')
    doc = get_task("mmlu_anatomy").load_docs(tmp_path, None)[0]
    assert doc["question"] == "multi\nline" and doc["gold"] == 2


def test_all_mc_tasks_registered() -> None:
    from phibook.eval.task import task_names

    names = task_names()
    for name in MC_TASKS:
        assert name in names
    assert sum(n.startswith("mmlu_") for n in names) == 57
