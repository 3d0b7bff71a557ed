"""Pretraining: the training loop and its config (trainer.py), a run's checkpoints and resume state
(state.py), DDP/FSDP2 applied from outside the model (parallel.py) and the CPU allocator setting
(cpu_malloc.py).
"""
