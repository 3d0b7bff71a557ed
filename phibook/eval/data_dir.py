"""Where benchmark files are looked for: the one rule `phibook eval` and `phibook demo` share.

1. `--data-dir DIR` when given (an error if DIR is not a directory);
2. else `$PHIBOOK_DATA_DIR` when set (an error if it is not a directory);
3. else `../shared/benchmarks` beside the current directory, then beside the repository
   (the phibook checkout), the first that exists.

Nothing is ever downloaded: every place is a local folder. `find_data_dir` returns None when no
place holds a folder (the demo then skips its benchmark stage); `require_data_dir` turns that
into an error that lists where it looked (`phibook eval`).
"""

from __future__ import annotations

import os
from pathlib import Path

from phibook.errors import PhibookError

ENV_VAR = "PHIBOOK_DATA_DIR"

# The repository root of a source checkout: phibook/eval/data_dir.py -> parents[2].
REPO = Path(__file__).resolve().parents[2]


def default_locations() -> list[Path]:
    """The fallback folders, in the order they are tried: ../shared/benchmarks beside the
    current directory, then beside the repository (duplicates dropped)."""
    places: list[Path] = []
    for base in (Path.cwd(), REPO):
        path = base.parent / "shared" / "benchmarks"
        if path not in places:
            places.append(path)
    return places


def find_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The benchmark folder by the rule above; None when none of the places exists."""
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise PhibookError(f"--data-dir {path} is not a directory")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise PhibookError(f"${ENV_VAR}={env} is not a directory (unset it, or pass --data-dir DIR)")
        return path
    for path in default_locations():
        if path.is_dir():
            return path
    return None


def not_found_message() -> str:
    """Why there is no data folder, where the rule looked, and what to do (nothing is downloaded)."""
    looked = ", ".join(str(p) for p in default_locations())
    return (
        f"no benchmark data: pass --data-dir DIR or set ${ENV_VAR}; without them phibook looks for "
        f"../shared/benchmarks beside the current directory and the repository ({looked}: none exists). "
        "Nothing is downloaded: DIR holds one folder per task (the original release files or a Hugging Face "
        "hub copy, jsonl or parquet); docs/eval.md says where to get each file"
    )


def require_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """find_data_dir, with an error listing where it looked when nothing is found."""
    path = find_data_dir(data_dir)
    if path is None:
        raise PhibookError(not_found_message())
    return path
