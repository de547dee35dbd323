"""The sandbox's acceptance list: an infinite loop is stopped by the time limit, a memory bomb and a fork
bomb are contained, a write outside the temporary directory does not happen, a network connection
fails, and the parent survives all of them.

Most cases run three ways: with every layer this machine supports ("all": bubblewrap where it is
installed), with the Python-level audit hook alone ("audit", what a machine without namespaces,
Landlock or libseccomp gets), and with the project's own kernel layers alone, without bubblewrap and
without the hook ("kernel", skipped where a PID namespace, netns, Landlock or seccomp is missing).
The attacks that first switch the audit hook off are in test_sandbox_escapes.py.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from sandbox_probes import KERNEL_LAYERS, REPORT_RUN, assert_nothing_left, held, require

from hellora_pl.evaluation.sandbox import SandboxLimits, SandboxResult, isolation_layers, run_program, run_programs
from hellora_pl.evaluation.sandbox_bwrap import bwrap_path
from hellora_pl.evaluation.sandbox_seccomp import seccomp_filter

MODES = {"all": None, "audit": ("audit",), "kernel": KERNEL_LAYERS}
FAST = SandboxLimits(timeout_s=5.0, memory_mb=512)


def layers_for(mode: str) -> tuple[str, ...] | None:
    layers = MODES[mode]
    if mode == "kernel":
        require(layers, {"pidns", "netns", "landlock", "seccomp"})
    return layers


def run(source: str, mode: str = "all", limits: SandboxLimits = FAST) -> SandboxResult:
    return run_program(source, limits, layers=layers_for(mode))


@pytest.fixture(autouse=True)
def parent_survives():
    """Whatever the program did, the test process keeps its limits, network namespace, directory and writes."""
    names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE")
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in names}
    netns = _netns()
    cwd = os.getcwd()
    yield
    assert {name: resource.getrlimit(getattr(resource, name)) for name in names} == limits
    assert _netns() == netns
    assert os.getcwd() == cwd


def _netns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


# --- ordinary programs -------------------------------------------------------------------------------


def test_isolation_layers_reports_what_is_active():
    layers = isolation_layers()
    assert {"rlimits", "session", "audit"} <= set(layers), layers
    if bwrap_path() is not None:  # bubblewrap works here (CI installs it): it is used, with the runner's layers
        assert {"bwrap", "pidns", "netns", "unprivileged"} <= set(layers), layers
    assert ("seccomp" in layers) == (seccomp_filter() is not None), layers  # libseccomp decides
    print("isolation layers here:", layers)


@pytest.mark.parametrize("mode", MODES)
def test_passing_program_captures_stdout(mode):
    result = run("print('hello', 6 * 7)", mode)
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout == "hello 42\n"
    assert set(result.isolation) >= {"rlimits", "session"}
    optional = set(result.isolation) - {"rlimits", "session"}
    assert optional == set(held(MODES[mode]))
    if MODES[mode]:
        assert optional <= set(MODES[mode]) | {"pidns", "netns"}  # bubblewrap brings both


@pytest.mark.parametrize("mode", MODES)
def test_failing_assert_names_assertion_error(mode):
    result = run("def f():\n    return 1\n\nassert f() == 2, 'f is wrong'\n", mode)
    assert not result.passed and result.status == "failed"
    assert result.reason == "AssertionError: f is wrong"
    assert "Traceback" in result.stderr


def test_reason_is_the_exception_line():
    assert run("x + 1").reason == "NameError: name 'x' is not defined"
    assert run("assert False").reason == "AssertionError"
    assert run("import sys\nsys.exit(3)").reason == "exit status 3"
    assert run("import sys\nsys.exit(0)").passed


def test_syntax_error_fails():
    result = run("def f(:\n    pass\n")
    assert result.status == "failed" and result.reason.startswith("SyntaxError")


def test_environment_is_minimal_and_deterministic(monkeypatch):
    monkeypatch.setenv("HELLORA_SECRET", "do-not-leak")
    program = "import os\nassert 'HELLORA_SECRET' not in os.environ\nprint(hash('abc'))\n"
    first, second = run(program), run(program)
    assert first.passed and first.stdout.split()[0] == second.stdout.split()[0]  # PYTHONHASHSEED=0
    assert run("input()").reason == "EOFError: EOF when reading a line"  # stdin is /dev/null


def test_run_programs_keeps_order():
    results = run_programs([f"print({i})" for i in range(12)], FAST, workers=4)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="network"):
        SandboxLimits(network=True)
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="unknown sandbox layers"):
        run_program("pass", layers=("chroot",))
    with pytest.raises(ValueError, match="the string 'audit'"):
        run_program("pass", layers="audit")
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)


def test_common_imports_work_under_the_audit_hook():
    imports = "import asyncio, collections, heapq, itertools, json, math, re, typing\nimport numpy\n"
    result = run(imports + "print(numpy.arange(4).sum())")
    assert result.passed, result
    assert result.stdout == "6\n"


# --- time ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_stopped(mode):
    started = time.monotonic()
    result = run("while True:\n    pass\n", mode, SandboxLimits(timeout_s=1.0))
    assert time.monotonic() - started < 3.0
    assert result.status in ("timeout", "killed") and not result.passed
    assert result.reason in ("timed out after 1 s", "cpu time limit (2 s)")


def test_cpu_limit_kills_before_the_wall_clock():
    result = run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert result.status == "killed" and result.reason == "cpu time limit (1 s)"
    assert result.duration_s < 5


# --- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "program", ["x = bytearray(8 * 2**30)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))\n"]
)
def test_memory_bomb_is_contained(mode, program):
    result = run(program, mode, SandboxLimits(timeout_s=10.0, memory_mb=256))
    assert not result.passed
    assert result.status == "memory" and result.reason == "exceeded 256 MB"


# --- processes -----------------------------------------------------------------------------------------

FORK_BOMBS = {
    "os.fork": "while True:\n    os.fork()\n",
    "subprocess": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import os; os.fork()'])\n",
    "multiprocessing": (
        "import multiprocessing as mp\n"
        "def bomb():\n    while True:\n        mp.Process(target=bomb).start()\n"
        "if __name__ == '__main__':\n    bomb()\n"
    ),
    "spawn": (
        "import multiprocessing as mp\n"
        "if __name__ == '__main__':\n    mp.set_start_method('spawn')\n    mp.Process(target=print).start()\n"
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bomb", FORK_BOMBS)
def test_fork_bomb_is_contained(mode, bomb):
    result = run(REPORT_RUN + FORK_BOMBS[bomb], mode, SandboxLimits(timeout_s=2.0))
    assert not result.passed
    assert result.status == "failed" and "PermissionError" in result.reason, result
    assert_nothing_left(result)


def test_kernel_layers_alone_stop_forks():
    """Without the hook, seccomp refuses the fork (for root too, which RLIMIT_NPROC does not bind), and
    nothing of the run is left. The forks are bounded so a broken sandbox cannot take the machine down."""
    forker = [
        "import time",
        "for _ in range(20):",
        "    if os.fork() == 0:",
        "        time.sleep(60)",
        "        os._exit(0)",
    ]
    program = REPORT_RUN + "\n".join(forker) + "\n"
    result = run(program, "kernel", SandboxLimits(timeout_s=5.0))
    assert result.status == "failed" and "PermissionError" in result.reason, result
    assert_nothing_left(result)


@pytest.mark.parametrize("mode", MODES)
def test_program_cannot_signal_other_processes(mode):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        result = run(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\n", mode)
        assert result.status == "failed" and "Error" in result.reason, result  # refused, or no such pid
        time.sleep(0.1)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# --- files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_write_outside_does_not_happen(mode, tmp_path):
    target = tmp_path / "outside.txt"
    result = run(f"open({str(target)!r}, 'w').write('pwned')\n", mode)
    assert result.status == "failed" and "PermissionError" in result.reason
    assert not target.exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "action",
    [
        "os.remove(victim)",
        "os.rename(victim, 'stolen')",
        "shutil.rmtree(os.path.dirname(victim))",
        "os.symlink(os.path.dirname(victim), 'link')\nos.remove('link/victim.txt')",
        "open(victim, 'a').write('more')",
    ],
)
def test_outside_file_survives(mode, action, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    result = run(f"import os, shutil\nvictim = {str(victim)!r}\n{action}\n", mode)
    assert not result.passed and "PermissionError" in result.reason, result
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("mode", MODES)
def test_metadata_outside_is_unchanged(mode, tmp_path):
    """chmod/utime are outside Landlock's reach; seccomp (and bubblewrap, which does not show the file)
    refuse them, and the audit hook does too."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    victim.chmod(0o644)
    before = victim.stat()
    result = run(f"import os\nos.chmod({str(victim)!r}, 0o777)\n", mode)
    assert result.status == "failed" and "PermissionError" in result.reason
    assert victim.stat().st_mode == before.st_mode


@pytest.mark.parametrize("mode", MODES)
def test_writing_inside_the_sandbox_works(mode):
    program = (
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "with open('a/b/data.txt', 'w') as f:\n    f.write('round trip')\n"
        "assert open('a/b/data.txt').read() == 'round trip'\n"
        "os.rename('a/b/data.txt', 'a/moved.txt')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print(sorted(os.listdir('.')))\n"
    )
    result = run(program, mode)
    assert result.passed, result
    assert "program.py" in result.stdout


# --- network -------------------------------------------------------------------------------------------


@pytest.fixture
def listener():
    """A socket in the parent that a connection from an unsandboxed program would reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.parametrize("mode", [*MODES, "netns", "landlock"])
@pytest.mark.parametrize(
    "attempt",
    [
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "s = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', PORT))",
    ],
)
def test_network_connection_fails(mode, attempt, listener):
    layers = (mode,) if mode in ("netns", "landlock") else layers_for(mode)
    if mode in ("netns", "landlock") and mode not in isolation_layers():
        pytest.skip(f"{mode} is not available here")
    port = listener.getsockname()[1]
    program = f"import socket\nPORT = {port}\n{attempt}\nprint('connected')\n"
    result = run_program(program, FAST, layers=layers)
    assert not result.passed and result.status == "failed", result
    assert "connected" not in result.stdout
    assert_no_connection(listener)


@pytest.mark.parametrize("mode", MODES)
def test_binding_a_socket_fails(mode):
    result = run("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n", mode)
    assert not result.passed and result.status == "failed"
    assert "Error" in result.reason


# --- output --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_huge_output_is_bounded(mode):
    result = run("print('x' * 10**8)\n", mode, SandboxLimits(timeout_s=10.0))
    assert not result.passed
    assert result.status == "killed" and result.reason == "file size limit (16 MB)"
    assert 0 < len(result.stdout) <= 16_384


def test_output_is_truncated_to_output_bytes():
    result = run("print('y' * 100_000)\n", limits=SandboxLimits(output_bytes=1000))
    assert result.passed and result.stdout == "y" * 1000
