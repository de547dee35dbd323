"""The sandbox's child program: confine a process, then run ``program.py`` in it as ``__main__``.

:mod:`hellora_pl.evaluation.sandbox` copies this file into the run directory and starts it with a
fresh interpreter (inside bubblewrap where it is used). It must stay self-contained: standard library
only, no import of the package, and few imports at all (no ``subprocess``, no ``socket``), so the
program finds no dangerous module already loaded.

Process layout::

    runner (supervisor)                      waits, reports how the program ended, never runs it
      `-- program child                      applies the per-process layers, then runs program.py

With the project's own PID namespace (no bubblewrap) the runner first unshares the PID and mount
namespaces and forks: the forked child is PID 1 of the new namespace, mounts a private ``/proc`` and
becomes the supervisor. When PID 1 exits, the kernel kills every process left in the namespace, so
nothing the program started outlives the run. Under bubblewrap, bubblewrap's own init is PID 1.

The report pipe carries two lines to the parent: ``layers <applied,...> <pid namespace>`` from the
program child just before the program starts (the child then closes its copy; the namespace is there
for debugging), and ``status exit N`` or ``status signal N`` from the supervisor, which the parent
trusts over the exit status of bubblewrap or of the runner. The supervisor is made non-dumpable so that the program
cannot reopen its pipe through ``/proc/<pid>/fd``.

argv: root cpu_s as_bytes fsize_bytes nproc report_fd layers seccomp_bpf_path
"""

import os
import sys

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 0x1000, 0x4000, 0x40000
NOBODY = 65534
SIGKILL = 9
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


def prctl(libc, option, value):
    try:
        return libc is not None and libc.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:
        return False


def map_own_ids():
    """After unshare(CLONE_NEWUSER) as an ordinary user: keep the same uid/gid inside."""
    uid, gid = os.getuid(), os.getgid()
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass


def unshare(libc, flags):
    """unshare(flags), adding a user namespace when not root; True on success."""
    try:
        if libc.unshare(flags) == 0:
            return True
        if os.geteuid() == 0 or libc.unshare(flags | CLONE_NEWUSER) != 0:
            return False
    except AttributeError:
        return False
    map_own_ids()
    return True


def enter_pidns(libc, with_net, expose):
    """Become PID 1 of new PID and mount namespaces with a private /proc; returns the layers held.

    The calling process stays outside, waits for PID 1 and exits with its status: it never returns.
    Returns None (nothing changed) when the namespaces cannot be created. ``expose``: directories
    that uid 65534 must reach after the drop (see :func:`expose_to_others`).
    """
    flags = CLONE_NEWPID | CLONE_NEWNS | (CLONE_NEWNET if with_net else 0)
    if not unshare(libc, flags):
        return None
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    prctl(libc, PR_SET_PDEATHSIG, SIGKILL)
    held = ["netns"] if with_net else []
    private = libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
    if private and libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
        held.append("pidns")
        if expose:
            expose_to_others(libc, expose)
    return held


def closed_ancestor(path):
    """The topmost proper ancestor of ``path`` that others may not enter (like /root, mode 0700), or None."""
    closed = None
    parent = os.path.dirname(path)
    while True:
        try:
            if os.stat(parent).st_mode & 0o001 == 0:
                closed = parent
        except OSError:
            return None
        if parent == "/":
            return closed
        parent = os.path.dirname(parent)


def expose_to_others(libc, paths):
    """In our own mount namespace, as root: cover each closed directory on the way to ``paths`` with an
    empty tmpfs (mode 0755) that holds binds of just those paths, so uid 65534 reaches the interpreter
    and sees nothing else of, say, /root. Best effort: :func:`reachable_by_others` decides afterwards."""
    covers = {}
    for path in paths:
        top = closed_ancestor(path)
        if top is not None:
            covers.setdefault(top, []).append(path)
    for top, below in sorted(covers.items()):
        fds = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in below}
        try:
            if libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755") != 0:
                continue
            for path, fd in sorted(fds.items()):
                os.makedirs(path, mode=0o755, exist_ok=True)
                libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None)
        except OSError:
            continue
        finally:
            for fd in fds.values():
                os.close(fd)


def interpreter_paths(root):
    """The directories the program's interpreter imports from, and the one that holds the run directory
    (the run directory itself is given to uid 65534 by the parent)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(path for path in sys.path if path)
    paths = {os.path.realpath(path) for path in paths if os.path.isdir(path)}
    paths.discard(os.path.realpath(root))
    paths.add(os.path.dirname(os.path.realpath(root)))
    return sorted(paths)


def reachable_by_others(paths):
    """True when users other than the owner can enter every one of ``paths`` and its ancestors, and list
    the paths themselves (the import system lists the directories it imports from)."""
    for path in paths:
        directory, need = path, 0o005
        while True:
            try:
                if os.stat(directory).st_mode & need != need:
                    return False
            except OSError:
                return False
            if directory == "/":
                break
            directory, need = os.path.dirname(directory), 0o001
    return True


def enter_netns(libc):
    """New network namespace: only a loopback device, and it is down."""
    return unshare(libc, CLONE_NEWNET)


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
        if not prctl(libc, PR_SET_NO_NEW_PRIVS, 1):
            return False
        return libc.syscall(c_long(LANDLOCK_RESTRICT_SELF), c_long(ruleset), c_long(0)) == 0
    finally:
        os.close(ruleset)


def drop_to_nobody():
    """As root: become uid/gid 65534 with no supplementary groups, so file permissions and
    RLIMIT_NPROC apply (and every capability is gone). An ordinary user is unprivileged already."""
    if os.geteuid() != 0:
        return True
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    except OSError:
        return False
    return os.geteuid() == NOBODY and os.getegid() == NOBODY


def load_seccomp(ctypes, libc, path):
    """Install the BPF filter the parent compiled with libseccomp (raw ``struct sock_filter`` array)."""
    try:
        with open(path, "rb") as f:
            code = f.read()
    except OSError:
        return False
    if not code or len(code) % 8:
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    instructions = (SockFilter * (len(code) // 8)).from_buffer_copy(code)
    program = SockFprog(len(instructions), instructions)
    if not prctl(libc, PR_SET_NO_NEW_PRIVS, 1):
        return False
    try:
        return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) == 0
    except (AttributeError, ctypes.ArgumentError):
        return False


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

    Defence in depth only: Python code can switch it off (for example by replacing the code object
    of ``deny`` through a traceback), so nothing else relies on it. ctypes may be imported (numpy does)
    but not used: loading a library, looking up a symbol, calling a function and reading raw memory all
    raise audit events that are denied.
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


def pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def run_program(path):
    """Execute program.py as the __main__ module (tracebacks and SystemExit behave as for a script)."""
    with open(path, "rb") as f:
        source = f.read()
    module = type(sys)("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)


def confine_and_run(root, limits, report_fd, wanted, held, seccomp_path, ctypes, libc):
    """In the program child: apply the per-process layers, report them, run the program."""
    prctl(libc, PR_SET_PDEATHSIG, SIGKILL)
    applied = list(held)
    if set_rlimits(*limits):
        applied.append("rlimits")
    restore_sigxfsz()
    if libc is not None and "landlock" in wanted and landlock(ctypes, libc, root):
        applied.append("landlock")
    if "unprivileged" in wanted and drop_to_nobody():
        applied.append("unprivileged")
    if libc is not None and "seccomp" in wanted and seccomp_path != "-" and load_seccomp(ctypes, libc, seccomp_path):
        applied.append("seccomp")
    if "audit" in wanted:
        disarm_posixsubprocess()
        install_audit_hook(root)
        applied.append("audit")
    os.write(report_fd, f"layers {','.join(applied) or '-'} {pid_namespace()}\n".encode())
    os.close(report_fd)
    run_program(os.path.join(root, "program.py"))


def supervise(child, report_fd, libc):
    """Wait for the program child, then report how it ended; never returns."""
    prctl(libc, PR_SET_DUMPABLE, 0)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        line = f"status signal {os.WTERMSIG(status)}\n"
    else:
        line = f"status exit {os.waitstatus_to_exitcode(status)}\n"
    os.write(report_fd, line.encode())
    os._exit(0)


def main():
    root = sys.argv[1]
    cpu_s, as_bytes, fsize_bytes, nproc, report_fd = map(int, sys.argv[2:7])
    wanted = set(sys.argv[7].split(","))
    seccomp_path = sys.argv[8]
    ctypes, libc = load_libc()
    held = []
    if "bwrap" in wanted:  # bubblewrap made the PID, mount and network namespaces and the private /proc
        held = ["bwrap", "pidns", "netns"]
    elif libc is not None and "pidns" in wanted:
        as_root = os.geteuid() == 0 and "unprivileged" in wanted
        held = enter_pidns(libc, "netns" in wanted, interpreter_paths(root) if as_root else [])
    if held is None or not held and "netns" in wanted:
        held = ["netns"] if libc is not None and "netns" in wanted and enter_netns(libc) else []
    if "bwrap" not in wanted and os.geteuid() == 0 and not reachable_by_others(interpreter_paths(root)):
        wanted.discard("unprivileged")  # uid 65534 could not import from the interpreter: stay root, say so
    child = os.fork()
    if child:
        supervise(child, report_fd, libc)
    confine_and_run(root, (cpu_s, as_bytes, fsize_bytes, nproc), report_fd, wanted, held, seccomp_path, ctypes, libc)


if __name__ == "__main__":
    main()
