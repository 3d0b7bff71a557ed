"""The phi-1.5 report's Tables 2-4, transcribed, so `phibook eval` can print our numbers beside them.

Source: "Textbooks Are All You Need II: phi-1.5 technical report" (Li et al., 2023), section 3.
Tables 2-3 are zero-shot lm-evaluation-harness accuracies (MMLU 2-shot, SQuAD exact match);
Table 4 is zero-shot pass@1 in percent, stored here as fractions so every number is on
the scale our metrics use. None means "-" in the report; NOTES keep qualifiers such as
"< 3 (random guessing)" and "via coding" that a plain number cannot carry.
"""

from __future__ import annotations

# Column order of each table, as printed in the report.
TABLE_TASKS = {
    "Table 2": ["winogrande", "arc_easy", "arc_challenge", "boolq", "siqa"],
    "Table 3": ["piqa", "hellaswag", "mmlu", "openbookqa", "squad"],
    "Table 4": ["gsm8k", "humaneval", "mbpp"],
}

# The metric of ours that each report column is comparable with. Tasks missing here are
# compared on their first declared metric.
REPORT_METRIC = {
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc",
    "boolq": "acc",
    "siqa": "acc",
    "piqa": "acc",
    "hellaswag": "acc",
    "mmlu": "acc",
    "openbookqa": "acc",
    "squad": "exact_match",
    "gsm8k": "acc",
    "humaneval": "pass@1",
    "mbpp": "pass@1",
}

_ = None  # "-" in the report

# model -> task -> value (fractions). Row order as in the report.
REPORT_NUMBERS: dict[str, dict[str, float | None]] = {
    # Table 2 (WinoGrande, ARC-Easy, ARC-Challenge, BoolQ, SIQA) and Table 3 (PIQA, HellaSwag, MMLU,
    # OpenbookQA, SQuAD EM) and Table 4 (GSM8K, HumanEval, MBPP; percent / 100).
    "Llama-65B": {"gsm8k": 0.509, "humaneval": 0.237, "mbpp": 0.377},
    "Vicuna-13B": {
        "winogrande": 0.708, "arc_easy": 0.754, "arc_challenge": 0.432, "boolq": 0.835, "siqa": 0.437,
        "piqa": 0.774, "hellaswag": 0.578, "mmlu": _, "openbookqa": 0.330, "squad": _,
        "gsm8k": _, "humaneval": 0.134, "mbpp": _,
    },
    "Llama2-7B": {
        "winogrande": 0.691, "arc_easy": 0.763, "arc_challenge": 0.434, "boolq": 0.779, "siqa": 0.480,
        "piqa": 0.781, "hellaswag": 0.571, "mmlu": 0.453, "openbookqa": 0.314, "squad": 0.67,
        "gsm8k": 0.146, "humaneval": 0.128, "mbpp": 0.208,
    },
    "Llama-7B": {
        "winogrande": 0.669, "arc_easy": 0.682, "arc_challenge": 0.385, "boolq": 0.732, "siqa": 0.466,
        "piqa": 0.779, "hellaswag": 0.562, "mmlu": 0.352, "openbookqa": 0.284, "squad": 0.60,
        "gsm8k": 0.110, "humaneval": 0.114, "mbpp": 0.177,
    },
    "MPT-7B": {
        "winogrande": 0.680, "arc_easy": 0.749, "arc_challenge": 0.405, "boolq": 0.739, "siqa": 0.451,
        "piqa": 0.789, "hellaswag": 0.571, "mmlu": 0.268, "openbookqa": 0.314, "squad": 0.60,
        "gsm8k": 0.068, "humaneval": 0.183, "mbpp": 0.226,
    },
    "Falcon-7B": {
        "winogrande": 0.662, "arc_easy": 0.719, "arc_challenge": 0.363, "boolq": 0.685, "siqa": 0.452,
        "piqa": 0.794, "hellaswag": 0.542, "mmlu": 0.269, "openbookqa": 0.320, "squad": 0.16,
        "gsm8k": 0.068, "humaneval": 0.0, "mbpp": 0.117,
    },
    "Falcon-rw-1.3B": {
        "winogrande": 0.607, "arc_easy": 0.633, "arc_challenge": 0.282, "boolq": 0.632, "siqa": 0.405,
        "piqa": 0.747, "hellaswag": 0.466, "mmlu": 0.259, "openbookqa": 0.244, "squad": _,
        "gsm8k": _, "humaneval": 0.0, "mbpp": 0.0,
    },
    "OPT-1.3B": {
        "winogrande": 0.610, "arc_easy": 0.570, "arc_challenge": 0.232, "boolq": 0.596, "siqa": _,
        "piqa": 0.690, "hellaswag": 0.415, "mmlu": _, "openbookqa": 0.240, "squad": _,
        "gsm8k": _, "humaneval": 0.0, "mbpp": 0.0,
    },
    "GPT-Neo-2.7B": {
        "winogrande": 0.577, "arc_easy": 0.611, "arc_challenge": 0.274, "boolq": 0.618, "siqa": 0.400,
        "piqa": 0.729, "hellaswag": 0.427, "mmlu": _, "openbookqa": 0.232, "squad": _,
        "gsm8k": _, "humaneval": 0.0641, "mbpp": _,
    },
    "GPT2-XL-1.5B": {
        "winogrande": 0.583, "arc_easy": 0.583, "arc_challenge": 0.250, "boolq": 0.618, "siqa": 0.394,
        "piqa": 0.705, "hellaswag": 0.400, "mmlu": _, "openbookqa": 0.224, "squad": _,
        "gsm8k": _, "humaneval": 0.0, "mbpp": 0.0,
    },
    "phi-1.5-web-only (1.3B)": {
        "winogrande": 0.604, "arc_easy": 0.666, "arc_challenge": 0.329, "boolq": 0.632, "siqa": 0.414,
        "piqa": 0.743, "hellaswag": 0.478, "mmlu": 0.309, "openbookqa": 0.274, "squad": _,
        "gsm8k": _, "humaneval": 0.172, "mbpp": 0.273,
    },
    "phi-1.5-web (1.3B)": {
        "winogrande": 0.740, "arc_easy": 0.761, "arc_challenge": 0.449, "boolq": 0.728, "siqa": 0.530,
        "piqa": 0.770, "hellaswag": 0.484, "mmlu": 0.379, "openbookqa": 0.360, "squad": 0.74,
        "gsm8k": 0.446, "humaneval": 0.414, "mbpp": 0.435,
    },
    "phi-1.5 (1.3B)": {
        "winogrande": 0.734, "arc_easy": 0.756, "arc_challenge": 0.444, "boolq": 0.758, "siqa": 0.526,
        "piqa": 0.766, "hellaswag": 0.476, "mmlu": 0.376, "openbookqa": 0.372, "squad": 0.72,
        "gsm8k": 0.402, "humaneval": 0.341, "mbpp": 0.377,
    },
}

PHI15 = "phi-1.5 (1.3B)"

# Qualifiers printed in the report next to (or instead of) a number.
NOTES: dict[tuple[str, str], str] = {
    ("Falcon-rw-1.3B", "gsm8k"): "< 3 (random guessing)",
    ("OPT-1.3B", "gsm8k"): "< 3",
    ("GPT-Neo-2.7B", "gsm8k"): "< 3",
    ("GPT2-XL-1.5B", "gsm8k"): "< 3",
    ("phi-1.5-web-only (1.3B)", "gsm8k"): "< 3",
    ("phi-1.5-web (1.3B)", "gsm8k"): "via coding",
    ("phi-1.5 (1.3B)", "gsm8k"): "via coding",
}


def report_value(model: str, task: str) -> float | None:
    return REPORT_NUMBERS.get(model, {}).get(task)


def report_cell(model: str, task: str) -> str:
    """The report's entry as printed: 3 decimals, or its qualifier, or "-"."""
    value = report_value(model, task)
    note = NOTES.get((model, task))
    if value is None:
        return "<0.03" if note and note.startswith("<") else "-"
    return f"{value:.3f}" + (f" ({note})" if note else "")
