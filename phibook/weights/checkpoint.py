"""Checkpoints on disk: write them atomically, find them, and load any phi model directory.

A phibook checkpoint directory holds ``model.safetensors`` (our tensor names),
``config.json`` (``PhiConfig`` fields + ``"format": "phibook"``) and, when the
model has one, ``tokenizer.json``. ``load_model`` also takes a training run
directory (it picks the newest ``checkpoints/step_*``) or an HF directory in
any of the layouts ``phibook.weights.hf`` knows, stored as safetensors or
pytorch_model.bin, single-file or sharded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from phibook.errors import PhibookError
from phibook.io import atomic_directory
from phibook.model.config import PhiConfig
from phibook.model.model import PhiModel
from phibook.version import __version__
from phibook.weights.hf import IGNORED_SUFFIXES, detect_layout, foreign_to_phi, hf_config_to_phi, name_map

if TYPE_CHECKING:
    from phibook.model.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "phibook"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Weight files in the order we look for them; an index.json names the shards.
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# A safetensors JSON header larger than this is corrupt, not big.
MAX_HEADER_BYTES = 100 << 20
FINGERPRINT_SAMPLES = 64

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """What ``load_model`` returns: the model in eval mode and everything known about it."""

    model: PhiModel
    config: PhiConfig
    tokenizer: Tokenizer | None
    source: str  # "phibook" or "hf"
    path: Path  # the checkpoint directory actually loaded (resolved from a run dir)
    fingerprint: str  # cheap hash of config + weight file headers; see model_fingerprint


# --------------------------------------------------------------------------- writing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_model_files(directory: Path, model: PhiModel, tokenizer: Tokenizer | str | Path | None = None) -> None:
    """Write model.safetensors, config.json and (if given) tokenizer.json into ``directory``.

    Not atomic by itself: callers write into a temporary directory (see
    ``save_checkpoint`` / ``atomic_directory``). ``tokenizer`` is a
    ``phibook.model.tokenizer.Tokenizer`` or a path to a tokenizer.json (or a
    directory holding one).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Save from the plain module: strip wrappers (torch.compile, DDP) that rename keys.
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": FORMAT})
    cfg = {**model.config.to_dict(), "format": FORMAT, "phibook_version": __version__}
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save"):
        tokenizer.save(directory)
    else:
        src = Path(tokenizer)
        src = src / TOKENIZER_FILE if src.is_dir() else src
        if not src.is_file():
            raise PhibookError(f"tokenizer file not found: {src}")
        shutil.copyfile(src, directory / TOKENIZER_FILE)


def save_checkpoint(directory: str | os.PathLike, model: PhiModel, tokenizer=None) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename); replaces an existing one safely."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model, tokenizer)
    return directory


# --------------------------------------------------------------------------- finding


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``path`` names: itself, or a run dir's newest step_* checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        # phibook.io.atomic_directory's temporaries (the new copy, or the old one moved aside).
        leftovers = sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*")) if path.parent.is_dir() else []
        hint = f" (an interrupted save left {leftovers[0]})" if leftovers else ""
        raise PhibookError(f"model path {path} does not exist{hint}")
    if path.is_file():
        if path.name in (CONFIG_FILE, MODEL_FILE, BIN_FILE, SAFETENSORS_INDEX, BIN_INDEX):
            return path.parent
        raise PhibookError(f"model path {path} is a file; pass the checkpoint directory that holds it")
    if (path / CONFIG_FILE).is_file():
        return path
    for runs in (path / "checkpoints", path):
        step = _latest_step(runs)
        if step is not None:
            return step
    found = sorted(p.name for p in path.iterdir())[:8]
    raise PhibookError(
        f"{path} is not a checkpoint: expected {CONFIG_FILE} with {MODEL_FILE} (phibook or HF), "
        f"or HF shards (*.safetensors / {BIN_FILE} with an index.json), or a training run with "
        f"checkpoints/step_*/{MODEL_FILE}; found {found or 'an empty directory'}"
    )


def _latest_step(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    steps = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / MODEL_FILE).is_file() and (child / CONFIG_FILE).is_file():
            steps.append((int(match.group(1)), child))
    return max(steps)[1] if steps else None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, shards resolved through index.json."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            return _shards_from_index(index)
    for name in (MODEL_FILE, BIN_FILE):
        if (directory / name).is_file():
            return [directory / name]
    raise PhibookError(
        f"{directory}: no weights file; expected {MODEL_FILE}, {SAFETENSORS_INDEX} with its shards, "
        f"{BIN_FILE} or {BIN_INDEX} with its shards"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PhibookError(f"cannot read shard index {index}: {exc}") from exc
    shards: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, tensor)
    for shard, tensor in shards.items():
        if not (index.parent / shard).is_file():
            raise PhibookError(f"{index}: shard {shard} (holding {tensor} and others) is missing")
    return [index.parent / shard for shard in sorted(shards)]


# --------------------------------------------------------------------------- reading


def safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse and validate a safetensors header; catch truncated files before reading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(size - 8, MAX_HEADER_BYTES):
            raise PhibookError(f"weights file {path} is truncated or not safetensors (file is {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise PhibookError(f"weights file {path} has a corrupt safetensors header: {exc}") from exc
    if 8 + n + end > size:
        raise PhibookError(
            f"weights file {path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
        )
    return header, head + raw


def read_weights(files: list[Path], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """All tensors of ``files``, cast tensor by tensor to ``dtype`` (None keeps the stored dtype)."""
    state: dict[str, Tensor] = {}
    for path in files:
        part = _read_safetensors(path, dtype) if path.suffix == ".safetensors" else _read_bin(path, dtype)
        clash = state.keys() & part.keys()
        if clash:
            raise PhibookError(f"{path}: tensor {sorted(clash)[0]} also appears in another weights file")
        state.update(part)
    return state


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, Tensor]:
    from safetensors import safe_open

    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError and friends
        raise PhibookError(f"cannot read weights file {path}: {exc}") from exc


def _read_bin(path: Path, dtype: torch.dtype | None) -> dict[str, Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Pre-zipfile torch.save format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PhibookError(f"cannot read weights file {path} (truncated or not a torch file?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PhibookError(f"weights file {path} does not hold a flat dict of tensors")
    return {k: _cast(v, dtype) for k, v in state.items()}


# --------------------------------------------------------------------------- loading


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PhibookError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(directory: Path) -> tuple[PhiConfig, str]:
    """(config, source) from ``directory/config.json``; source is "phibook" or "hf"."""
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PhibookError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PhibookError(f"{path}: expected a JSON object")
    if data.get("format") == FORMAT:
        try:
            return PhiConfig.from_dict(data, source=str(path)), FORMAT
        except TypeError as exc:
            raise PhibookError(f"{path}: {exc}") from exc
    if "model_type" not in data:
        raise PhibookError(f"{path}: neither a phibook config (\"format\": \"phibook\") nor an HF one (model_type)")
    return hf_config_to_phi(data, source=str(path)), "hf"


def check_tensors(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes of ``state`` against what the config implies; name the first misfit."""
    missing = sorted(expected.keys() - state.keys())
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise PhibookError(f"{source}: {len(missing)} tensor(s) missing: {', '.join(missing[:5])}{more}")
    extra = sorted(state.keys() - expected.keys())
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise PhibookError(f"{source}: {len(extra)} unexpected tensor(s): {', '.join(extra[:5])}{more}")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != tuple(shape):
            raise PhibookError(
                f"{source}: tensor {name} has shape {list(got)} but the config expects {list(shape)}"
            )


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a phibook checkpoint, a training run's newest checkpoint, or an HF phi directory.

    The model is built on the meta device and takes the loaded tensors
    without a copy (``load_state_dict(assign=True)``); weights are cast to
    ``dtype`` one tensor at a time (None keeps the stored dtype) while the
    rotary tables stay fp32. Bad input raises PhibookError naming the file or
    tensor at fault.
    """
    dtype = _as_dtype(dtype)
    directory = find_checkpoint(path)
    cfg, source = read_config(directory)
    files = weight_files(directory)
    where = str(files[0]) if len(files) == 1 else f"{directory} ({len(files)} shards)"
    tokenizer = _load_tokenizer(directory, cfg) if load_tokenizer else None

    with torch.device("meta"):
        model = PhiModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_weights(files, dtype)
    layout = None if source == FORMAT else detect_layout(state)
    if source != FORMAT and layout is None:
        raise PhibookError(
            f"{where}: tensor names fit no known phi layout (looked for model.embed_tokens.weight, "
            f"layers.0.wte.weight or transformer.embd.wte.weight); first names: {sorted(state)[:3]}"
        )
    if layout is not None:
        foreign = _foreign_shapes(expected, name_map(cfg, layout))
        _check_foreign_extras(state, foreign, where)
        keep = {k: v for k, v in state.items() if k in foreign}
        state.clear()  # so q/k/v parts are freed as soon as they are fused
        check_tensors(keep, foreign, where)
        state = foreign_to_phi(keep, cfg, layout, where)
    check_tensors(state, expected, where)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_rope()
    model.to(device)
    model.eval()
    return LoadedModel(model, cfg, tokenizer, source, directory, model_fingerprint(directory))


def _foreign_shapes(expected: dict[str, tuple[int, ...]], mapping: dict[str, tuple[str, ...]]):
    """Shapes each foreign tensor must have: ours, split evenly along dim 0 across q/k/v parts."""
    out = {}
    for ours, parts in mapping.items():
        shape = expected[ours]
        for name in parts:
            out[name] = (shape[0] // len(parts), *shape[1:])
    return out


def _check_foreign_extras(state: dict[str, Tensor], foreign: dict[str, Any], where: str) -> None:
    extra = sorted(k for k in state if k not in foreign and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise PhibookError(f"{where}: {len(extra)} unexpected tensor(s): {', '.join(extra[:5])}{more}")


def _load_tokenizer(directory: Path, cfg: PhiConfig) -> Tokenizer | None:
    from phibook.model.tokenizer import Tokenizer

    if not (directory / TOKENIZER_FILE).is_file():
        return None
    tok = Tokenizer.from_file(directory / TOKENIZER_FILE)
    if tok.vocab_size > cfg.vocab_size:
        raise PhibookError(
            f"{directory / TOKENIZER_FILE}: tokenizer has {tok.vocab_size} tokens but the model has only "
            f"{cfg.vocab_size} embedding rows (config vocab_size); they do not belong together"
        )
    return tok


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap, stable id of a checkpoint's contents (16 hex chars).

    sha256 of config.json, each weight file's name and size, its safetensors
    header (every tensor's name, dtype, shape, offsets) and 64 samples of 4 KiB
    spread over the file. Sampling keeps it fast on GB files while any training
    step, which moves every weight, still changes it.
    """
    directory = find_checkpoint(path)
    h = hashlib.sha256()
    h.update((directory / CONFIG_FILE).read_bytes())
    for file in weight_files(directory):
        size = file.stat().st_size
        h.update(f"\0{file.name}\0{size}\0".encode())
        if file.suffix == ".safetensors":
            h.update(safetensors_header(file)[1])
        with open(file, "rb") as f:
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(size * k // FINGERPRINT_SAMPLES)
                h.update(f.read(4096))
    return h.hexdigest()[:16]
