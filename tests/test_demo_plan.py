"""The demo's plan and its bounded stages, fast (no model is trained): the time budget is the
contract, the untrained model's scoring is capped, and --no-progress reaches the trainer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from phibook.demo import run as demo


def test_plan_is_a_time_budget_with_an_estimate_a_floor_and_a_cap():
    plan = demo.plan_steps(step_seconds=0.5, time_budget_s=300.0, elapsed=3.0, done_steps=6)
    assert plan["time_budget_s"] == 300.0  # what the trainer stops on
    assert plan["estimated_steps"] == 6 + int(297 / 0.5)
    assert plan["max_steps"] == plan["estimated_steps"] and plan["min_steps"] == demo.MIN_TRAIN_STEPS
    assert plan["step_cap"] == demo.STEP_CAP_FACTOR * plan["max_steps"]
    assert plan["save_every_s"] == demo.SAVE_EVERY_S and plan["eval_every"] == plan["max_steps"] // 15
    # a busy calibration (3.5 s/step) no longer fixes the step count: the budget stays the same and
    # the floor only sets the minimum; a machine that gets faster trains up to 10x the estimate
    busy = demo.plan_steps(step_seconds=3.5, time_budget_s=300.0, elapsed=21.0, done_steps=6)
    assert busy["time_budget_s"] == 300.0 and busy["estimated_steps"] < demo.MIN_TRAIN_STEPS
    assert busy["max_steps"] == demo.MIN_TRAIN_STEPS and busy["step_cap"] >= 1000


@pytest.fixture
def ctx(tmp_path: Path):
    return demo.Demo(demo.DemoOptions(out=tmp_path / "out", minutes=15, progress=False))


def test_main_run_passes_the_budget_and_no_progress_to_the_trainer(ctx):
    plan = demo.plan_steps(0.5, 300.0, 3.0, 6)
    cfg = demo.main_train_config(ctx, plan)
    assert cfg.progress is False
    assert (cfg.time_budget_s, cfg.min_steps, cfg.max_steps) == (300.0, demo.MIN_TRAIN_STEPS, plan["step_cap"])
    assert cfg.save_every_s == demo.SAVE_EVERY_S and cfg.lr_schedule == "constant"  # extending is safe
    assert ctx.train_config(max_steps=6).progress is False


@dataclass
class _Out:
    text: str
    completion_tokens: int


class _CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class _RecordingGenerator:
    """Answers like an untrained model that never stops: the longest text it is allowed."""

    tokenizer = _CharTokenizer()

    def __init__(self) -> None:
        self.params = []

    def generate(self, prompts, params):
        self.params.append(params)
        return [_Out("x" * params.max_new_tokens, params.max_new_tokens) for _ in prompts]


def test_exercise_generation_is_capped_by_the_longest_answer():
    items = [{"kind": "arithmetic", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    items.append({"kind": "theory_of_mind", "question": "Where will Maya look?", "answer": "the basket"})
    gen = _RecordingGenerator()
    res = demo.score_exercises(gen, items, progress=False, batch=32)
    caps = [p.max_new_tokens for p in gen.params]
    # " 32." is 4 characters (+2); the second batch holds "the basket": " the basket." is 12 (+2)
    assert caps == [4 + 2, 12 + 2]
    assert all(p.stop == ["\n", ". "] for p in gen.params)
    assert res["generation"]["max_new_tokens"] == 14 and res["generation"]["generated_tokens"] == 32 * 6 + 9 * 14
    assert res["overall"]["n"] == 41


def test_baseline_scores_fewer_benchmark_items_and_says_so(ctx, monkeypatch, tmp_path):
    import phibook.inference.generate as generate
    import phibook.train.trainer as trainer
    import phibook.weights.checkpoint as checkpoint

    (ctx.out / "eval").mkdir()
    (ctx.out / "eval/heldout.json").write_text(json.dumps({"items": [], "notes": {}}))
    ctx.benchmarks = tmp_path
    limits = []

    class Loaded:
        model = tokenizer = None

    monkeypatch.setattr(checkpoint, "load_model", lambda d: Loaded())
    monkeypatch.setattr(generate, "Generator", lambda m, t: _RecordingGenerator())
    monkeypatch.setattr(trainer, "validation_loss", lambda *a: None)  # the trainer's, which the demo uses
    monkeypatch.setattr(demo, "score_benchmarks",
                        lambda m, t, d, limit, p: limits.append(limit) or {"limit": limit, "results": {}})
    before = demo.evaluate_model(ctx, tmp_path, "before", mc_cap=demo.BASELINE_MC_LIMIT)
    after = demo.evaluate_model(ctx, tmp_path, "after")
    full = demo.mc_limit(15)
    assert limits == [demo.BASELINE_MC_LIMIT, full] and demo.BASELINE_MC_LIMIT < full
    assert before["benchmarks"] == {"limit": demo.BASELINE_MC_LIMIT, "results": {}, "limit_uncapped": full}
    assert after["benchmarks"]["limit"] == after["benchmarks"]["limit_uncapped"] == full


def test_train_budget_expects_the_uncapped_evaluation(ctx):
    minutes = ctx.opts.minutes
    ctx.state.record("baseline", 40.0, [], {"eval_seconds": {"exercises": 10.0, "benchmarks": 20.0},
                                            "caps": {"benchmark_items": 20, "benchmark_items_uncapped": 45}})
    # the evaluate stage scores 45 items where the baseline scored 20: 40 + 20 x (45/20 - 1) = 65 s
    assert ctx.train_budget() == pytest.approx(minutes * 60 - 40.0 - (1.1 * 65.0 + 15.0))
