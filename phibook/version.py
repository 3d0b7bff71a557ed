"""The package version, in a module of its own so that any layer can read it without importing the
``phibook`` facade (phibook/__init__.py). pyproject.toml reads it from here too."""

__version__ = "0.1.0"
