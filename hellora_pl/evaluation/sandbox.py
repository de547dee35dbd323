"""Run untrusted (model-generated) Python programs in a separate, confined process.

Code benchmarks (HumanEval, MBPP) execute whatever the model wrote. Each program runs in its own
child interpreter; the calling (training) process never execs or evals it. The child is a small
runner script (``_RUNNER_SOURCE``, written next to the program) that confines itself in layers before
it runs ``program.py`` as ``__main__``. Every layer that cannot be applied on this machine is skipped
and :attr:`SandboxResult.isolation` records the ones that were active.

Layers, what they stop, and what they do not:

``rlimits`` (kernel)
    CPU seconds (SIGXCPU, then SIGKILL), address space (a memory bomb gets ``MemoryError``), file size
    (stdout/stderr are files, so huge output is cut by SIGXFSZ), no core files, few open files, and
    RLIMIT_NPROC. RLIMIT_NPROC counts *all* processes of the real user, so ``max_processes=1`` means
    "no fork at all" for an ordinary user; it is not enforced for root in the initial user namespace,
    where the audit hook and the process-group kill are what stop forks.
``session`` (parent side)
    ``start_new_session=True`` puts the program in its own process group; the parent SIGKILLs the
    whole group on timeout and again after every exit, so stragglers from a fork do not outlive the
    program. A child that calls ``setsid()`` itself would leave the group (the audit hook and
    RLIMIT_NPROC are what keep forks from happening in the first place).
``netns`` (kernel)
    ``unshare(CLONE_NEWNET)`` (or with ``CLONE_NEWUSER`` when not privileged): the only interface is a
    loopback that is down, so no TCP/UDP/DNS traffic leaves, and nothing reaches the parent's
    listening sockets. Path-named Unix sockets are files, not network, and are not covered by it.
``landlock`` (kernel, Linux >= 5.13)
    Reads are allowed everywhere; writes, creates, removes, renames and links only beneath the temporary
    directory (and writes to ``/dev/null``); no ``execve`` anywhere; no device nodes. ABI >= 4 also denies
    every TCP bind/connect, ABI >= 6 confines signals and abstract Unix sockets to the sandbox. Landlock
    has no rights for chmod/chown/utime/xattrs, so with the kernel layers alone a root program can still
    change the metadata of outside files; the audit hook refuses that.
``audit`` (Python level, works everywhere)
    A ``sys.addaudithook`` hook, which Python code cannot remove, raises ``PermissionError`` on fork,
    exec, spawn, subprocess, ``os.system``, kill, sockets (except local ``AF_UNIX`` pairs), ctypes use
    (importing it works, as numpy needs; loading, symbol lookup, foreign calls and raw memory do not),
    ``gc`` object introspection, and on writes/removes/renames/chmods of paths outside the temporary
    directory. It is defence in depth against careless code, not a security boundary: a C extension
    that is already loaded, or a program that monkeypatches the stdlib helpers the hook relies on, can
    get around it. Against a deliberate attacker the kernel layers are what hold.

Not covered: disk usage inside the temporary directory (each file is bounded, their number is not),
reads of files the user may read, and CPU/memory contention with the parent.

For tests and debugging, :func:`run_program` takes a keyword ``layers=`` naming the optional layers to
attempt (``"netns"``, ``"landlock"``, ``"audit"``); rlimits and the session are always on.
"""

from __future__ import annotations

import functools
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

OPTIONAL_LAYERS = ("netns", "landlock", "audit")
STATUSES = ("passed", "failed", "timeout", "memory", "killed", "error")
_MAX_REASON = 300


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program; recorded with results so a score says how it was obtained."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int | None = None  # RLIMIT_CPU; None -> ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also bounds stdout/stderr, which are files)
    max_processes: int = 1  # RLIMIT_NPROC: counts all the user's processes, not enforced for root
    output_bytes: int = 16_384  # stdout/stderr kept, each
    network: bool = False  # network access is never granted; the field makes the record say so

    def __post_init__(self) -> None:
        if self.network:
            raise ValueError(
                "SandboxLimits(network=True) is not supported: sandboxed programs never get network access"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "max_processes", "output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s must be at least 1 or None, got {self.cpu_s}")

    @property
    def effective_cpu_s(self) -> int:
        """The CPU budget: by default a little over the wall clock, so a busy loop hits the timeout first."""
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program; ``isolation`` lists the layers that were actually active."""

    passed: bool  # exit status 0, within all limits
    status: str  # one of STATUSES
    reason: str  # one line for humans: "AssertionError", "timed out after 3 s", "exceeded 1024 MB", ...
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: tuple[str, ...]


def run_program(
    source: str, limits: SandboxLimits = SandboxLimits(), *, layers: Collection[str] | None = None
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a fresh confined interpreter and classify how it ended.

    ``layers`` (keyword, for tests/debugging) restricts the optional layers tried; None tries all.
    """
    wanted = _check_layers(layers)
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hellora-sandbox-", ignore_cleanup_errors=True) as tmp:
            root = Path(os.path.realpath(tmp))
            (root / "program.py").write_text(source, encoding="utf-8")
            (root / "runner.py").write_text(_RUNNER_SOURCE, encoding="utf-8")
            return _run_in(root, limits, wanted)
    except OSError as exc:  # no disk, fds or processes left: one failed sample, not a crashed training run
        return _error_result(f"sandbox could not run the program: {exc}", time.monotonic() - start)


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 4,
    *,
    layers: Collection[str] | None = None,
) -> list[SandboxResult]:
    """Run many programs concurrently (threads only wait on child processes); results keep input order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits, layers=layers), sources))


@functools.lru_cache(maxsize=1)
def isolation_layers() -> tuple[str, ...]:
    """Layers this machine supports, found by running an empty program once (cached)."""
    return run_program("", SandboxLimits(timeout_s=30.0)).isolation


def _check_layers(layers: Collection[str] | None) -> tuple[str, ...]:
    if layers is None:
        return OPTIONAL_LAYERS
    unknown = sorted(set(layers) - set(OPTIONAL_LAYERS))
    if unknown:
        raise ValueError(f"unknown sandbox layers {unknown}; choose from {list(OPTIONAL_LAYERS)}")
    return tuple(layer for layer in OPTIONAL_LAYERS if layer in layers)


def _child_env(root: Path) -> dict[str, str]:
    """A minimal environment: nothing from the parent leaks in, hashing and BLAS threads are fixed."""
    return {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(root),
        "TMPDIR": str(root),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _command(root: Path, limits: SandboxLimits, report_fd: int, wanted: tuple[str, ...]) -> list[str]:
    """``-s`` skips the user site; not ``-I``, whose ``-E`` would drop PYTHONHASHSEED (the env is ours anyway)."""
    numbers = (
        limits.effective_cpu_s,
        limits.memory_mb * 2**20,
        limits.file_size_mb * 2**20,
        limits.max_processes,
        report_fd,
    )
    return [sys.executable, "-s", "-B", str(root / "runner.py"), str(root), *map(str, numbers), ",".join(wanted)]


def _run_in(root: Path, limits: SandboxLimits, wanted: tuple[str, ...]) -> SandboxResult:
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    _command(root, limits, write_fd, wanted),
                    cwd=root,
                    env=_child_env(root),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(write_fd,),
                )
            finally:
                os.close(write_fd)  # the child holds the only write end, so a read cannot wait on us
        timed_out = _wait_then_kill_group(proc, limits.timeout_s)
        duration = time.monotonic() - start
        report = _read_report(read_fd)
    finally:
        os.close(read_fd)
    stdout = _read_head(root / "stdout", limits.output_bytes)
    stderr = _read_tail(root / "stderr", limits.output_bytes)
    return _result(proc.returncode, timed_out, report, stdout, stderr, duration, limits)


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for exit (or the deadline), SIGKILL the process group, then reap; returns True on timeout.

    The group is killed before the leader is reaped: while it is a zombie its pid cannot be reused,
    so the kill cannot hit an unrelated process group.
    """
    timed_out = not _wait_unreaped(proc, timeout_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return timed_out


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True when the child exited within the deadline; uses a pidfd so the zombie is left for the group kill."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return _wait_reaping(proc, timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _wait_reaping(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Fallback without pidfds (macOS, old kernels): ``Popen.wait`` reaps, then the group is killed."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _read_report(fd: int) -> tuple[str, ...] | None:
    """Layers the runner applied, read from its report pipe; None when it never reached the program."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return None
    line, newline, _ = data.decode("ascii", "replace").partition("\n")
    if not newline:
        return None
    return tuple(layer for layer in line.split(",") if layer)


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _read_tail(path: Path, limit: int) -> str:
    """The end of stderr, because that is where the traceback's exception line is."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read(limit).decode("utf-8", errors="replace")


def _result(
    returncode: int | None,
    timed_out: bool,
    report: tuple[str, ...] | None,
    stdout: str,
    stderr: str,
    duration: float,
    limits: SandboxLimits,
) -> SandboxResult:
    layers = report or ()
    isolation = tuple(layer for layer in ("rlimits", "session", *OPTIONAL_LAYERS) if layer in {*layers, "session"})
    status, reason = _classify(returncode, timed_out, report is not None, stderr, limits)
    return SandboxResult(status == "passed", status, reason, returncode, stdout, stderr, duration, isolation)


def _classify(
    returncode: int | None, timed_out: bool, started: bool, stderr: str, limits: SandboxLimits
) -> tuple[str, str]:
    """Map how the process ended to (status, reason); order matters, the most specific cause wins."""
    if timed_out:
        return "timeout", f"timed out after {limits.timeout_s:g} s"
    if returncode == 0 and started:
        return "passed", "passed"
    if _out_of_memory(stderr):
        return "memory", f"exceeded {limits.memory_mb} MB"
    if returncode is not None and returncode < 0:
        return "killed", _signal_reason(-returncode, limits)
    if not started:
        return "error", "sandbox runner failed: " + (_last_error_line(stderr) or f"exit status {returncode}")
    return "failed", _last_error_line(stderr) or f"exit status {returncode}"


def _out_of_memory(stderr: str) -> bool:
    return bool(re.search(r"^(\w+\.)*MemoryError\b|Cannot allocate memory|out of memory", stderr, re.MULTILINE))


def _signal_reason(signum: int, limits: SandboxLimits) -> str:
    if signum == signal.SIGXCPU:
        return f"cpu time limit ({limits.effective_cpu_s} s)"
    if signum == signal.SIGXFSZ:
        return f"file size limit ({limits.file_size_mb} MB)"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"killed by {name}"


def _last_error_line(stderr: str) -> str:
    """The exception line of a traceback ("NameError: name 'x' is not defined"), else the last line."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"[A-Za-z_][\w.]*(:\s|$)", line):
            return line[:_MAX_REASON]
    return lines[-1].strip()[:_MAX_REASON] if lines else ""


def _error_result(reason: str, duration: float) -> SandboxResult:
    return SandboxResult(False, "error", reason[:_MAX_REASON], None, "", "", duration, ())


# The runner is self-contained and imports little (no subprocess, no socket), so the program finds no
# dangerous module already loaded. argv: root cpu_s as_bytes fsize_bytes nproc report_fd layers.
_RUNNER_SOURCE = r'''"""hellora_pl sandbox runner: confine this process, then run program.py as __main__."""

import os
import sys

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_rlimits(cpu_s, as_bytes, fsize_bytes, nproc):
    """Lower each limit (never above the current hard limit); True when all of them took."""
    try:
        import resource
    except ImportError:
        return False
    wanted = [
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_CPU", cpu_s, cpu_s + 1),
        ("RLIMIT_AS", as_bytes, as_bytes),
        ("RLIMIT_FSIZE", fsize_bytes, fsize_bytes),
        ("RLIMIT_NPROC", nproc, nproc),
        ("RLIMIT_NOFILE", 128, 128),
    ]
    ok = True
    for name, soft, hard in wanted:
        try:
            which = getattr(resource, name)
            current = resource.getrlimit(which)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(which, (soft, hard))
        except (AttributeError, ValueError, OSError):
            ok = False
    return ok


def restore_sigxfsz():
    """Python ignores SIGXFSZ; the default action makes the kernel stop a program at the file size limit."""
    try:
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    except (ImportError, AttributeError, ValueError, OSError):
        pass


def load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return ctypes, libc
    except (ImportError, OSError, AttributeError):
        return None, None


def enter_netns(ctypes, libc):
    """New network namespace: only a loopback device, and it is down."""
    try:
        if libc.unshare(CLONE_NEWNET) == 0:
            return True
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            return False
    except AttributeError:
        return False
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass
    return True


def landlock(ctypes, libc, root):
    """Writes only beneath root (and /dev/null), no exec, no TCP (ABI >= 4), scoped signals (ABI >= 6)."""
    c_long, c_void_p = ctypes.c_long, ctypes.c_void_p
    try:
        abi = libc.syscall(c_long(LANDLOCK_CREATE_RULESET), c_void_p(None), c_long(0), c_long(1))
    except AttributeError:
        return False
    if abi < 1:
        return False

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    execute, write_file, truncate = 1 << 0, 1 << 1, 1 << 14
    make_char, make_block = 1 << 6, 1 << 11
    fs = (1 << 13) - 1 - (1 << 2) - (1 << 3)  # v1: every right except READ_FILE and READ_DIR
    fs |= (1 << 13) if abi >= 2 else 0  # REFER
    fs |= truncate if abi >= 3 else 0
    attr = RulesetAttr(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(c_long(LANDLOCK_CREATE_RULESET), ctypes.byref(attr), c_long(size), c_long(0))
    if ruleset < 0:
        return False
    try:
        rules = [(root, fs & ~(execute | make_char | make_block)), ("/dev/null", (write_file | truncate) & fs)]
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                if libc.syscall(c_long(LANDLOCK_ADD_RULE), c_long(ruleset), c_long(1), ctypes.byref(rule), c_long(0)):
                    return False
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return libc.syscall(c_long(LANDLOCK_RESTRICT_SELF), c_long(ruleset), c_long(0)) == 0
    finally:
        os.close(ruleset)


def disarm_posixsubprocess():
    """_posixsubprocess.fork_exec raises no audit event, so replace it (multiprocessing "spawn" calls it)."""
    try:
        import _posixsubprocess
    except ImportError:
        return

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = fork_exec


DENIED_EVENTS = frozenset(
    "os.fork os.forkpty os.exec os.posix_spawn os.spawn os.system os.startfile subprocess.Popen pty.spawn "
    "os.kill os.killpg signal.pthread_kill gc.get_objects gc.get_referrers gc.get_referents webbrowser.open "
    "cpython.PyInterpreterState_New".split()
)
DENIED_PREFIXES = ("ctypes.", "socket.", "winreg.", "_winapi.", "msvcrt.")
DENIED_MODULES = frozenset(
    "_ctypes_test _posixsubprocess _xxsubinterpreters _xxinterpchannels _interpreters "
    "_interpchannels _interpqueues _testcapi _testinternalcapi cffi _cffi_backend readline".split()
)
# event -> ((path argument, dir_fd argument or None), ...) for events that modify the file system.
PATH_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "os.symlink": ((1, 2),),
    "os.link": ((0, 2), (1, 3)),
    "os.rename": ((0, 2), (1, 3)),
    "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)),
    "shutil.make_archive": ((0, None),),
    "shutil.unpack_archive": ((1, None),),
    "tempfile.mkstemp": ((0, None),),
    "tempfile.mkdtemp": ((0, None),),
    "sqlite3.connect": ((0, None),),
}


def install_audit_hook(root):
    """Deny process creation, networking, foreign calls and file-system changes outside root.

    ctypes may be imported (numpy does) but not used: loading a library, looking up a symbol, calling a
    function and reading raw memory all raise audit events that are denied.

    Everything the hook calls is bound here, so rebinding names in the runner's globals or in
    builtins does not change what it does.
    """
    fspath, fsdecode, getcwd, readlink, stat = os.fspath, os.fsdecode, os.getcwd, os.readlink, os.stat
    join, dirname, basename, realpath = os.path.join, os.path.dirname, os.path.basename, os.path.realpath
    sep, write_flags, is_int, is_str = os.sep, WRITE_FLAGS, int.__instancecheck__, str.__instancecheck__
    denied_events, denied_prefixes, denied_modules, path_events = (
        DENIED_EVENTS,
        DENIED_PREFIXES,
        DENIED_MODULES,
        PATH_EVENTS,
    )
    devices = (0o020000, 0o060000)  # S_IFCHR, S_IFBLK

    def resolve(path, dir_fd):
        if path is None:
            path = "."
        if is_int(path):
            return readlink(f"/proc/self/fd/{path}")
        base = getcwd() if dir_fd is None or dir_fd < 0 else readlink(f"/proc/self/fd/{dir_fd}")  # -1: none
        return join(base, fsdecode(fspath(path)))

    def inside(path):
        return path == root or path.startswith(root + sep)

    def allowed(path, dir_fd=None):
        try:
            full = resolve(path, dir_fd)
            return inside(realpath(full)) and inside(join(realpath(dirname(full)), basename(full)))
        except Exception:
            return False

    def is_device(path):
        try:
            return stat(path).st_mode & 0o170000 in devices
        except OSError:
            return False

    def deny(event):
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if event == "open":
            path, _mode, flags = args
            if is_int(path) or not flags & write_flags:
                return
            if fsdecode(fspath(path)) == "/dev/null":
                return
            if not allowed(path) or is_device(resolve(path, None)):
                deny(f"writing {path!r}")
        elif event in path_events:
            if event == "sqlite3.connect" and is_str(args[0]) and args[0] in ("", ":memory:"):
                return
            for index, fd_index in path_events[event]:
                dir_fd = None if fd_index is None or fd_index >= len(args) else args[fd_index]
                if not allowed(args[index], dir_fd):
                    deny(f"{event} on {args[index]!r}")
        elif event == "import":
            if args[0] in denied_modules or args[0].split(".")[0] in denied_modules:
                deny(f"importing {args[0]}")
        elif event == "socket.__new__" and args[1] == 1:  # AF_UNIX: local pairs (asyncio's self-pipe)
            return
        elif event == "ctypes.dlopen" and args[0] is None:  # `import ctypes` (numpy does); loads nothing new
            return
        elif event in denied_events or event.startswith(denied_prefixes):
            deny(event)

    sys.addaudithook(hook)
    return True


def run_program(path):
    """Execute program.py as the __main__ module (tracebacks and SystemExit behave as for a script)."""
    with open(path, "rb") as f:
        source = f.read()
    module = type(sys)("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)


def main():
    root = sys.argv[1]
    cpu_s, as_bytes, fsize_bytes, nproc, report_fd = map(int, sys.argv[2:7])
    wanted = sys.argv[7].split(",") if len(sys.argv) > 7 else []
    applied = []
    if set_rlimits(cpu_s, as_bytes, fsize_bytes, nproc):
        applied.append("rlimits")
    restore_sigxfsz()
    ctypes, libc = load_libc() if {"netns", "landlock"} & set(wanted) else (None, None)
    if libc is not None and "netns" in wanted and enter_netns(ctypes, libc):
        applied.append("netns")
    if libc is not None and "landlock" in wanted and landlock(ctypes, libc, root):
        applied.append("landlock")
    ctypes = libc = None
    if "audit" in wanted:
        disarm_posixsubprocess()
        install_audit_hook(root)
        applied.append("audit")
    os.write(report_fd, (",".join(applied) + "\n").encode())
    os.close(report_fd)
    run_program(os.path.join(root, "program.py"))


if __name__ == "__main__":
    main()
'''
