"""The data stages, files in and files out: synthetic textbooks (synth/), the web/code quality
filter (filter/), dedup and decontamination (clean.py), token shards (tokenize.py, shards.py),
mixtures (mixture.py, with the report's mixtures in mixtures/) and the packed training loader
(loader.py).
"""
