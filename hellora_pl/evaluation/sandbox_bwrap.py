"""The bubblewrap command line the sandbox wraps its runner in, where ``bwrap`` is installed and works.

bubblewrap (``apt-get install bubblewrap``) gives the run new PID, mount, network, IPC and UTS
namespaces, a private ``/proc`` and a minimal ``/dev``, and a file system made only of read-only binds
of what Python needs (the system directories, ``/etc``, the interpreter's prefixes and site-packages)
plus the run directory, the only writable place. ``/tmp``, home directories and the project checkout
are not there at all. ``--die-with-parent`` ends the sandbox with the caller, ``--new-session``
detaches it from the terminal, ``--clearenv`` starts it from an empty environment.

As root, no user namespace is made (bubblewrap would map root to root); the runner itself drops to
uid 65534 before the program starts. As an ordinary user, a user namespace is required.
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@functools.lru_cache(maxsize=1)
def bwrap_path() -> str | None:
    """``bwrap`` when it is installed and can make the namespaces here (probed once), else None."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, *_namespace_flags(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        ok = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None
    return path if ok else None


def _namespace_flags() -> list[str]:
    flags = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    return flags if os.geteuid() == 0 else ["--unshare-user", *flags]


@functools.lru_cache(maxsize=1)
def _filesystem() -> tuple[str, ...]:
    """Read-only binds of the system and of the interpreter (its prefixes and site-packages)."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    python.add(str(Path(sys.executable).parent))
    python.add(str(Path(os.path.realpath(sys.executable)).parent))
    covered = [path for path in SYSTEM_DIRS if os.path.isdir(path) and not os.path.islink(path)]
    made = {"/", "/tmp"}  # /tmp is a fresh tmpfs (see bwrap_command)
    for path in sorted(python):
        if not os.path.isdir(path) or any(path == top or path.startswith(top + "/") for top in covered):
            continue
        args += [*_open_parents(path, made), "--ro-bind", path, path]  # a symlinked source is followed
        covered.append(path)
    return tuple(args)


def _open_parents(path: str, made: set[str]) -> list[str]:
    """Create the directories above ``path`` with mode 0755: bwrap makes them 0700, which uid 65534
    could not pass through (a Python under /root would then fail to import)."""
    args: list[str] = []
    for parent in reversed(Path(path).parents):
        if str(parent) not in made:
            args += ["--perms", "0755", "--dir", str(parent)]
            made.add(str(parent))
    return args


def bwrap_command(root: Path, env: Mapping[str, str]) -> list[str]:
    """The bwrap prefix for one run: namespaces, file system, and ``env`` as the whole environment."""
    path = bwrap_path()
    if path is None:
        raise RuntimeError("bubblewrap is not available; install it with `apt-get install bubblewrap`")
    # The fresh /tmp comes first: binds made before it would be hidden under it (an interpreter in
    # a virtual environment under /tmp, as in a CI checkout there, then fails to start).
    command = [path, "--die-with-parent", "--new-session", *_namespace_flags()]
    command += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", *_filesystem()]
    command += [*_open_parents(str(root), {"/", "/tmp"}), "--bind", str(root), str(root)]
    command += ["--chdir", str(root), "--clearenv"]
    for name, value in env.items():
        command += ["--setenv", name, value]
    return [*command, "--"]
