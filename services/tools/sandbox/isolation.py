"""The isolation a kernel applies to itself before any user code runs; no root needed, none assumed.

Order (each step needs the rights the later ones give up):

1. namespaces (`enter_namespaces`, in the holder, before it forks the kernel): mount, network, pid
   and IPC; a non-root pool gets them through a user namespace created first;
2. mounts (`prepare_mounts`, in the kernel, still root): `/` private so nothing leaks to the host;
   a directory that other users cannot search (`/root` holding a pyenv Python) is covered with a
   tmpfs and the Python inside is bind-mounted back, so the unprivileged kernel can import the
   standard library and nothing else of that home; a fresh /proc that shows the sandbox only;
3. a distinct uid/gid (`drop_privileges`, when the pool is root), so RLIMIT_NPROC counts this
   kernel's processes only; then its own user namespace (mapped to that same uid) and no
   capabilities at all;
4. rlimits (address space, CPU, processes, open files, file size, no core files);
5. Landlock (`apply_landlock`): read-write the session folder and /dev/null, read-only the
   Python installation and the system libraries; TCP bind/connect denied where the ABI has it
   (>= 4); signals and abstract unix sockets scoped to the sandbox where it has that (>= 6);
6. seccomp (`apply_seccomp`, x86_64 only, refused elsewhere): sockets of the internet, packet and
   netlink families, namespace and mount calls, ptrace, bpf, io_uring (which can open sockets
   without socket()), clearing the parent-death signal and a few kernel-admin calls fail with
   EPERM; foreign-ABI calls fail.

Each host-dependent piece degrades to "not in force" and says so in the dict `confine` returns,
which the pool publishes as `KernelPool.isolation`. A root pool that cannot give the kernel
another uid fails instead: running user code as root is never a silent fallback.

From the outside (the pool's side): no descriptor of the template reaches a kernel
(`close_fds_except`), `ConfinedProcess` signals and kills a kernel with its whole namespace, and
`sweep_stale_folders` removes what a dead pool left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import resource
import select
import shutil
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
CLONE_NEW_ANY = 0x7E020000  # every CLONE_NEW* flag clone() takes (CLONE_NEWTIME: unshare/clone3 only)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

# Landlock (linux/landlock.h); the syscalls share one number on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_FS_ABI1 = (1 << 13) - 1      # execute .. make_sym
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_READ_ONLY = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
LL_NET_TCP = 1 | 2              # bind_tcp | connect_tcp (ABI 4)
LL_SCOPED = 1 | 2               # abstract unix sockets | signals (ABI 6)

# seccomp: x86_64 numbers; any other architecture gets no filter (reported as seccomp False).
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 0xC000003E, 0x40000000
SYS_SOCKET, SYS_CLONE, SYS_PRCTL, SYS_CLONE3 = 41, 56, 157, 435
DENIED_SYSCALLS = (
    101,                                   # ptrace
    155, 161, 165, 166, 167, 168, 169,     # pivot_root chroot mount umount2 swapon swapoff reboot
    175, 176, 246, 313, 320,               # init/delete/finit_module kexec_load kexec_file_load
    248, 249, 250,                         # add_key request_key keyctl
    272, 308,                              # unshare setns
    298, 321, 323,                         # perf_event_open bpf userfaultfd
    303, 304, 310, 311,                    # name_to/open_by_handle_at process_vm_readv/writev
    425, 426, 427,                         # io_uring_setup/enter/register
    428, 429, 430, 431, 432, 433, 442,     # open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr
)
DENIED_SOCKET_FAMILIES = (2, 10, 16, 17)  # AF_INET, AF_INET6, AF_NETLINK, AF_PACKET
EPERM, EINVAL, ENOSYS = 1, 22, 38
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(ret: int, what: str) -> int:
    """Raise OSError with errno when a libc call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def set_parent_death_signal() -> None:
    """SIGKILL this process when the thread that forked it exits (the holder and the kernel)."""
    _check(LIBC.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _map_own_ids(uid: int, gid: int) -> None:
    """Map this process's uid/gid to themselves in its new user namespace (no root inside)."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def enter_namespaces(as_root: bool) -> dict[str, bool]:
    """Unshare mount, network, pid and IPC namespaces; the caller then forks the kernel (pid 1).

    Args:
        as_root: the pool runs as root; otherwise a user namespace comes first (it is what lets an
            unprivileged process create the others). A root pool's kernel makes its user
            namespace later, after it has dropped to its own uid (`enter_user_namespace`).

    Returns:
        Which namespaces are in force: user_ns, mount_ns, net_ns, pid_ns.
    """
    got = {"user_ns": False, "mount_ns": False, "net_ns": False, "pid_ns": False}
    if not as_root:
        uid, gid = os.getuid(), os.getgid()
        if LIBC.unshare(CLONE_NEWUSER) == 0:
            _map_own_ids(uid, gid)
            got["user_ns"] = True
    for key, flag in (("mount_ns", CLONE_NEWNS), ("net_ns", CLONE_NEWNET), ("pid_ns", CLONE_NEWPID),
                      (None, CLONE_NEWIPC)):
        ok = LIBC.unshare(flag) == 0
        if key:
            got[key] = ok
    return got


def _hidden_top(path: Path) -> Path | None:
    """The topmost ancestor of `path` that other users cannot search (mode lacks o+x), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prepare_mounts(readable: list[str], expose: bool, fresh_proc: bool) -> list[str]:
    """Make the mount namespace private, expose `readable` to another uid, mount a fresh /proc.

    Args:
        readable: directories the kernel must read after it drops to another uid.
        expose: cover each directory that hides one of them (no o+x) with a tmpfs and bind the
            needed directory back (the rest of that directory, e.g. /root, disappears).
        fresh_proc: mount a /proc of the kernel's own pid namespace (the host's lists every process).

    Returns:
        The directories that were covered.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    covered: dict[Path, list[Path]] = {}
    if expose:
        for p in sorted({Path(os.path.realpath(r)) for r in readable if os.path.isdir(r)}):
            top = _hidden_top(p)
            if top is not None and not any(q in p.parents for q in covered.get(top, [])):
                covered.setdefault(top, []).append(p)
    for top, inner in covered.items():
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inner]  # reachable only before the tmpfs
        _mount("tmpfs", str(top), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for p, fd in zip(inner, fds):
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", str(p), None, MS_BIND | MS_REC)
            os.close(fd)
    if fresh_proc:  # refused in some containers (a masked /proc); Landlock keeps /proc closed anyway
        with contextlib.suppress(OSError):
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return [str(t) for t in covered]


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid`:`gid` with no supplementary groups; root's capabilities go with it."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid):  # a failed drop must never go unnoticed
        raise OSError(f"could not drop to uid {uid}")


def enter_user_namespace() -> bool:
    """A user namespace of this kernel's own, its uid/gid mapped to themselves. True if made."""
    uid, gid = os.getuid(), os.getgid()
    if LIBC.unshare(CLONE_NEWUSER) != 0:
        return False
    # After a uid change /proc/self belongs to root unless the process is dumpable again.
    _check(LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _map_own_ids(uid, gid)
    _check(LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    return True


def drop_capabilities() -> None:
    """Clear every capability (a new user namespace grants the full set inside it)."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)                          # two empty {effective, permitted, inheritable}
    _check(LIBC.capset(header, data), "capset")


def apply_rlimits(limits: dict[str, Any]) -> None:
    """SandboxLimits' rlimits, hard and soft alike (CPU: SIGXCPU at cpu_s, SIGKILL a second later)."""
    cpu = int(limits["cpu_s"])
    for res, value in ((resource.RLIMIT_AS, int(limits["memory_mb"]) << 20), (resource.RLIMIT_CPU, cpu),
                       (resource.RLIMIT_NPROC, int(limits["max_processes"])),
                       (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
                       (resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) << 20), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, cpu + 1 if res == resource.RLIMIT_CPU else value))


def landlock_abi() -> int:
    """The host's Landlock ABI version, 0 without Landlock."""
    abi = LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(abi), 0)


def _fs_rights(abi: int) -> int:
    rights = LL_FS_ABI1
    for needed, bit in ((2, LL_REFER), (3, LL_TRUNCATE), (5, LL_IOCTL_DEV)):
        if abi >= needed:
            rights |= bit
    return rights


def apply_landlock(rw_dirs: list[str], ro_paths: list[str], rw_files: list[str]) -> int:
    """Restrict this process (and its future children) to the given paths.

    Args:
        rw_dirs: directories with every right (the session folder).
        ro_paths: directories or files readable (and executable) only; missing ones are skipped.
        rw_files: single files readable and writable (/dev/null).

    Returns:
        The ABI in force, 0 when the host has no Landlock.
    """
    abi = landlock_abi()
    if abi <= 0:
        return 0
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled, LL_NET_TCP if abi >= 4 else 0, LL_SCOPED if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                  ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = LL_READ_FILE | LL_WRITE_FILE | (handled & (LL_TRUNCATE | LL_IOCTL_DEV))
    try:
        for paths, dir_rights in ((rw_dirs, handled), (ro_paths, LL_READ_ONLY), (rw_files, file_rights)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    if paths is rw_dirs:
                        raise  # without its rule the session folder would be closed to the kernel
                    continue  # absent on this host (e.g. /lib32), or unreachable for this uid anyway
                try:
                    rights = dir_rights if os.path.isdir(path) else dir_rights & (LL_EXECUTE | file_rights)
                    rule = _PathBeneath(rights, fd)
                    _check(LIBC.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0),
                           f"landlock_add_rule {path}")
                finally:
                    os.close(fd)
        _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(LIBC.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The BPF filter as (code, jt, jf, k) rows; see the module docstring for what it denies."""
    deny = (BPF_RET, 0, 0, RET_ERRNO | EPERM)
    prog = [(BPF_LD_ABS, 0, 0, 4), (BPF_JEQ, 1, 0, AUDIT_ARCH_X86_64), deny,   # a foreign ABI: deny
            (BPF_LD_ABS, 0, 0, 0), (BPF_JGE, 0, 1, X32_SYSCALL_BIT), deny]      # the x32 ABI: deny
    for nr in DENIED_SYSCALLS:
        prog += [(BPF_JEQ, 0, 1, nr), deny]
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    prog += [(BPF_JEQ, 0, 1, SYS_CLONE3), (BPF_RET, 0, 0, RET_ERRNO | ENOSYS)]
    prog += [(BPF_JEQ, 0, 4, SYS_CLONE), (BPF_LD_ABS, 0, 0, 16), (BPF_JSET, 0, 1, CLONE_NEW_ANY), deny,
             (BPF_RET, 0, 0, RET_ALLOW)]
    # The parent-death signal ties the kernel to its holder: user code may not clear it.
    prog += [(BPF_JEQ, 0, 4, SYS_PRCTL), (BPF_LD_ABS, 0, 0, 16), (BPF_JEQ, 0, 1, PR_SET_PDEATHSIG), deny,
             (BPF_RET, 0, 0, RET_ALLOW)]
    n = len(DENIED_SOCKET_FAMILIES)
    prog += [(BPF_JEQ, 0, n + 3, SYS_SOCKET), (BPF_LD_ABS, 0, 0, 16)]
    prog += [(BPF_JEQ, n - j, 0, fam) for j, fam in enumerate(DENIED_SOCKET_FAMILIES)]
    prog += [(BPF_RET, 0, 0, RET_ALLOW), deny, (BPF_RET, 0, 0, RET_ALLOW)]
    return prog


def apply_seccomp() -> bool:
    """Install the filter (no_new_privs first). False, and nothing installed, off x86_64."""
    if platform.machine() != "x86_64" or sys.byteorder != "little":
        return False
    prog = seccomp_program()
    raw = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *row) for row in prog))
    fprog = _SockFprog(len(prog), ctypes.cast(raw, ctypes.c_void_p))
    _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if LIBC.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) != 0:
        if ctypes.get_errno() == EINVAL:
            return False  # a kernel built without seccomp filters
        _check(-1, "prctl(PR_SET_SECCOMP)")
    return True


def python_paths() -> list[str]:
    """What a kernel reads: the Python installation (venv and base) and the system libraries."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes |= {os.path.realpath(p) for p in prefixes}
    system = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache", "/etc/localtime",
              "/dev/urandom"]
    return sorted(prefixes) + system


def confine(folder: str, uid: int | None, limits: dict[str, Any], namespaces: dict[str, bool],
            isolate: bool = True) -> dict[str, Any]:
    """Apply steps 2-6 of the module docstring to this process, in order.

    Args:
        folder: the session folder (read-write; owned by `uid` already).
        uid: the uid (and gid) to drop to (a root pool), or None to keep this one.
        limits: SandboxLimits as a dict (the rlimits are read from it).
        namespaces: what `enter_namespaces` made (in the holder).
        isolate: False: rlimits only.

    Returns:
        The isolation in force: user_ns, mount_ns, net_ns, pid_ns, landlock (ABI or 0), seccomp,
        uid.

    Raises:
        OSError: a root pool's kernel could not become another uid (or could not reach Python
            as that uid without a mount namespace).
    """
    info: dict[str, Any] = {"user_ns": False, "mount_ns": False, "net_ns": False, "pid_ns": False,
                            "landlock": 0, "seccomp": False, **namespaces}
    if isolate:
        readable = python_paths()
        needed = readable + [folder]  # a root pool's folder may sit under a 0700 directory (pytest's tmp)
        if namespaces.get("mount_ns"):
            prepare_mounts(needed, expose=uid is not None, fresh_proc=bool(namespaces.get("pid_ns")))
        elif uid is not None and any(os.path.isdir(p) and _hidden_top(Path(os.path.realpath(p))) for p in needed):
            raise OSError(f"uid {uid} cannot reach {sys.base_prefix} or {folder} and there is no mount namespace "
                          f"to expose them; run the pool as a non-root user or allow mount namespaces")
        if uid is not None:
            drop_privileges(uid, uid)
            info["user_ns"] = enter_user_namespace()
            set_parent_death_signal()  # a uid change clears it
        if info["user_ns"]:
            drop_capabilities()
    apply_rlimits(limits)
    if isolate:
        info["landlock"] = apply_landlock([folder], readable, ["/dev/null"])
        info["seccomp"] = apply_seccomp()
    info["uid"] = os.getuid()
    return info


# FROM THE OUTSIDE: what reaches a kernel from its parents, how it is signalled and killed, and
# what a dead pool left behind.


def _exited(pidfd: int, timeout_s: float) -> bool:
    poller = select.poll()  # not select(): it fails on fd numbers >= 1024
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


class ConfinedProcess:
    """A kernel seen from outside: its holder (pidfd; leader of the process group) and its pid.

    The kernel's pid cannot be reused while the holder lives (it has not reaped the kernel), so
    the kernel is signalled only then; the holder exits only once the kernel, and with it every
    process of its pid namespace, is gone, so its pidfd says when a kill is complete.
    """

    def __init__(self, holder_pid: int, pidfd: int) -> None:
        self.holder_pid, self.pidfd = holder_pid, pidfd
        self.pid: int | None = None  # the kernel's host pid (pid 1 of its namespace), from its hello
        self.pid_ns = self.killed = self.gone = False
        self.kill_lock = threading.Lock()

    def alive(self) -> bool:
        return not self.gone and not _exited(self.pidfd, 0)

    def send_signal(self, sig: int) -> None:
        if self.pid and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self, wait_s: float) -> bool:
        """SIGKILL the kernel (its whole namespace; no namespace: the group) and wait for the holder.

        Returns:
            True once everything is gone (False: a process may be left; its uid is not reused).
        """
        with self.kill_lock, contextlib.suppress(ProcessLookupError):
            if not self.killed:
                self.killed = True
                if self.pid and self.pid_ns:
                    self.send_signal(signal.SIGKILL)  # pid 1: every process of the namespace goes with it
                elif self.alive():
                    os.killpg(self.holder_pid, signal.SIGKILL)
            if not self.gone and not _exited(self.pidfd, wait_s) and self.alive():
                os.killpg(self.holder_pid, signal.SIGKILL)  # the holder outlived its kernel: a bug
        self.gone = self.gone or _exited(self.pidfd, wait_s)
        return self.gone


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor but `keep` (the template's socket, other kernels' pidfds)."""
    low = 0
    for fd in sorted(keep) + [os.sysconf("SC_OPEN_MAX")]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def sweep_stale_folders(root: Path, pattern: re.Pattern[str]) -> int:
    """Remove the folders under `root` whose name (`pattern`, group 1: the owner's pid) names a
    dead pool, first killing the process groups still working in them (a holder leads its group;
    its kernel dies with it). Returns how many were removed."""
    stale = [p for p in root.iterdir() if (m := pattern.match(p.name)) and _pid_dead(int(m[1]))]
    prefixes = tuple(str(p) for p in stale)
    for pid in filter(str.isdigit, os.listdir("/proc") if stale else []):
        try:
            pgid = os.getpgid(int(pid)) if os.readlink(f"/proc/{pid}/cwd").startswith(prefixes) else 0
            if pgid > 0 and pgid != os.getpgid(0):  # 0: a group this pid namespace cannot name
                os.killpg(pgid, signal.SIGKILL)
        except OSError:
            continue
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)
