"""The end-to-end demo: its stage names (stages.py), the stages themselves (run.py), sample
generations (samples.py) and the report, a pure renderer of what a run directory holds (report.py).
"""
