"""The phi-1.5 network and its vocabulary: PhiConfig and presets (config.py), PhiModel (model.py),
the chunked LM-head loss it calls (fused_ce.py) and the BPE tokenizer (tokenizer.py).

The bottom layer: nothing here imports from any other phibook package.
"""
