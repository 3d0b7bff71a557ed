"""What the demo does, in order: its stage names and titles, and the preset it pretrains.

Plain data, shared by the runner (run.py) and the renderer (report.py), so
rendering a report never imports the code that runs the stages.
"""

STAGES = ["synth", "clean", "tokenizer", "tokenize", "baseline", "train", "evaluate", "samples", "report"]
PRESET = "phi-tiny"
STAGE_TITLES = {
    "synth": "synthesize a textbook-and-exercises corpus", "clean": "filter, deduplicate and decontaminate",
    "tokenizer": "train a BPE tokenizer", "tokenize": "encode the documents into token shards",
    "baseline": "score the untrained (step-0) model", "train": f"pretrain {PRESET}",
    "evaluate": "score the trained model on the same items", "samples": "sample generations", "report": "write the report",
}
