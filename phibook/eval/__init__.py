"""Evaluation: benchmark tasks (task.py registry), the batched runner, results, the report's numbers,
and the sandbox that runs model-written code (sandbox.py)."""
