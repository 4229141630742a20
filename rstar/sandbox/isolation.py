"""Isolation layers applied inside a sandbox worker before it runs untrusted code.

Each layer is a function that either succeeds or raises `LayerUnavailable`;
the worker (`rstar.sandbox.child`) applies the chosen set in the order of
`LAYERS` (seccomp last because it forbids the syscalls the others need).
Everything here runs in the fork server (namespaces, once) or in a freshly
forked child of it; nothing is ever applied to the service process itself.
Pure stdlib (ctypes) except seccomp, which uses PyPI `pyseccomp` over the
system's libseccomp.so.2.

Layers:
- `rlimits`: address space, CPU seconds, file size, open files, processes, core dumps.
- `seccomp`: a syscall filter (default allow, deny list with EPERM): no sockets,
  no fork/exec, no signals to other processes, no ptrace, mount, namespace,
  module, keyring, bpf, rlimit-raising or uid-changing calls.
- `landlock`: filesystem allow-list (read-only: the interpreter's library
  directories; read-write: the scratch directory; nothing else), plus, where
  the kernel's Landlock ABI has them, no TCP bind/connect (ABI 4) and no
  signals or abstract unix sockets outside the sandbox (ABI 6).
- `namespaces`: new network (no interfaces but a down loopback), IPC and UTS
  namespaces (a user namespace first when not root), entered once by the fork
  server and inherited by every worker.
- `pidns`: each worker in a PID namespace of its own (pid 2 under a holder
  init, forked by the fork server: `PidNamespaces`) and a mount namespace of its
  own with an empty read-only tmpfs over `/proc`: no other process has a pid it
  could name, and no procfs shows any (a fresh procfs would also unmask
  `/proc/kcore` & co. that container runtimes hide, hence the empty tmpfs).
- `unprivileged`: drop to uid/gid 65534 when root and the interpreter stays
  readable, else drop every capability.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
import sysconfig

LAYERS = ("rlimits", "namespaces", "pidns", "unprivileged", "landlock", "seccomp")

NOBODY = 65534


class LayerUnavailable(Exception):
    """The kernel, the container or the installed packages do not allow this layer."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise LayerUnavailable(f"{what}: {os.strerror(err)} (errno {err})")
    return ret


# ---------------------------------------------------------------- rlimits
def apply_job_rlimits(memory_bytes: int, cpu_seconds: int, file_bytes: int, baseline_as: int) -> None:
    """Per-execution limits, set by the worker on itself (soft = hard, so they only go down).

    The address-space limit is the worker's size before the program plus
    `memory_bytes`: the pre-imported numpy/sympy already map ~100+ MB.
    """
    resource.setrlimit(resource.RLIMIT_AS, (baseline_as + memory_bytes,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes,) * 2)


def current_address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- namespaces
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000


def apply_namespaces() -> None:
    """Move the calling process into new, empty network, IPC and UTS namespaces.

    Called once in the fork server, so every worker inherits them for free
    (a fresh network namespace per execution costs ~20 ms of kernel time).
    Without root a user namespace comes first, mapping our own uid and gid.
    """
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare(NEWNET|NEWIPC|NEWUTS)")
    if uid != 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            try:
                with open(path, "w") as f:
                    f.write(text)
            except OSError as e:
                raise LayerUnavailable(f"user namespace mapping {path}: {e}") from e


class PidNamespaces:
    """The fork server's side of `pidns`: a fresh PID namespace for each worker it forks.

    unshare(CLONE_NEWPID) only redirects the caller's *future* children, and a
    second unshare fails until the caller re-enters its own namespace with setns,
    which needs CAP_SYS_ADMIN over it: root in the initial user namespace (a
    fork server in a user namespace of its own cannot, so the layer is root-only).
    The first child forked into a new namespace is its init, for which the
    kernel ignores signals the process sends itself (`os.kill(os.getpid(),
    SIGKILL)` would do nothing); so a small holder is forked first as init and
    the worker second, as pid 2. The holder blocks on a pipe the fork server
    closes when the worker is gone; its exit tears the namespace down.
    """

    def __init__(self) -> None:
        self.error: str | None = None
        self._own = -1
        if os.geteuid() != 0:
            self.error = "a PID namespace per run needs root (setns back into the fork server's namespace)"
            return
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        if _libc.setns(self._own, CLONE_NEWPID) != 0:  # the reset `leave` needs, tried before relying on it
            err = ctypes.get_errno()
            self.error = f"setns(own PID namespace): {os.strerror(err)} (errno {err})"

    def enter(self) -> tuple[int, int]:
        """Make the next fork land in a new PID namespace, as pid 2; returns (holder pid, holder pipe fd).

        The caller forks its worker next and then calls `leave`, whatever happens.
        """
        if self.error is not None:
            raise LayerUnavailable(self.error)
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            self.leave()
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            _hold(r)
        os.close(r)
        return pid, w

    def leave(self) -> None:
        """Back to the fork server's own namespace for its next children."""
        if _libc.setns(self._own, CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(own PID namespace): {os.strerror(err)}")


def _hold(r: int) -> None:
    """The holder init of one worker's PID namespace: wait until the fork server closes the pipe, exit."""
    try:
        import signal

        set_parent_death_signal(signal.SIGKILL)
        os.closerange(0, r)
        os.closerange(r + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.read(r, 1)
    finally:
        os._exit(0)


def apply_private_proc() -> None:
    """In a worker that is in its own PID namespace: own mount namespace, `/proc` covered by an empty tmpfs."""
    if os.getpid() != 2:
        raise LayerUnavailable("not in a PID namespace of its own")
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    for args, what in (((None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount / private"),
                       ((b"none", b"/proc", b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                         b"size=4k,nr_inodes=2,mode=555"), "mount empty tmpfs on /proc")):
        _check(_libc.mount(args[0], args[1], args[2], ctypes.c_ulong(args[3]), args[4]), what)


_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18


def processes_hidden(layers: list[str]) -> bool:
    """Whether a program under these active layers can read no other process's environment or memory.

    - `landlock`: no path under /proc is allowed, and Landlock confines ptrace-class
      access (ptrace, process_vm_readv, /proc/<pid>/mem, environ) to processes in
      the same or a nested domain: every worker is its own domain, the service none.
    - `pidns` with `seccomp` or `unprivileged`: no other process has a pid in the
      worker's namespace and its /proc is empty; seccomp (no umount/mount) or the
      dropped capabilities keep the program from uncovering the real /proc.
    Anything else (e.g. `rlimits,seccomp` as root or as the service's uid) leaves
    /proc/<service pid>/environ readable.
    """
    return "landlock" in layers or ("pidns" in layers and ("seccomp" in layers or "unprivileged" in layers))


# ---------------------------------------------------------------- privileges
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def readable_by(uid: int, gid: int, paths: list[str], final_bit: str = "r") -> bool:
    """Whether every directory on the way to each path is traversable and the path readable by uid/gid.

    `final_bit="x"` asks only that the last component be traversable (a directory to enter).
    """
    import stat

    for path in paths:
        parts = os.path.abspath(path).split(os.sep)
        for i in range(1, len(parts) + 1):
            p = os.sep.join(parts[:i]) or os.sep
            try:
                st = os.stat(p)
            except OSError:
                return False
            need = stat.S_IXOTH if i < len(parts) or final_bit == "x" else stat.S_IROTH
            if st.st_uid == uid:
                need <<= 6
            elif st.st_gid == gid:
                need <<= 3
            if not st.st_mode & need:
                return False
    return True


def apply_unprivileged(scratch: str, can_switch_uid: bool) -> str:
    """Become uid 65534 (root with a readable interpreter) or drop all capabilities. Returns the mode."""
    if os.geteuid() == 0 and can_switch_uid:
        os.chown(scratch, NOBODY, NOBODY)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        return "uid"
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    return "caps" if os.geteuid() == 0 else "uid"


# ---------------------------------------------------------------- landlock
_SYS_LANDLOCK_CREATE_RULESET = 444  # same number on every architecture
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1

_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ALL_V1 = (1 << 13) - 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable (old kernel, LSM off, syscall filtered)."""
    ret = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(ret), 0)


def interpreter_paths() -> list[str]:
    """The directories an import may need: stdlib, extension modules, site-packages."""
    paths = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted(p for p in paths if p and os.path.isdir(p))


def read_only_paths() -> list[str]:
    """What untrusted code may read: the interpreter's stdlib and site-packages, shared libraries."""
    paths = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages", "lib-dynload"))}
    paths |= {"/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib"}
    paths.discard(None)
    # exec_prefix/lib/python3.x holds compiled extension modules for some builds
    return sorted(p for p in paths if p and os.path.isdir(p))


def apply_landlock(scratch: str, readable: list[str]) -> int:
    abi = landlock_abi()
    if abi < 1:
        raise LayerUnavailable("Landlock not supported by this kernel or blocked by the container")
    fs = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | \
        (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    rfd = _check(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                               ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        rules = [(p, _FS_READ) for p in readable] + [(scratch, fs), ("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE)]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(path):
                    access &= _FILE_ONLY & fs
                rule = _PathBeneathAttr(access & fs, fd)
                _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(rfd), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _set_no_new_privs()
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(rfd), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(rfd)
    return abi


def _set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def set_child_subreaper() -> None:
    _libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def set_parent_death_signal(sig: int) -> None:
    """Die with `sig` when the parent exits (so nothing outlives the service)."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# ---------------------------------------------------------------- seccomp
DENIED_SYSCALLS = (
    # network
    "socket", "socketpair",
    # processes
    "fork", "vfork", "execve", "execveat",
    # SysV IPC objects outlive the process: a channel between runs
    "shmget", "shmat", "semget", "msgget", "mq_open",
    # other processes' memory and handles
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "kcmp",
    # privilege, namespaces, mounts
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid",
    "setfsgid", "capset", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount",
    "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # kernel surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "mknod", "mknodat", "fanotify_init", "move_pages", "migrate_pages", "personality",
)


def forbid_raising_limits() -> None:
    """A second filter (filters stack): no more setrlimit/prlimit64 writes. For workers that keep root."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(sc.ERRNO(errno.EPERM), "setrlimit")
    f.add_rule(sc.ERRNO(errno.EPERM), "prlimit64", sc.Arg(2, sc.NE, 0))
    f.load()


def preload_seccomp() -> None:
    """Load pyseccomp and libseccomp.so.2 in the parent, before any layer blocks finding it."""
    try:
        import pyseccomp  # noqa: F401
    except Exception:  # noqa: BLE001 - reported by apply_seccomp in the probe
        pass


def apply_seccomp() -> None:
    try:
        import pyseccomp as sc
    except Exception as e:  # noqa: BLE001 - ImportError or a missing libseccomp.so.2 (OSError)
        raise LayerUnavailable(f"pyseccomp/libseccomp unavailable: {e}") from e
    try:
        deny = sc.ERRNO(errno.EPERM)
        f = sc.SyscallFilter(sc.ALLOW)
        for name in DENIED_SYSCALLS:
            try:
                f.add_rule(deny, name)
            except (ValueError, OSError, RuntimeError):
                pass  # not a syscall on this architecture
        # threads only: glibc's fork() is clone(SIGCHLD); clone3 -> ENOSYS makes glibc fall back to clone
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        me = os.getpid()
        for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            f.add_rule(deny, name, sc.Arg(0, sc.NE, me))
        f.add_rule(deny, "prlimit64", sc.Arg(0, sc.NE, 0))  # own limits only (glibc passes pid 0)
        f.load()  # sets NO_NEW_PRIVS itself
    except LayerUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - libseccomp reports failures as OSError/RuntimeError
        raise LayerUnavailable(f"seccomp filter: {e}") from e
