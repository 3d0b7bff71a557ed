"""What the demo does, in order: its stage names and titles, and the preset it pretrains.

Plain data, shared by the runner (run.py) and the renderer (report.py), so
rendering a report never imports the code that runs the stages.
"""

STAGES = ["synth", "clean", "tokenizer", "tokenize", "baseline", "train", "evaluate", "samples", "report"]
PRESET = "phi-tiny"
STAGE_TITLES = {
    "synth": "synthesize a textbook-and-exercises corpus", "clean": "clean: dedup and decontaminate",
    "tokenizer": "train a BPE tokenizer", "tokenize": "tokenize into shards",
    "baseline": "score the untrained (step-0) model", "train": f"pretrain {PRESET}",
    "evaluate": "evaluate the trained model", "samples": "sample generations", "report": "write the report",
}
