"""Programs written to get out of the sandbox, run as an attacker would (issue 13, acceptance 1).

Every escape first switches the audit hook off from inside (the three lines of the issue), so what
holds is the kernel: bubblewrap with the runner's layers ("bwrap"), or the project's own layers
("own"). For each escape: the parent survives, the verdict is a failure with a reason, no file
outside the run directory is created or changed, the listeners receive nothing, the canary set in
the parent appears in no output, and 2 seconds after the call no process of the run exists. The
audit hook alone (what a machine without the kernel layers gets) must report itself as the only
layer, because it does not hold.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sandbox_probes import MODES, REPORT_RUN, held, require, run_processes

from hellora_pl.evaluation.sandbox import SandboxLimits, SandboxResult, run_program, run_programs

LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=512)
CANARY_NAME, CANARY_VALUE = "HELLORA_HUB_TOKEN", "canary-5f1d0c3e9a7b"
KERNEL_MODES = ("bwrap", "own")

DISARM = """\
try:
    os.kill(0, 0)
except PermissionError as e:
    tb = e.__traceback__
    while tb is not None and "deny" not in tb.tb_frame.f_locals:
        tb = tb.tb_next
    if tb is not None:
        tb.tb_frame.f_locals["deny"].__code__ = (lambda event: None).__code__
        print("audit hook disarmed", flush=True)
"""

# name -> (program body after the disarm, layers it needs beyond the mode's namespaces)
ESCAPES = {
    "fork_setsid_daemon": (
        "import socket, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    for _ in range(100):\n"
        "        try:\n"
        "            s = socket.socket(socket.AF_UNIX)\n"
        "            s.connect(STREAM)\n"
        "            s.sendall(b'escaped')\n"
        "        except OSError:\n"
        "            pass\n"
        "        time.sleep(0.05)\n"
        "    os._exit(0)\n"
        "print('forked')\n",
        set(),
    ),
    "ctypes_fork": ("import ctypes\nif ctypes.CDLL(None).fork() < 0:\n    raise OSError('fork refused')\n", set()),
    "chmod": ("os.chmod(VICTIM, 0o777)\n", set()),
    "chown": ("os.chown(VICTIM, 12345, 12345)\n", set()),
    "utime": ("os.utime(VICTIM, (0, 0))\n", set()),
    "unix_connect": (
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(STREAM)\ns.sendall(b'escaped')\n",
        set(),
    ),
    "unix_sendto": (
        "import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.sendto(b'escaped', DGRAM)\n",
        set(),
    ),
    "etc_shadow": ("print(open('/etc/shadow').read())\n", {"unprivileged"}),
    # the parent reads the output back; a symlink in its place must not make it read a secret file
    "output_symlink": ("os.remove('stdout')\nos.symlink(SECRET, 'stdout')\nraise SystemExit('swapped')\n", set()),
    "child_environ": (f"print(dict(os.environ))\nassert {CANARY_NAME!r} in os.environ\n", set()),
    # contained before the kernel layers too, and must stay so with the hook switched off
    "os_system": ("os.system('touch ' + OUTSIDE)\nassert os.path.exists(OUTSIDE)\n", set()),
    "subprocess": ("import subprocess\nsubprocess.run(['touch', OUTSIDE], check=True)\n", set()),
    "write_outside": ("open(OUTSIDE, 'w').write('pwned')\n", set()),
    "tcp_connect": (
        "import socket\nsocket.create_connection(('127.0.0.1', TCP_PORT), timeout=1).sendall(b'x')\n",
        set(),
    ),
    "kill_victim": ("import signal\nos.kill(VICTIM_PID, signal.SIGKILL)\n", set()),
}


@dataclass
class Outcome:
    """Everything one mode's escapes did, collected once for the whole module."""

    mode: str
    results: dict[str, SandboxResult]
    files_before: dict[str, tuple]
    files_after: dict[str, tuple]
    received: list[str] = field(default_factory=list)
    alive: dict[str, list[int]] = field(default_factory=dict)
    victim_alive: bool = True


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry below ``directory`` with its type, mode, owner, times and size."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        entries[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    return entries


def received(stream: socket.socket, dgram: socket.socket, tcp: socket.socket) -> list[str]:
    got = []
    for server in (stream, tcp):
        try:
            conn, _ = server.accept()
            got.append(f"{server.family.name} connection: {conn.recv(100)!r}")
            conn.close()
        except BlockingIOError:
            pass
    try:
        got.append(f"datagram: {dgram.recv(100)!r}")
    except BlockingIOError:
        pass
    return got


@pytest.fixture(scope="module", params=KERNEL_MODES)
def outcome(request, tmp_path_factory) -> Outcome:
    mode = request.param
    layers = MODES[mode]
    if mode == "bwrap":
        require(layers, {"bwrap"})
    require(layers, {"pidns", "netns", "landlock", "seccomp"})
    outside = tmp_path_factory.mktemp(f"outside-{mode}")
    victim_file = outside / "victim.txt"
    victim_file.write_text("keep")
    victim_file.chmod(0o644)
    secret_file = outside / "secret.txt"
    secret_file.write_text(f"{CANARY_NAME}={CANARY_VALUE}\n")
    secret_file.chmod(0o600)
    stream = socket.socket(socket.AF_UNIX)
    stream.bind(str(outside / "stream.sock"))
    stream.listen()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(outside / "dgram.sock"))
    tcp = socket.create_server(("127.0.0.1", 0))
    for server in (stream, dgram, tcp):
        server.setblocking(False)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    names = {
        "VICTIM": str(victim_file),
        "SECRET": str(secret_file),
        "STREAM": str(outside / "stream.sock"),
        "DGRAM": str(outside / "dgram.sock"),
        "OUTSIDE": str(outside / "created-by-the-program"),
        "TCP_PORT": tcp.getsockname()[1],
        "VICTIM_PID": victim.pid,
    }
    header = "".join(f"{name} = {value!r}\n" for name, value in names.items())
    sources = [REPORT_RUN + header + DISARM + body for body, _ in ESCAPES.values()]
    os.environ[CANARY_NAME] = CANARY_VALUE
    try:
        before = snapshot(outside)
        results = dict(zip(ESCAPES, run_programs(sources, LIMITS, workers=2, layers=layers)))
        time.sleep(2.0)
        alive = {name: run_processes(result) for name, result in results.items()}
        got = received(stream, dgram, tcp)
        after = snapshot(outside)
        victim_alive = victim.poll() is None
    finally:
        del os.environ[CANARY_NAME]
        victim.kill()
        victim.wait()
        for server in (stream, dgram, tcp):
            server.close()
    return Outcome(mode, results, before, after, got, alive, victim_alive)


@pytest.mark.parametrize("escape", ESCAPES)
def test_escape_is_contained(outcome, escape):
    needs = ESCAPES[escape][1]
    require(MODES[outcome.mode], needs)
    result = outcome.results[escape]
    assert not result.passed and result.status in ("failed", "killed"), result
    assert result.reason, result
    assert outcome.alive[escape] == [], f"processes of the run still alive 2 s after it: {outcome.alive[escape]}"
    for text in (result.stdout, result.stderr, result.reason):
        assert CANARY_VALUE not in text and "root:" not in text


def test_kernel_layers_held_every_escape(outcome):
    """Checks over all escapes of a mode at once: files, listeners, the victim process, the layers."""
    assert outcome.files_after == outcome.files_before
    assert outcome.received == []
    assert outcome.victim_alive
    for name, result in outcome.results.items():
        assert "audit hook disarmed" in result.stdout, (name, result)  # the hook really was off
        assert {"pidns", "netns", "landlock", "seccomp"} <= set(result.isolation), (name, result.isolation)
        if outcome.mode == "bwrap":
            assert "bwrap" in result.isolation


ENVIRON_PROGRAM = (
    REPORT_RUN
    + DISARM
    + """\
import glob
try:
    print(open('/proc/PARENT/environ', 'rb').read(), flush=True)  # first: output is kept up to 16 KB
except OSError as exc:
    print('parent:', exc, flush=True)
for path in glob.glob('/proc/[0-9]*/environ'):
    try:
        print(path, open(path, 'rb').read(), flush=True)
    except OSError as exc:
        print(path, exc, flush=True)
open('/proc/PARENT/environ', 'rb').read()
"""
)

# A training process whose environment holds the canary from its start (so /proc/<pid>/environ shows it).
PARENT = """\
import importlib.util, json, os, sys, types
# the sandbox alone, without the package's __init__ files (they import torch, which takes seconds)
for name in ("hellora_pl", "hellora_pl.evaluation"):
    package = types.ModuleType(name)
    package.__path__ = list(importlib.util.find_spec(name).submodule_search_locations)
    sys.modules[name] = package
from hellora_pl.evaluation.sandbox import SandboxLimits, run_program
own = open('/proc/self/environ', 'rb').read().decode()
program = sys.argv[1].replace('PARENT', str(os.getpid()))
r = run_program(program, SandboxLimits(timeout_s=10.0), layers=json.loads(sys.argv[2]))
print(json.dumps({"passed": r.passed, "reason": r.reason, "stdout": r.stdout, "stderr": r.stderr,
                  "isolation": r.isolation, "canary_in_parent": sys.argv[3] in own}))
"""


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_parent_environment_is_not_readable(mode):
    layers = MODES[mode]
    require(layers, {"bwrap", "pidns"} if mode == "bwrap" else {"pidns"})
    env = {**os.environ, CANARY_NAME: CANARY_VALUE}
    argv = [sys.executable, "-c", PARENT, ENVIRON_PROGRAM, json.dumps(layers), CANARY_VALUE]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["canary_in_parent"]  # the secret really was there to steal
    assert "audit hook disarmed" in report["stdout"]
    assert not report["passed"] and report["reason"], report
    for key in ("stdout", "stderr", "reason"):
        assert CANARY_VALUE not in report[key]


def test_audit_hook_alone_reports_itself_and_does_not_hold(tmp_path):
    """Without kernel layers the hook stops careless code, and the result says it was the only layer."""
    target = tmp_path / "outside.txt"
    careless = run_program(f"open({str(target)!r}, 'w').write('x')\n", LIMITS, layers=MODES["audit"])
    assert careless.status == "failed" and "PermissionError" in careless.reason
    assert not target.exists()
    assert held(MODES["audit"]) == ("audit",)
    attacker = run_program(f"import os\n{DISARM}open({str(target)!r}, 'w').write('x')\n", LIMITS, layers=("audit",))
    assert tuple(layer for layer in attacker.isolation if layer not in ("rlimits", "session")) == ("audit",)
    assert attacker.passed and target.read_text() == "x", attacker  # documented: the hook alone does not hold


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_threads_work_under_seccomp(mode):
    """seccomp refuses clone without CLONE_THREAD and clone3 (ENOSYS, glibc falls back): threads still start.
    Under bubblewrap this also imports a module that was not loaded before the drop to nobody."""
    require(MODES[mode], {"bwrap", "seccomp"} if mode == "bwrap" else {"seccomp"})
    program = (
        "import threading\nout = []\nt = threading.Thread(target=out.append, args=(7,))\n"
        "t.start()\nt.join()\nassert out == [7]\nprint('thread ok')\n"
    )
    result = run_program(program, SandboxLimits(timeout_s=10.0, max_processes=64), layers=MODES[mode])
    assert result.passed and result.stdout == "thread ok\n", result
    assert "seccomp" in result.isolation


def test_run_program_kills_and_reports_what_outlives_a_run():
    """Where nothing in the kernel stops a daemon (the hook alone, switched off), run_program still finds
    the process by the run's marker, kills it, and reports an error instead of a pass."""
    daemon = REPORT_RUN + DISARM + "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
    result = run_program(daemon, LIMITS, layers=MODES["audit"])
    assert result.status == "error" and "outlived" in result.reason, result
    assert run_processes(result) == []


def test_survivors_are_gone_when_run_program_returns(monkeypatch):
    """SIGKILL is delivered asynchronously: on a loaded CI machine a killed daemon was still running
    when run_program returned (the test above failed once in ~40 runs). Here every kill the sandbox
    sends lands 0.3 s late; run_program must still return only once the survivor has exited."""
    import threading

    from hellora_pl.evaluation import sandbox

    real_kill = os.kill

    def late_kill(pid: int, sig: int) -> None:
        threading.Timer(0.3, real_kill, (pid, sig)).start()

    monkeypatch.setattr(sandbox.os, "kill", late_kill)
    daemon = REPORT_RUN + DISARM + "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
    result = run_program(daemon, LIMITS, layers=MODES["audit"])
    monkeypatch.undo()
    assert result.status == "error" and "outlived" in result.reason, result
    assert run_processes(result) == []


def test_signals_to_the_program_still_end_it():
    """The runner forks the program and reports its end: a kill by signal keeps its name."""
    no_hook = tuple(layer for layer in MODES["own"] if layer != "audit")
    result = run_program("import ctypes\nctypes.string_at(0)\n", LIMITS, layers=no_hook)
    assert result.status == "killed" and result.reason == "killed by SIGSEGV", result
    assert result.returncode == -signal.SIGSEGV


def test_an_interpreter_in_a_virtual_environment_under_tmp_runs_in_bubblewrap(tmp_path):
    """bubblewrap mounts a fresh /tmp; an interpreter bound before it was hidden under it, so a
    checkout with its .venv under /tmp (a CI clone) failed every program ("execvp ...: No such file")."""
    require(MODES["bwrap"], {"bwrap"})
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    code = (
        "from hellora_pl.evaluation.sandbox import run_program\n"
        "r = run_program('print(6 * 7)')\n"
        "print(r.status, 'bwrap' in r.isolation, r.stdout.strip(), r.reason)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *site.getsitepackages()])}
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:3] == ["passed", "True", "42"], result.stdout
