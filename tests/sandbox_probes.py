"""Helpers the sandbox tests share: which layer sets this machine supports, and what of a run is still alive.

A test program starts with :data:`REPORT_RUN`, which prints its PID namespace and session id; after
the call, :func:`run_processes` finds any live process of that run from outside.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest

from hellora_pl.evaluation.sandbox import SandboxLimits, SandboxResult, own_layers, run_program

REPORT_RUN = (
    "import os\nprint('RUN', os.environ.get('HELLORA_SANDBOX_RUN', '-'), os.readlink('/proc/self/ns/pid'), "
    "os.getsid(0), flush=True)\n"
)
KERNEL_LAYERS = tuple(layer for layer in own_layers() if layer != "audit")
# mode -> layers requested: bubblewrap (with every other layer), the project's own layers, and the
# audit hook alone (what a machine without namespaces, Landlock or libseccomp gets).
MODES = {"bwrap": None, "own": own_layers(), "audit": ("audit",)}


@functools.lru_cache(maxsize=None)
def held(layers: tuple[str, ...] | None) -> tuple[str, ...]:
    """The optional layers that actually hold a run with ``layers`` requested here (cached)."""
    result = run_program("", SandboxLimits(timeout_s=30.0), layers=layers)
    assert result.passed, result
    return tuple(layer for layer in result.isolation if layer not in ("rlimits", "session"))


def require(layers: tuple[str, ...] | None, needed: set[str]) -> None:
    """Skip, naming what is missing, when this machine cannot give the ``needed`` layers."""
    missing = needed - set(held(layers))
    if missing:
        pytest.skip(f"this machine lacks sandbox layers {sorted(missing)} (held: {held(layers)})")


def run_marker(result: SandboxResult) -> tuple[str, str, int]:
    """(run marker, PID namespace, session id) as the program printed them with :data:`REPORT_RUN`."""
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "RUN":
            return words[1], words[2], int(words[3])
    raise AssertionError(f"program did not report its run marker, namespace and session: {result}")


def run_processes(result: SandboxResult) -> list[int]:
    """Live processes of the run: those whose environment holds its marker (every descendant inherits it)
    and, where the run shared our PID namespace, those still in its session."""
    marker, namespace, sid = run_marker(result)
    assert marker != "-", result
    needle = f"\0HELLORA_SANDBOX_RUN={marker}\0".encode()
    same_namespace = namespace == os.readlink("/proc/self/ns/pid")
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] in "ZX":
                continue
            environ = b"\0" + (stat.parent / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ or (same_namespace and int(fields[3]) == sid):
            members.append(int(stat.parent.name))
    return members


def assert_nothing_left(result: SandboxResult, within_s: float = 2.0) -> None:
    """No process of the run exists ``within_s`` seconds after the call at the latest."""
    deadline = time.monotonic() + within_s
    while run_processes(result) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_processes(result) == [], result
