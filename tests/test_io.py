"""phibook.io: atomic writes survive a SIGKILL mid-write, and the sweeper removes only dead writers' leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from phibook import io

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a fault point must never fire inside the test process)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60)


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if io.temp_target(p) is not None)


def test_round_trips(tmp_path: Path) -> None:
    io.write_bytes(tmp_path / "b.bin", b"\x00\xffabc")
    io.write_text(tmp_path / "sub" / "t.txt", "héllo\n")  # the parent is created
    obj = {"a": [1, 2.5, None], "é": "ü", "nested": {"k": True}}
    io.write_json(tmp_path / "o.json", obj)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xffabc"
    assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "o.json").read_text()) == obj
    assert (tmp_path / "o.json").read_text().endswith("\n")
    io.write_json(tmp_path / "o.json", [3], indent=None)  # replaces an existing file
    assert json.loads((tmp_path / "o.json").read_text()) == [3]
    with io.open_atomic(tmp_path / "stream.jsonl") as f:
        for i in range(3):
            f.write(json.dumps({"i": i}) + "\n")
    assert [json.loads(x)["i"] for x in (tmp_path / "stream.jsonl").read_text().splitlines()] == [0, 1, 2]
    io.copy_file(tmp_path / "b.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"\x00\xffabc"
    assert _temps(tmp_path) == [] and _temps(tmp_path / "sub") == []


def test_temp_name_pattern(tmp_path: Path) -> None:
    t = io.temp_path(tmp_path / "data.json")
    assert t.parent == tmp_path and t.name.startswith(f".data.json.tmp-{os.getpid()}-")
    assert io.temp_target(t) == "data.json" and io.temp_target(tmp_path / "data.json") is None
    assert io.temp_path(tmp_path / "data.json") != t  # a random part: two threads never share one


def test_failed_block_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.open_atomic(target) as f:
        f.write("half of the new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with io.atomic_directory(target) as d:
        (d / "a").write_text("1")
    with io.atomic_directory(target) as d:  # replaces the existing directory whole
        (d / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"]
    with pytest.raises(RuntimeError), io.atomic_directory(target) as d:
        (d / "c").write_text("3")
        raise RuntimeError("export failed")
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("kind", ["bytes", "text", "json", "stream"])
def test_kill_during_write_keeps_old_file_and_sweep_removes_temp(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "state.json"
    io.write_json(target, {"version": 1})
    write = {
        "bytes": "io.write_bytes(t, b'{\"version\": 2}')",
        "text": "io.write_text(t, '{\"version\": 2}')",
        "json": "io.write_json(t, {'version': 2})",
        "stream": "cm = io.open_atomic(t); f = cm.__enter__(); f.write('{\"version\": 2}'); cm.__exit__(None, None, None)",
    }[kind]
    # The second commit of the child dies with its data fsynced under the temporary name, not renamed.
    code = f"from pathlib import Path; from phibook import io; t = Path({str(target)!r}); " \
           f"io.write_text(t.with_name('other'), 'x'); {write}"
    res = _run(code, PHIBOOK_FAULT_INJECT="io.write@2")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert json.loads(target.read_text()) == {"version": 1}  # the old file, whole
    assert (tmp_path / "other").read_text() == "x"  # the first commit went through
    [temp] = _temps(tmp_path)
    assert io.temp_target(temp) == "state.json"
    assert json.loads((tmp_path / temp).read_text()) == {"version": 2}  # fsynced, only not renamed
    assert io.sweep(tmp_path) == [tmp_path / temp]
    assert _temps(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["other", "state.json"]


def test_kill_during_directory_write_keeps_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with io.atomic_directory(target) as d:
        (d / "w").write_text("old")
    code = f"from phibook import io\nwith io.atomic_directory({str(target)!r}) as d:\n    (d / 'w').write_text('new')\n"
    res = _run(code, PHIBOOK_FAULT_INJECT="io.write@1")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert (target / "w").read_text() == "old" and len(_temps(tmp_path)) == 1
    io.sweep(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_sweep_leaves_a_live_writers_temp_alone(tmp_path: Path) -> None:
    # A live process that is not this one: it waits on its stdin until the test lets it go.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live_tmp = tmp_path / f".out.jsonl.tmp-{live.pid}-0123abcd"
        own_tmp = io.temp_path(tmp_path / "mine.json")  # this process: alive too
        dead_tmp = tmp_path / ".out.jsonl.tmp-999999-89abcdef"  # above pid_max on Linux: never alive
        other = tmp_path / ".out.jsonl.tmp"  # not the pattern: not ours to touch
        for p in (live_tmp, own_tmp, dead_tmp, other):
            p.write_text("partial")
        (tmp_path / ".gone.tmp-999998-00000000").mkdir()  # a dead writer's directory
        assert io.sweep(tmp_path, names=["elsewhere.json"]) == []  # names restricts the targets
        assert io.sweep(tmp_path) == sorted([dead_tmp, tmp_path / ".gone.tmp-999998-00000000"])
        assert live_tmp.exists() and own_tmp.exists() and other.exists()
    finally:
        live.communicate(b"", timeout=30)
    assert io.sweep(tmp_path) == [live_tmp]  # its writer is gone now
    assert own_tmp.exists() and other.exists()
    assert io.sweep(tmp_path / "missing") == []
