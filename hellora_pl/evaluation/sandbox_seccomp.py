"""The sandbox's seccomp filter: the system calls a test program never needs, refused by the kernel.

The filter is compiled once in the parent with libseccomp (through ``pyseccomp``) into raw BPF; the
sandbox runner loads those bytes with ``prctl(PR_SET_SECCOMP)`` just before the program starts, so the
child needs neither libseccomp nor a way to find it. Without ``pyseccomp`` or ``libseccomp.so`` the
sandbox still runs and reports the ``seccomp`` layer as missing.

Default: allow. Refused with EPERM unless noted:

- new processes: ``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD`` (threads still work), and
  ``clone3`` with ENOSYS so that glibc falls back to ``clone``, whose flags a filter can see;
- leaving the run's session or namespaces: ``setsid``, ``setpgid``, ``unshare``, ``setns``, ``mount``
  and friends, ``chroot``, ``pivot_root``;
- running other code: ``execve``, ``execveat``, ``ptrace``, ``process_vm_readv/writev``, ``bpf``,
  ``perf_event_open``, ``userfaultfd``, ``io_uring_*`` (its operations bypass seccomp), kernel
  modules, ``kexec``, keyrings, ``open_by_handle_at``;
- file metadata, which Landlock cannot restrict: the chmod, chown, utime and xattr families;
- signals: ``kill``, ``tkill``, ``tgkill``, ``rt_(tg)sigqueueinfo``, ``pidfd_*`` (a program cannot
  signal even itself; ``abort()`` still ends it);
- sockets: ``socket`` of any family but AF_UNIX (EACCES), ``connect`` (so no path-named Unix socket is
  reached), ``bind``, ``listen``, ``sendmsg``/``sendmmsg`` and ``sendto`` with an address; an AF_UNIX
  ``socketpair`` (asyncio's self-pipe) and ``send`` on it still work;
- identity: the setuid/setgid family (the runner drops to nobody before loading the filter).

System calls of other architectures (i386 ``int 0x80`` on x86_64) kill the process.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

CLONE_THREAD = 0x00010000
AF_UNIX = 1
# Calls newer than libseccomp 2.5 knows by name; numbers from 424 on are the same on every architecture
# but alpha. fchmodat2 and the *xattrat calls would otherwise reopen what the chmod/xattr rules close.
NEWER = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466, "file_setattr": 469}

DENIED = (
    "fork vfork setsid setpgid unshare setns mount umount umount2 move_mount open_tree fsopen fsmount fsconfig "
    "fspick mount_setattr chroot pivot_root execve execveat ptrace process_vm_readv process_vm_writev "
    "process_madvise bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register "
    "init_module finit_module delete_module kexec_load kexec_file_load reboot swapon swapoff acct "
    "add_key request_key keyctl open_by_handle_at name_to_handle_at quotactl "
    "chmod fchmod fchmodat chown fchown lchown fchownat utime utimes utimensat futimesat "
    "setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr "
    "kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo pidfd_open pidfd_send_signal pidfd_getfd "
    "connect bind listen sendmsg sendmmsg "
    "setuid setgid setreuid setregid setresuid setresgid setfsuid setfsgid setgroups capset"
).split()


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> bytes | None:
    """The compiled filter as raw BPF for this machine's architecture, or None where libseccomp is missing."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError):  # pyseccomp raises RuntimeError without libseccomp.so
        return None
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EPERM)
        for name in (*DENIED, *NEWER):
            known = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0
            try:
                rules.add_rule(refuse, name if known else NEWER.get(name, -1))
            except (OSError, ValueError, RuntimeError):  # a call this architecture does not have
                continue
        rules.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        rules.add_rule(seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.NE, AF_UNIX))
        rules.add_rule(refuse, "sendto", seccomp.Arg(4, seccomp.NE, 0))
        with tempfile.TemporaryFile() as f:
            rules.export_bpf(f)
            f.flush()
            f.seek(0)
            code = f.read()
    except (OSError, ValueError, RuntimeError):
        return None
    return code if code and len(code) % 8 == 0 else None


def write_filter(path: str) -> bool:
    """Write the compiled filter to ``path`` for the runner; False (nothing written) where unavailable."""
    code = seccomp_filter()
    if code is None:
        return False
    with open(path, "wb") as f:
        f.write(code)
    os.chmod(path, 0o644)
    return True
