"""Mixtures: several shard sets sampled by weight, described by a small TOML file.

    name = "phi-1.5"
    [[sources]]
    name = "synthetic"
    path = "shards/synthetic"      # a manifest.json or its folder, relative to this file
    weight = 0.8

Weights are normalized to sum to one. Every source must have been tokenized
with the same tokenizer (same fingerprint), since the model sees one
vocabulary. A plain manifest (or its folder) is a one-source mixture.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from phibook.data.shards import Manifest, load_manifest
from phibook.errors import PhibookError


@dataclass
class Source:
    name: str
    manifest: Manifest
    weight: float  # normalized


@dataclass
class Mixture:
    name: str
    sources: list[Source]
    path: Path  # the TOML file, or the manifest for a one-source mixture

    @property
    def fingerprint(self) -> str:
        return self.sources[0].manifest.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.sources[0].manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.sources[0].manifest.eos_id

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


def _check_one_tokenizer(sources: list[Source], where: Path) -> None:
    first = sources[0]
    for other in sources[1:]:
        a, b = first.manifest, other.manifest
        if (a.fingerprint, a.vocab_size, a.eos_id) != (b.fingerprint, b.vocab_size, b.eos_id):
            raise PhibookError(
                f"{where}: sources were tokenized with different tokenizers: "
                f"{first.name!r} ({a.path}) has fingerprint {a.fingerprint} (vocab {a.vocab_size}, eos {a.eos_id}) "
                f"but {other.name!r} ({b.path}) has fingerprint {b.fingerprint} (vocab {b.vocab_size}, eos {b.eos_id}); "
                "re-tokenize them with one tokenizer"
            )


# The report's three recipes, shipped with the package and runnable by name.
SHIPPED_MIXTURES = Path(__file__).resolve().parent / "mixtures"


def shipped_mixture_names() -> list[str]:
    """Names ``--data`` accepts for the report's mixtures: phi-1.5, phi-1.5-web, phi-1.5-web-only."""
    return sorted(p.stem for p in SHIPPED_MIXTURES.glob("*.toml"))


def load_mixture_file(path: str | Path, base: Path | None = None) -> Mixture:
    """Parse a mixture TOML, resolve each source's manifest relative to ``base`` (default: the
    file's folder), normalize weights."""
    path = Path(path)
    base = path.parent if base is None else Path(base)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PhibookError(f"cannot read mixture file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PhibookError(f"{path}: not valid TOML: {exc}") from exc
    raw_sources = data.get("sources")
    if not raw_sources:
        raise PhibookError(f"{path}: the mixture is empty (add at least one [[sources]] table)")
    if not isinstance(raw_sources, list):
        raise PhibookError(f"{path}: 'sources' must be an array of tables ([[sources]])")
    entries = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_sources):
        where = f"{path}: sources[{i}]"
        if not isinstance(raw, dict) or "path" not in raw:
            raise PhibookError(f"{where} needs a 'path' (a manifest.json or its folder)")
        unknown = sorted(set(raw) - {"name", "path", "weight"})
        if unknown:
            raise PhibookError(f"{where} has unknown keys {unknown} (allowed: name, path, weight)")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0 or weight != weight:
            raise PhibookError(f"{where}: weight must be a number >= 0, got {weight!r}")
        name = str(raw.get("name") or raw["path"])
        if name in seen:
            raise PhibookError(f"{where}: source name {name!r} is used twice")
        seen.add(name)
        manifest_path = (base / raw["path"]).resolve()
        try:
            manifest = load_manifest(manifest_path)
        except PhibookError as exc:
            raise PhibookError(f"{where} ({name!r}): {exc}") from exc
        entries.append((name, manifest, float(weight)))
    total = sum(w for _, _, w in entries)
    if total <= 0:
        raise PhibookError(f"{path}: all source weights are zero; at least one must be positive")
    # A zero-weight source stays out of sampling (a handy way to switch one off).
    sources = [Source(n, m, w / total) for n, m, w in entries if w > 0]
    _check_one_tokenizer(sources, path)
    return Mixture(name=str(data.get("name", path.stem)), sources=sources, path=path)


def load_data(path: str | Path) -> Mixture:
    """What ``--data`` accepts: a mixture ``.toml``, a ``manifest.json``, a folder holding one, or
    the name of a shipped mixture (its source paths then read relative to the current directory)."""
    path = Path(path)
    if not path.exists() and str(path) in shipped_mixture_names():
        # A name, not a path: the shipped recipe over shard folders under the current directory.
        return load_mixture_file(SHIPPED_MIXTURES / f"{path}.toml", base=Path.cwd())
    if path.suffix == ".toml":
        return load_mixture_file(path)
    manifest = load_manifest(path)
    return Mixture(name=manifest.source, sources=[Source(manifest.source, manifest, 1.0)], path=manifest.path)
