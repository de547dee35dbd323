"""Run untrusted (model-generated) Python programs in a separate, confined process.

Code benchmarks (HumanEval, MBPP) execute whatever the model wrote, and the model may have been
trained on code written to get out. Each program runs in its own child interpreter; the calling
(training) process never execs or evals it. The child is the runner
(:mod:`~hellora_pl.evaluation.sandbox_runner`, copied next to the program), started inside
bubblewrap where it is installed; it forks the program child, which confines itself in layers and
runs ``program.py`` as ``__main__``, while the runner waits and reports how it ended. Every layer
that cannot be applied on this machine is skipped, and :attr:`SandboxResult.isolation` lists the
ones that held the run.

The kernel layers are what hold against a deliberate attacker:

``bwrap`` (bubblewrap, when installed; :mod:`~hellora_pl.evaluation.sandbox_bwrap`)
    New PID, mount, network, IPC and UTS namespaces, a private ``/proc``, a file system of read-only
    binds (system directories, the interpreter) plus the run directory, ``--die-with-parent``,
    ``--new-session``, an environment built from an allow-list. Reported with ``pidns`` and ``netns``.
``pidns`` (own layer without bubblewrap)
    The program runs under PID 1 of its own PID namespace with a private ``/proc``: when the run ends
    the kernel kills every process left in it (a ``fork`` + ``setsid`` daemon included), and the
    parent's ``/proc/<pid>/environ`` is not there to read. :func:`run_program` then checks that no
    process of the run is left (its environment holds the run's random :data:`RUN_MARKER`, or it is
    in the runner's session), kills any, and reports an ``error``.
``netns``
    A network namespace whose only interface is a loopback that is down: no TCP/UDP/DNS leaves.
``landlock`` (Linux >= 5.13)
    Writes, creates, removes, renames and links only beneath the run directory (and ``/dev/null``); no
    ``execve``; no device nodes; no TCP (ABI >= 4); scoped signals and abstract sockets (ABI >= 6).
``unprivileged``
    As root, the program child drops to uid/gid 65534 with no groups and no capabilities, so file
    permissions (``/etc/shadow``, other users' ``/proc`` entries) and RLIMIT_NPROC apply. Without
    bubblewrap, directories on the way to the interpreter that others cannot enter (a Python under
    ``/root``) are covered, in the run's own mount namespace, by a tmpfs holding only binds of what
    the interpreter needs; where that is impossible (no ``pidns``) the layer is reported missing.
``seccomp`` (:mod:`~hellora_pl.evaluation.sandbox_seccomp`)
    The system calls a test program never needs are refused: new processes (threads work), ``setsid``,
    exec, the chmod/chown/utime/xattr families, sockets other than AF_UNIX pairs, ``connect``,
    ``ptrace``, ``mount``, ``unshare``/``setns``, signals to any process, io_uring, bpf, ...
``rlimits`` (always)
    CPU seconds (SIGXCPU, then SIGKILL), address space (a memory bomb gets ``MemoryError``), file size
    (stdout/stderr are files, so huge output is cut by SIGXFSZ), no core files, few open files, and
    RLIMIT_NPROC (threads count towards it).
``session`` (always, parent side)
    The runner starts in its own process group; the parent SIGKILLs the group on timeout and after
    every exit.

``audit`` (Python level, works everywhere) is defence in depth only: a ``sys.addaudithook`` hook that
refuses fork, exec, sockets, ctypes calls and writes outside the run directory. Python code can switch
it off (replace the code object of its ``deny`` function, reached through a traceback), so nothing
relies on it; where it is the only optional layer, ``isolation`` says so and the sandbox stops
careless code, not an attacker.

Environment: always the allow-list of :func:`_child_env`, never the parent's.

Not covered: reads of files that the program's user may read (world-readable files, with bubblewrap
only those in the bound directories), disk usage inside the run directory (each file is bounded, their
number is not), CPU/memory contention with the parent, and kernel vulnerabilities.

For tests and benchmarks, :func:`run_program` takes a keyword ``layers=`` naming the optional layers to
attempt (:data:`OPTIONAL_LAYERS`; :func:`own_layers` is everything but bubblewrap, ``("audit",)`` the
hook alone); rlimits and the session are always on.
"""

from __future__ import annotations

import functools
import math
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from hellora_pl.evaluation import sandbox_runner
from hellora_pl.evaluation.sandbox_bwrap import bwrap_command, bwrap_path
from hellora_pl.evaluation.sandbox_seccomp import write_filter

OPTIONAL_LAYERS = ("bwrap", "pidns", "netns", "landlock", "unprivileged", "seccomp", "audit")
_REPORTED = ("rlimits", "session", *OPTIONAL_LAYERS)
SECCOMP_FILE = "seccomp.bpf"
RUN_MARKER = "HELLORA_SANDBOX_RUN"  # environment variable naming the run (a random token) in its processes
NOBODY = 65534
STATUSES = ("passed", "failed", "timeout", "memory", "killed", "error")
_MAX_REASON = 300


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program; recorded with results so a score says how it was obtained."""

    # Wall clock. From benchmarks/sandbox_timing.py: the slowest of the 164 + 974 reference solutions is MBPP
    # task 123, 3.9 s (bubblewrap) and 4.3 s (own layers) with 2 workers on this 2-core machine, 3.4 s with 1;
    # all others take under 0.3 s. Margin x4.5 on 4.3 s: x2 for CodeTask's default 4 workers on 2 cores, x2.25
    # for a busy machine (the issue saw 9.7 s there).
    timeout_s: float = 20.0
    cpu_s: int | None = None  # RLIMIT_CPU; None -> ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also bounds stdout/stderr, which are files)
    max_processes: int = 1  # RLIMIT_NPROC: counts the user's processes and threads (root runs as nobody)
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
    wanted = _available(_check_layers(layers))
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hellora-sandbox-", ignore_cleanup_errors=True) as tmp:
            root = Path(os.path.realpath(tmp))
            (root / "program.py").write_text(source, encoding="utf-8")
            (root / "runner.py").write_text(_runner_source(), encoding="utf-8")
            if "seccomp" in wanted and not write_filter(str(root / SECCOMP_FILE)):
                wanted = tuple(layer for layer in wanted if layer != "seccomp")
            if "unprivileged" in wanted and os.geteuid() == 0:
                os.chown(root, NOBODY, NOBODY)  # the program's only writable place, after the drop to nobody
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


def own_layers() -> tuple[str, ...]:
    """Every optional layer except bubblewrap: the project's own layers, for tests and benchmarks."""
    return tuple(layer for layer in OPTIONAL_LAYERS if layer != "bwrap")


def _check_layers(layers: Collection[str] | None) -> tuple[str, ...]:
    if layers is None:
        return OPTIONAL_LAYERS
    if isinstance(layers, str):
        raise ValueError(f"layers must be a collection of layer names, got the string {layers!r}; write ({layers!r},)")
    unknown = sorted(set(layers) - set(OPTIONAL_LAYERS))
    if unknown:
        raise ValueError(f"unknown sandbox layers {unknown}; choose from {list(OPTIONAL_LAYERS)}")
    return tuple(layer for layer in OPTIONAL_LAYERS if layer in layers)


def _available(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """Drop bubblewrap where it is missing (the runner reports the other layers it could not apply)."""
    if "bwrap" in wanted and bwrap_path() is None:
        wanted = tuple(layer for layer in wanted if layer != "bwrap")
    return wanted


@functools.lru_cache(maxsize=1)
def _runner_source() -> str:
    return Path(sandbox_runner.__file__).read_text(encoding="utf-8")


def _child_env(root: Path, marker: str) -> dict[str, str]:
    """A minimal environment from an allow-list: nothing from the parent leaks in, hashing and BLAS threads
    are fixed, and ``marker`` names this run so that :func:`_kill_survivors` finds any process of it."""
    return {
        RUN_MARKER: marker,
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


def _command(root: Path, limits: SandboxLimits, report_fd: int, wanted: tuple[str, ...], marker: str) -> list[str]:
    """``-s`` skips the user site; not ``-I``, whose ``-E`` would drop PYTHONHASHSEED (the env is ours anyway)."""
    numbers = (
        limits.effective_cpu_s,
        limits.memory_mb * 2**20,
        limits.file_size_mb * 2**20,
        limits.max_processes,
        report_fd,
    )
    seccomp = str(root / SECCOMP_FILE) if "seccomp" in wanted else "-"
    runner = [sys.executable, "-s", "-B", str(root / "runner.py"), str(root), *map(str, numbers)]
    runner += [",".join(wanted) or "-", seccomp]
    return [*bwrap_command(root, _child_env(root, marker)), *runner] if "bwrap" in wanted else runner


def _run_in(root: Path, limits: SandboxLimits, wanted: tuple[str, ...]) -> SandboxResult:
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    marker = secrets.token_hex(8)
    # Output is read back through the parent's own descriptors, never by path: the program owns the
    # directory and could put a symlink to a secret file where its output was.
    with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
        try:
            try:
                proc = subprocess.Popen(
                    _command(root, limits, write_fd, wanted, marker),
                    cwd=root,
                    env=_child_env(root, marker),
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
        survivors = _kill_survivors(marker, proc.pid)
        stdout = _read_head(out, limits.output_bytes)
        stderr = _read_tail(err, limits.output_bytes)
    result = _result(proc.returncode, timed_out, report, stdout, stderr, duration, limits)
    if survivors:
        reason = f"sandbox: {survivors} process(es) of the run outlived it and were killed"
        return replace(result, passed=False, status="error", reason=reason)
    return result


@dataclass(frozen=True)
class _Report:
    """What the runner wrote to the report pipe: the layers applied, how the program ended."""

    layers: tuple[str, ...]
    returncode: int | None  # None: the supervisor never reported (killed on timeout)


def _kill_survivors(marker: str, session: int, wait_s: float = 1.0, reap_s: float = 5.0) -> int:
    """Check that no process of the run is left, kill any that is, and return how many there were.

    A process of the run is one whose environment holds this run's ``marker`` (every process the
    program starts inherits it) or that is still in the runner's session. PID namespaces make this
    structural (their init takes every member with it); the check waits up to ``wait_s`` for the
    kernel to finish that after the group kill before it counts anything as a survivor, and up to
    ``reap_s`` for the survivors it kills to have exited.
    """
    if not os.path.isdir("/proc/self"):
        return 0
    needle = b"\0" + f"{RUN_MARKER}={marker}".encode() + b"\0"
    deadline = time.monotonic() + wait_s
    while True:
        left = _members(needle, session)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    _wait_gone(left, reap_s)
    return len(left)


def _wait_gone(pids: list[int], within_s: float) -> None:
    """Wait up to ``within_s`` until every pid has exited (gone or a zombie).

    SIGKILL is delivered asynchronously: on a loaded machine a killed process can still be running
    its exit when ``kill`` returns, so without this wait a caller could see it alive after being
    told it was killed.
    """
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(_live_stat(pid) for pid in pids):
        time.sleep(0.01)


def _live_stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None when the process is gone,
    a zombie or dead (state Z or X)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if fields and fields[0] not in (b"Z", b"X") else None


def _members(needle: bytes, session: int) -> list[int]:
    """Live processes in session ``session`` or whose initial environment contains ``needle``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _live_stat(entry.name)
            if fields is None:
                continue
            if int(fields[3]) == session:
                members.append(int(entry.name))
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in b"\0" + f.read():
                    members.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return members


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


def _read_report(fd: int) -> _Report | None:
    """The runner's report (see :mod:`~hellora_pl.evaluation.sandbox_runner`); None when the program never started."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < 65536:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    layers, returncode = None, None
    for line in data.decode("ascii", "replace").split("\n"):
        words = line.split()
        if len(words) == 3 and words[0] == "layers" and layers is None:
            layers = tuple(layer for layer in words[1].split(",") if layer in _REPORTED)
        elif len(words) == 3 and words[0] == "status" and words[2].lstrip("-").isdigit():
            returncode = int(words[2]) if words[1] == "exit" else -int(words[2])
    return None if layers is None else _Report(layers, returncode)


def _read_head(f: BinaryIO, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _read_tail(f: BinaryIO, limit: int) -> str:
    """The end of stderr, because that is where the traceback's exception line is."""
    f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
    return f.read(limit).decode("utf-8", errors="replace")


def _result(
    returncode: int | None,
    timed_out: bool,
    report: _Report | None,
    stdout: str,
    stderr: str,
    duration: float,
    limits: SandboxLimits,
) -> SandboxResult:
    """The supervisor's word on how the program ended wins over the exit status of bwrap or the runner."""
    layers = {*(report.layers if report is not None else ()), "session"}
    isolation = tuple(layer for layer in _REPORTED if layer in layers)
    if report is not None and report.returncode is not None and not timed_out:
        returncode = report.returncode
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
