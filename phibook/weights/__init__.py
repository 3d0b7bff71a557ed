"""Model files on disk: the phibook checkpoint format (checkpoint.py), importing Hugging Face
Phi directories (hf.py: name maps, layouts, config translation) and exporting to them (export.py).

Imports only phibook.model.
"""
