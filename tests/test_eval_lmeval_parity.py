"""Parity with lm-evaluation-harness itself: same prompts, per-choice log-likelihoods within 1e-4,
identical accuracies, for every multiple-choice task.

lm-eval runs offline on an HF export of the tiny checkpoint, with local task YAMLs that mirror the
official ones (dataset_path: json + absolute data_files, only the evaluated split). The docs fed to
lm-eval are our loaded docs rewritten into the HF dataset schema each official task expects.

Needs `pip install "lm-eval[hf]"` (skipped otherwise); about 25 s of CPU (40 s wall on the shared
2-core dev VM), most of it importing lm-eval, so it runs with the fast tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phibook.eval.runner import Runner
from phibook.eval.task import get_task

LIMIT = 6

# Our task name -> (official YAML body without dataset lines, split name, doc -> HF row).
# Bodies copied from lm-eval 0.4.x's lm_eval/tasks/*/ (arc_easy.yaml, super_glue/boolq, siqa.yaml, ...).
MC_ARGS = "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
ACC_ONLY = "metric_list:\n  - metric: acc\n"


def _letters(n: int) -> list[str]:
    return ["A", "B", "C", "D", "E"][:n]


TASKS = {
    "arc_easy": (
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n' + MC_ARGS,
        lambda d: {"question": d["question"], "choices": {"text": d["choices"], "label": _letters(len(d["choices"]))},
                   "answerKey": _letters(len(d["choices"]))[d["gold"]]},
    ),
    "arc_challenge": (
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n' + MC_ARGS,
        lambda d: {"question": d["question"], "choices": {"text": d["choices"], "label": _letters(len(d["choices"]))},
                   "answerKey": _letters(len(d["choices"]))[d["gold"]]},
    ),
    "boolq": (
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: ["no", "yes"]\n' + ACC_ONLY,
        lambda d: {"passage": d["passage"], "question": d["question"], "label": d["gold"]},
    ),
    "siqa": (
        'doc_to_text: "Q: {{context}} {{question}}\\nA:"\n'
        'target_delimiter: " "\n'
        'doc_to_choice: "{{[answerA, answerB, answerC]}}"\n'
        'doc_to_target: "{{ (label|int) - 1 }}"\n' + ACC_ONLY,
        lambda d: {"context": d["context"], "question": d["question"], "answerA": d["choices"][0],
                   "answerB": d["choices"][1], "answerC": d["choices"][2], "label": str(d["gold"] + 1)},
    ),
    "piqa": (
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{[sol1, sol2]}}"\n' + MC_ARGS,
        lambda d: {"goal": d["goal"], "sol1": d["choices"][0], "sol2": d["choices"][1], "label": d["gold"]},
    ),
    "hellaswag": (
        "process_docs: !function parity_utils.hellaswag_process_docs\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_target: "{{label}}"\n'
        'doc_to_choice: "choices"\n' + MC_ARGS,
        # The shared file holds the already-joined ctx; handing it over as ctx_a with an empty ctx_b
        # makes the harness's own preprocess() produce the query.
        lambda d: {"activity_label": d["query"].split(": ", 1)[0], "ctx_a": d["query"].split(": ", 1)[1],
                   "ctx_b": "", "endings": d["choices"], "label": str(d["gold"])},
    ),
    "openbookqa": (
        "doc_to_text: question_stem\n"
        'doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"\n'
        'doc_to_choice: "{{choices.text}}"\n' + MC_ARGS,
        lambda d: {"question_stem": d["question_stem"], "choices": {"text": d["choices"], "label": _letters(4)},
                   "answerKey": _letters(4)[d["gold"]]},
    ),
    "winogrande": (
        "doc_to_text: !function parity_utils.winogrande_doc_to_text\n"
        "doc_to_target: !function parity_utils.winogrande_doc_to_target\n"
        "doc_to_choice: !function parity_utils.winogrande_doc_to_choice\n" + ACC_ONLY,
        lambda d: {"sentence": d["sentence"], "option1": d["options"][0], "option2": d["options"][1],
                   "answer": str(d["gold"] + 1)},
    ),
    "mmlu_anatomy": (
        'description: "The following are multiple choice questions (with answers) about anatomy.\\n\\n"\n'
        "fewshot_split: dev\n"
        "fewshot_config:\n  sampler: first_n\n"
        "num_fewshot: 2\n"
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
        '\\nD. {{choices[3]}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: answer\n" + ACC_ONLY,
        lambda d: {"question": d["question"], "choices": d["options"], "answer": d["gold"], "subject": d["subject"]},
    ),
}

UTILS = '''
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)
'''


def write_task(root: Path, name: str, docs: list[dict], body: str, to_row) -> str:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(to_row(d)) + "\n" for d in docs))
    files = {"test": str(data)}
    if name.startswith("mmlu"):
        dev = root / f"{name}_dev.jsonl"
        dev.write_text("".join(json.dumps(to_row(s)) + "\n" for s in docs[0]["fewshot"]))
        files["dev"] = str(dev)
    task = f"pb_{name}"
    yaml = (
        f"task: {task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {json.dumps(files)}\n"
        "output_type: multiple_choice\ntest_split: test\n" + body
    )
    (root / f"{task}.yaml").write_text(yaml)
    return task


def test_lmeval_parity_all_mc_tasks(tiny_checkpoint: Path, shared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # Offline: the local task YAMLs read local files; nothing may reach the hub. Set before the
    # import (datasets reads these variables once, when it is imported).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from phibook.weights.checkpoint import load_model
    from phibook.weights.export import export_hf

    hf_dir = export_hf(tiny_checkpoint, tmp_path / "hf")
    bench = shared_dir / "benchmarks"
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "parity_utils.py").write_text(UTILS)
    ours_docs, names = {}, {}
    for name, (body, to_row) in TASKS.items():
        docs = get_task(name).load_docs(bench, LIMIT)
        ours_docs[name] = docs
        names[name] = write_task(root, name, docs, body, to_row)

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=list(names.values()),
        task_manager=TaskManager(include_path=str(root)),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    loaded = load_model(tiny_checkpoint)
    runner = Runner(loaded.model, loaded.tokenizer, batch_size=8, progress=False)
    for name, lm_task in names.items():
        task = get_task(name)
        samples = sorted(out["samples"][lm_task], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT
        per_doc = []
        for doc, sample in zip(ours_docs[name], samples, strict=True):
            reqs = task.requests(doc)
            # same prompts: (context, continuation) pairs, argument for argument
            theirs = [tuple(a) if not isinstance(a, dict) else (a["arg_0"], a["arg_1"]) for a in sample["arguments"]]
            assert [(r.context, r.continuation) for r in reqs] == [t[:2] for t in theirs], name
            ours = runner.loglikelihood(reqs)
            their_lls = [float(r[0][0]) for r in sample["resps"]]
            for (ll, _), ref in zip(ours, their_lls, strict=True):
                assert ll == pytest.approx(ref, abs=1e-4), name
            values = task.process_results(doc, ours)
            for metric in task.metrics:
                assert values[metric] == sample[metric], (name, metric)
            per_doc.append(values)
        agg = task.aggregate(per_doc)
        for metric in task.metrics:
            assert agg[metric][0] == pytest.approx(out["results"][lm_task][f"{metric},none"]), (name, metric)
