"""What the demo prints and draws says each thing once and with the precision of its tables."""

from __future__ import annotations

import re

from phibook.demo.report import bar_label
from phibook.demo.stages import STAGE_TITLES, STAGES


def test_stage_lines_do_not_repeat_the_stage_name() -> None:
    # The runner prints "[i/9] name: title"; a title that starts with the name reads "clean: clean: ...".
    for name in STAGES:
        title = STAGE_TITLES[name]
        first = re.match(r"\w+", title.lower()).group(0)
        assert first != name, f"[i/9] {name}: {title}"


def test_chart_labels_keep_the_tables_precision() -> None:
    # 2.5% was drawn as "2%" (banker's rounding of "{:.0f}") while the table said 2.5%.
    assert bar_label(2.5) == "2.5%"
    assert bar_label(0.0) == "0.0%"
    assert bar_label(100.0) == "100.0%"
    assert bar_label(26.0) == "26.0%"


def test_time_plan_says_what_training_did_not_what_calibration_guessed() -> None:
    from phibook.demo.report import time_plan_sentence

    plan = {"max_steps": 200, "estimated_steps": 6, "min_steps": 200, "time_budget_s": 27.6,
            "calibrated_step_seconds": 2.97, "train_budget_seconds": 30.0}
    stats = {"steps": 1146, "train_elapsed": 690.2, "stopped_by": "the time budget"}
    text = time_plan_sentence(plan, stats)
    assert "trained 1,146 steps in 690 s, stopped by the time budget" in text
    assert "planned at 200" not in text and "never trains fewer than 200 steps" in text
