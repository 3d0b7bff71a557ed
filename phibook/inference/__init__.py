"""Running a model: the batched Generator with sampling and streaming (generate.py), the CPU
fast decode path (fast_decode.py) and the report's prompt formats (templates.py).

Used by generate/chat/serve, the evaluator and the local teacher; imports phibook.model and
phibook.weights only.
"""
