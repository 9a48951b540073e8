"""eval/sandbox.py: hostile programs are contained, the evaluation goes on, the host is untouched.

Each containment case runs the bad program, then a good one (which must still pass), and checks the
host: files in pytest's tmp_path, the test process itself, no sandbox process left, the temp dir
gone. Cases run twice where it matters: with the Python prelude (the default) and without it
(``python_guards=False``), which checks the OS-level limits alone.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import eval.sandbox as sandbox
from eval.sandbox import CHILD_MARKER, ExecResult, network_isolation, run_program
from utils.errors import UserError
from utils.paths import REPO_ROOT

GOOD = "def f(x):\n    return 2 * x\n\nassert f(21) == 42\n"
IS_ROOT = os.geteuid() == 0


def sandbox_processes() -> list[int]:
    """Live processes whose command line is the sandbox bootstrap (forked children keep it)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if CHILD_MARKER.encode() in cmdline and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


@pytest.fixture
def temp_dirs(monkeypatch) -> list[Path]:
    """Records every temp dir the sandbox creates."""
    made: list[Path] = []
    real = tempfile.mkdtemp

    def recording(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording)
    return made


def assert_host_fine(temp_dirs: list[Path]) -> None:
    """The evaluation goes on (a good program passes), no sandbox process is left, no temp dir either."""
    result = run_program(GOOD, timeout=10)
    assert result.status == "passed", result
    assert sandbox_processes() == []
    assert temp_dirs and not any(d.exists() for d in temp_dirs)
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)   # the host can still spawn


def test_passing_program_and_result_fields(temp_dirs):
    result = run_program(GOOD + "print('some output')\n", timeout=10)
    assert isinstance(result, ExecResult) and result.passed
    assert result.status == "passed" and result.detail == "" and 0 < result.seconds < 10
    assert len(temp_dirs) == 1 and not temp_dirs[0].exists()


def test_failing_assertion_and_syntax_error():
    failed = run_program("assert 1 + 1 == 3\n", timeout=10)
    assert (failed.status, failed.detail) == ("failed", "AssertionError")
    broken = run_program("def f(:\n    pass\n", timeout=10)
    assert broken.status == "failed" and broken.detail.startswith("SyntaxError")


def test_the_program_runs_in_its_own_temp_dir(temp_dirs):
    program = (
        "import os, tempfile\n"
        "cwd = os.getcwd()\n"
        "assert os.environ['HOME'] == cwd and tempfile.gettempdir() == cwd, (cwd, os.environ['HOME'])\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "os.mkdir('sub'); os.remove('scratch.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x')\n"
    )
    result = run_program(program, timeout=10)
    assert result.passed, result
    assert len(temp_dirs) == 1 and not temp_dirs[0].exists()


@pytest.mark.parametrize("guards", [True, False])
def test_infinite_loop_times_out(temp_dirs, guards):
    result = run_program("while True:\n    pass\n", timeout=1.5, python_guards=guards)
    assert result.status == "timeout", result
    assert 1.5 <= result.seconds < 6
    assert_host_fine(temp_dirs)


def test_fork_bomb_is_refused_by_the_prelude(temp_dirs):
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout=5)
    assert result.status == "failed" and "os.fork is disabled" in result.detail, result
    assert_host_fine(temp_dirs)


def test_fork_bomb_is_contained_by_the_process_limit(temp_dirs):
    # without the prelude: RLIMIT_NPROC makes fork fail; the exit status says how many forks succeeded
    counting = (
        "import os, sys, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "sys.exit(n)\n"
    )
    result = run_program(counting, timeout=10, max_processes=4, python_guards=False)
    assert result.status == "failed" and result.detail.startswith("exit status "), result
    started = int(result.detail.split()[-1])
    if IS_ROOT:   # a private uid: exactly max_processes more processes
        assert started == 4
    else:         # relative to the user's current count: bounded, not exact
        assert 0 <= started < 200
    assert sandbox_processes() == []   # the sleeping children died with the sandbox

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_program(bomb, timeout=2, max_processes=4, python_guards=False)
    assert result.status == "timeout", result
    assert_host_fine(temp_dirs)


@pytest.mark.parametrize("guards", [True, False])
def test_huge_allocation_fails_with_memory_error(temp_dirs, guards):
    result = run_program("x = bytearray(10 * 1024**3)\n", timeout=10, python_guards=guards)
    assert (result.status, result.detail) == ("failed", "MemoryError"), result
    assert_host_fine(temp_dirs)


@pytest.mark.parametrize("guards", [True, False])
def test_writing_outside_the_temp_dir_fails(temp_dirs, tmp_path, guards):
    if not guards and not IS_ROOT:
        pytest.skip("without root the candidate runs as the same user: only the prelude guards its files")
    target = tmp_path / "outside.txt"
    for program in (f"open({str(target)!r}, 'w').write('pwned')\n",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')\n",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))\n"):
        result = run_program(program, timeout=10, python_guards=guards)
        assert result.status == "failed" and "PermissionError" in result.detail, result
    assert not target.exists()
    assert_host_fine(temp_dirs)


@pytest.mark.parametrize("guards", [True, False])
def test_deleting_files_fails(temp_dirs, tmp_path, guards):
    if not guards and not IS_ROOT:
        pytest.skip("without root the candidate runs as the same user: only the prelude guards its files")
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for program in (f"import os\nos.remove({str(keep)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    f"import os\nos.rename({str(keep)!r}, 'stolen.txt')\n"):
        result = run_program(program, timeout=10, python_guards=guards)
        assert result.status == "failed" and "Error" in result.detail, result
    assert keep.read_text() == "precious"
    assert_host_fine(temp_dirs)


def test_network_isolation_is_reported():
    mechanism = network_isolation()
    print(f"network isolation on this machine: {mechanism}")
    assert mechanism in ("netns", "socket-blocked")


@pytest.mark.parametrize("guards", [True, False])
def test_sockets_cannot_reach_the_host(temp_dirs, guards):
    if not guards and network_isolation() != "netns":
        pytest.skip("no network namespace here: only the prelude blocks sockets")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n",
                        f"import socket\ns = socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))\n"):
            result = run_program(program, timeout=10, python_guards=guards)
            assert result.status == "failed" and "Error" in result.detail, result
        server.setblocking(False)
        with pytest.raises(BlockingIOError):   # nothing ever connected
            server.accept()
    assert_host_fine(temp_dirs)


def test_network_namespace_has_only_loopback():
    if network_isolation() != "netns":
        pytest.skip("no network namespace on this machine")
    program = "import socket\nassert [name for _, name in socket.if_nameindex()] == ['lo'], socket.if_nameindex()\n"
    assert run_program(program, timeout=10, python_guards=False).passed


@pytest.mark.parametrize("guards", [True, False])
@pytest.mark.parametrize("program", ["import sys\nsys.exit(0)\nassert False\n",
                                     "import os\nos._exit(0)\nassert False\n",
                                     "print('almost done')\nraise SystemExit\n"])
def test_early_exit_does_not_pass(temp_dirs, program, guards):
    result = run_program(program, timeout=10, python_guards=guards)
    assert result.status == "failed" and "before the end" in result.detail, result
    assert_host_fine(temp_dirs)


def test_exit_status_and_signals_are_reported():
    exited = run_program("import sys\nsys.exit(3)\n", timeout=10)
    assert (exited.status, exited.detail) == ("failed", "exit status 3")
    killed = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", timeout=10)
    assert (killed.status, killed.detail) == ("error", "killed by SIGSEGV")


def test_output_is_capped_by_the_file_size_limit(temp_dirs):
    result = run_program("import sys\nsys.stdout.write('x' * (4 * 2**20))\n", timeout=10, max_file_mb=1)
    assert result.status != "passed", result
    assert_host_fine(temp_dirs)


@pytest.mark.parametrize("guards", [True, False])
def test_killing_the_parent_is_contained(guards):
    if not guards and not IS_ROOT:
        pytest.skip("without root, only the prelude (and a pid namespace, where allowed) protects the parent")
    # run through an intermediate process: even if the kill escaped, it would hit that one, not pytest
    program = "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(0.5)\n"
    driver = (
        "import json, sys\n"
        "from eval.sandbox import run_program\n"
        f"r = run_program({program!r}, timeout=10, python_guards={guards})\n"
        "print(json.dumps([r.status, r.detail]))\n"
        "r = run_program('assert 1 + 1 == 2', timeout=10)\n"
        "print(json.dumps([r.status, r.detail]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", driver], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines()[-2:])
    if guards:
        assert first[0] == "failed" and "os.kill of another process is disabled" in first[1], first
    else:   # its parent is the namespace's init (or, without a pid namespace, another uid's process)
        assert first[0] in ("passed", "failed", "error"), first
    assert second == ["passed", ""]
    assert sandbox_processes() == []
    os.kill(os.getpid(), 0)   # and we are alive, of course


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": float("nan")}, {"memory_mb": 10},
                                    {"max_processes": -1}, {"max_file_mb": 0}])
def test_bad_limits_are_user_errors(kwargs):
    with pytest.raises(UserError):
        run_program(GOOD, **kwargs)

