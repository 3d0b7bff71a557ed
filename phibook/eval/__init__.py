"""Evaluation: benchmark tasks (task.py registry), the batched runner, results and the report's numbers."""
