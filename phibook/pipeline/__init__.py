"""`phibook pipeline run`: phibook's data stages as datatrove pipelines (local, Slurm, Ray).

Floors, top to bottom:
- ``config``: the pipeline TOML, checked completely before anything runs;
- ``plan``: each stage as a short list of datatrove steps (one executor each);
- ``blocks``: the datatrove blocks, thin wrappers over the single-machine
  stages' own functions (phibook.data.clean, .tokenize, .synth, .filter).

The datatrove extra (``pip install phibook[datatrove]``) is needed only here.
"""
