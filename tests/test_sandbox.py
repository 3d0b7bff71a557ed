"""The code sandbox: normal programs run, hostile ones are contained and reported, the host is untouched."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from phibook.eval.sandbox import capabilities, check_many, check_program, run_many, run_python


@pytest.fixture(scope="module")
def layers() -> dict:
    return capabilities()


def test_normal_program_stdout_stdin_and_exit_code():
    r = run_python("import sys\nprint('hello', input())\nprint('to err', file=sys.stderr)", stdin="world\n")
    assert r.status == "ok" and r.returncode == 0
    assert r.stdout == "hello world\n"
    assert "to err" in r.stderr
    r = run_python("raise SystemExit(3)")
    assert r.status == "error" and r.returncode == 3
    r = run_python("1/0")
    assert r.status == "error" and "ZeroDivisionError" in r.stderr
    assert "sandbox.py" not in r.stderr  # traceback starts at the program, not the launcher


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("PHIBOOK_SECRET_TOKEN", "abc123")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.ok
    assert "PHIBOOK_SECRET_TOKEN" not in r.stdout


def test_infinite_loop_times_out_quickly():
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.status == "timeout"
    assert r.duration_s < 5.0


def test_cpu_limit_counts_as_timeout():
    # The wall clock is generous; RLIMIT_CPU (1 s) stops the busy loop first.
    r = run_python("while True:\n    pass", timeout_s=20.0, cpu_s=1)
    assert r.status == "timeout"
    assert r.duration_s < 15.0


def test_sleeping_program_is_stopped_by_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert r.status == "timeout"


def test_memory_bomb_fails_instead_of_hanging():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", memory_mb=256, timeout_s=20)
    assert r.status == "oom"
    r = run_python("x = bytearray(8 * 2**30)", memory_mb=256)
    assert r.status == "oom"


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nwhile True:\n    os.fork()",  # fork bomb
        "import threading\nthreading.Thread(target=print).start()",
    ],
)
def test_no_child_processes(layers, code):
    if not layers["no_child_processes"]:
        pytest.skip("RLIMIT_NPROC cannot be enforced here")
    r = run_python(code, timeout_s=5)
    assert r.status == "error", r
    assert "BlockingIOError" in r.stderr or "can't start new thread" in r.stderr


def test_writes_outside_the_work_dir_fail_and_the_work_dir_is_removed(layers, tmp_path: Path):
    if not layers["write_confinement"]:
        pytest.skip("no Landlock in this kernel: writes are confined only by file permissions")
    tmp_path.chmod(0o777)  # even a world-writable directory stays out of reach
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = f"""
import os, shutil
outside = {str(tmp_path)!r}
for attempt in (lambda: open(os.path.join(outside, 'new.txt'), 'w'),
                lambda: open(os.path.join(outside, 'keep.txt'), 'w'),
                lambda: os.remove(os.path.join(outside, 'keep.txt')),
                lambda: os.mkdir(os.path.join(outside, 'd')),
                lambda: open('/tmp/phibook-sandbox-escape', 'w')):
    try:
        attempt()
        print('ESCAPED')
    except OSError as exc:
        print('blocked', exc.errno)
with open('inside.txt', 'w') as f:  # the throw-away directory is writable
    f.write('fine')
print(os.getcwd())
"""
    r = run_python(code)
    assert r.ok, r.stderr
    assert "ESCAPED" not in r.stdout
    assert r.stdout.count("blocked") == 5
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert not os.path.exists("/tmp/phibook-sandbox-escape")
    work_dir = r.stdout.strip().splitlines()[-1]
    assert not os.path.exists(work_dir)


def test_network_is_blocked(layers):
    if not layers["network_isolation"]:
        pytest.skip("this OS allows neither a network namespace nor Landlock TCP rules: network is not isolated")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list = []
    server.settimeout(5)

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')"
    r = run_python(code, timeout_s=10)
    server.close()
    t.join()
    assert r.status == "error"
    assert "CONNECTED" not in r.stdout
    assert not accepted


def test_killing_the_parent_fails(layers):
    if not layers["signal_isolation"]:
        pytest.skip("the sandbox runs as our own uid without Landlock signal scoping")
    r = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert r.status == "error" and "PermissionError" in r.stderr
    r = run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('survived')")
    assert r.status in ("error", "ok")  # either refused or it only hit itself; we are still alive


def test_huge_output_is_truncated_not_buffered():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=5, max_file_mb=8)
    assert r.status in ("killed", "timeout", "error")
    assert len(r.stdout) <= (1 << 20) + 100


def test_check_program_pass_and_fail():
    program = "def add(a, b):\n    return a + b\n"
    assert check_program(program, "assert add(1, 2) == 3").passed
    bad = check_program("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3")
    assert not bad.passed and bad.status == "error"
    slow = check_program("def add(a, b):\n    while True:\n        pass\n", "assert add(1, 2) == 3", timeout_s=1)
    assert not slow.passed and slow.status == "timeout"


def test_pool_keeps_order():
    results = run_many([f"print({i} * {i})" for i in range(6)], workers=2)
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]
    outcomes = check_many([("x = 1", "assert x == 1"), ("x = 2", "assert x == 1")], workers=2)
    assert [o.passed for o in outcomes] == [True, False]
