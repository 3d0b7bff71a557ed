"""The jail model-written programs run in: bubblewrap namespaces, a bare read-only root, a seccomp filter.

bubblewrap (``bwrap``, the sandbox behind Flatpak) builds the isolation; this module only decides
what goes in it:

- fresh mount, PID, IPC, UTS, network and cgroup namespaces (a user namespace too when we are not
  root); ``--die-with-parent`` and a new session;
- a root filesystem holding only read-only binds of the interpreter's prefix (its site-packages
  hidden under an empty tmpfs, numpy alone bound back in, read-only) and the system library
  folders (their parents made 0755, so uid 65534 can traverse them), /dev/null and
  /dev/urandom, and a size-capped tmpfs at /work (also /tmp; inodes capped too when root, see
  CappedWork) for the program's files: no /proc, /etc, /home, /root, /tmp of the host, no
  evaluator cwd, checkpoints or benchmark files;
- a seccomp filter (BPF generated here, loaded by bwrap) refusing new processes (threads are
  allowed), memfd, ptrace, keyrings, mounts and namespaces, bpf, perf, io_uring, kernel modules
  and the like, and every socket family but AF_UNIX, AF_INET and AF_INET6 (no vsock, whose
  connections namespaces do not cover, no netlink, no packet sockets);
- run as root, the launcher keeps only CAP_SETUID/CAP_SETGID to become uid 65534 at once, so the
  program runs as an unprivileged user of the host; run as a user, a user namespace maps that
  user's own id.

Nothing here is best effort: ``find_bwrap`` and ``jail_argv`` raise ``JailUnavailable`` with the
fix when the tool or a feature is missing, and sandbox.capabilities() verifies the result by
running probes inside it.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from phibook.errors import PhibookError

NOBODY = 65534
WORK = "/work"
LAUNCHER_IN_JAIL = "/sandbox/launcher.py"
INSTALL_HINT = ("install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu), `sudo dnf install "
                "bubblewrap` (Fedora), `sudo pacman -S bubblewrap` (Arch), or set PHIBOOK_BWRAP to its path; "
                "or pass --unsafe-no-sandbox to run model-written programs unconfined")
# Library folders the interpreter may load from; absent ones are skipped, symlinks recreated.
LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
# Options this module relies on (bubblewrap >= 0.8: --size for a capped tmpfs, --perms for tmpfs).
REQUIRED_OPTIONS = ("--size", "--perms", "--die-with-parent", "--seccomp", "--disable-userns", "--new-session")


class JailUnavailable(PhibookError):
    """The jail cannot be built on this machine; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Bwrap:
    path: str
    version: str


def find_bwrap() -> Bwrap:
    """The bwrap to use ($PHIBOOK_BWRAP, else PATH), checked for the options the jail needs."""
    path = os.environ.get("PHIBOOK_BWRAP") or shutil.which("bwrap")
    if not path or not os.access(path, os.X_OK):
        where = f"PHIBOOK_BWRAP={os.environ['PHIBOOK_BWRAP']} is not an executable" if os.environ.get(
            "PHIBOOK_BWRAP") else "bwrap is not on PATH"
        raise JailUnavailable(f"the code sandbox needs bubblewrap, and {where}; {INSTALL_HINT}")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise JailUnavailable(f"the code sandbox could not run {path}: {exc}; {INSTALL_HINT}") from exc
    missing = [o for o in REQUIRED_OPTIONS if o not in usage]
    if missing:
        raise JailUnavailable(f"{path} ({version or 'unknown version'}) lacks {', '.join(missing)}; the code sandbox "
                              f"needs bubblewrap >= 0.8; {INSTALL_HINT}")
    return Bwrap(path, version or "bubblewrap")


# --------------------------------------------------------------------------- seccomp

# Syscalls the program never needs and that would widen its reach: new processes (fork, vfork),
# memory the rlimits do not count, other processes' memory, kernel keyrings, mounts and
# namespaces, kernel extension points, and clocks/modules/reboot. Numbers from the kernel's
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (arm64).
DENIED_SYSCALLS = {
    "x86_64": {
        "fork": 57, "vfork": 58, "memfd_create": 319, "memfd_secret": 447,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
        "acct": 163, "syslog": 103, "quotactl": 179, "quotactl_fd": 443, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "lookup_dcookie": 212, "personality": 135, "uselib": 134, "iopl": 172,
        "ioperm": 173, "modify_ldt": 154, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
        "adjtimex": 159, "vhangup": 153, "fanotify_init": 300, "ustat": 136, "sysfs": 139, "_sysctl": 156,
        "nfsservctl": 180, "create_module": 174, "get_kernel_syms": 177, "query_module": 178,
    },
    "aarch64": {
        "memfd_create": 279, "memfd_secret": 447, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438, "keyctl": 219,
        "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89, "syslog": 116,
        "quotactl": 60, "quotactl_fd": 443, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "lookup_dcookie": 18, "personality": 92, "settimeofday": 170, "clock_settime": 112,
        "clock_adjtime": 266, "adjtimex": 171, "vhangup": 58, "fanotify_init": 262, "nfsservctl": 42,
    },
}
# Checked by argument: clone only for threads (CLONE_THREAD), clone3 answered ENOSYS so libc falls
# back to clone (its flags are in memory, where a filter cannot look); socket and socketpair only
# for the families a test program needs (the network namespace is empty; AF_VSOCK would reach the
# VM host, AF_NETLINK the kernel's event and routing sockets). Signal handlers are allowed: the
# verdict is decided in another process (phibook/sandbox/launcher.py), so a handler reaches nothing.
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435
SOCKET = {"x86_64": 41, "aarch64": 198}
SOCKETPAIR = {"x86_64": 53, "aarch64": 199}
SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
CLONE_THREAD = 0x00010000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_BIT = 0x40000000  # x86_64's x32 ABI numbers: refused whole

# classic BPF (linux/filter.h, linux/seccomp.h)
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
OFF_NR, OFF_ARCH, OFF_ARGS = 0, 4, 16


def machine_arch() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def seccomp_filter(arch: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) bwrap loads with --seccomp, for this machine's arch."""
    arch = arch or machine_arch()
    if arch not in DENIED_SYSCALLS:
        raise JailUnavailable(f"the code sandbox has no seccomp syscall table for {arch} (only "
                              f"{', '.join(DENIED_SYSCALLS)}); pass --unsafe-no-sandbox to run programs unconfined")
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to relative offsets below.
    prog: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def op(code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        prog.append((code, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(prog)

    op(LD_W_ABS, OFF_ARCH)
    op(JEQ_K, AUDIT_ARCH[arch], jt=1)  # another ABI in this process (int 0x80): kill it
    op(RET_K, RET_KILL_PROCESS)
    op(LD_W_ABS, OFF_NR)
    if arch == "x86_64":
        op(JSET_K, X32_BIT, jt="deny")
    for nr in sorted(DENIED_SYSCALLS[arch].values()):
        op(JEQ_K, nr, jt="deny")
    op(JEQ_K, CLONE[arch], jt="clone")
    op(JEQ_K, CLONE3, jt="nosys")
    op(JEQ_K, SOCKET[arch], jt="socket")
    op(JEQ_K, SOCKETPAIR[arch], jt="socket")
    op(RET_K, RET_ALLOW)
    label("clone")
    op(LD_W_ABS, OFF_ARGS)  # args[0] = flags (low 32 bits hold CLONE_THREAD)
    op(JSET_K, CLONE_THREAD, jt="allow", jf="deny")
    label("socket")
    op(LD_W_ABS, OFF_ARGS)  # args[0] = domain (an int: the low 32 bits)
    for family in SOCKET_FAMILIES.values():
        op(JEQ_K, family, jt="allow")
    op(RET_K, RET_ERRNO | EAFNOSUPPORT)
    label("allow")
    op(RET_K, RET_ALLOW)
    label("nosys")
    op(RET_K, RET_ERRNO | ENOSYS)
    label("deny")
    op(RET_K, RET_ERRNO | EPERM)
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise AssertionError("seccomp filter jump out of range")
        out.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(out)


# --------------------------------------------------------------------------- filesystem


def interpreter() -> tuple[str, str]:
    """(the real python binary, its installation prefix): a venv's python is its base's."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, prefix


def hidden_dirs(prefix: str) -> list[str]:
    """site-packages folders under the interpreter prefix: not needed (the jail runs python -I -S)."""
    names = set()
    for scheme_var in ("purelib", "platlib"):
        path = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix}).get(scheme_var)
        if path:
            names.add(os.path.realpath(path))
    for pattern in ("lib*/python3*/site-packages", "lib*/python3*/dist-packages", "lib/python3/dist-packages",
                    "local/lib/python3*/dist-packages"):
        names.update(str(p) for p in Path(prefix).glob(pattern))
    return sorted(p for p in names if os.path.isdir(p) and p.startswith(prefix.rstrip("/") + "/"))


def numpy_dirs() -> list[str]:
    """The installed numpy package folder (and its bundled libraries, numpy.libs), if any: bound
    read-only into the jail, the only package of the environment a program sees. Found without
    importing numpy."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("numpy")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    package = os.path.realpath(list(spec.submodule_search_locations)[0])
    return [p for p in (package, package + ".libs", os.path.join(os.path.dirname(package), "numpy.libs"))
            if os.path.isdir(p)][:2]


def jail_argv(bwrap: Bwrap, *, launcher: str, seccomp_fd: int, disk_bytes: int, as_root: bool,
              launcher_args: list[str] | None = None, work_source: str | None = None) -> list[str]:
    """The bwrap command line that runs ``launcher`` as /sandbox/launcher.py in the jail, followed
    by ``launcher_args``. ``work_source``: a folder with a capped tmpfs mounted on it (see
    ``CappedWork``) to bind at /work instead of bwrap's own tmpfs."""
    exe, prefix = interpreter()
    argv = [bwrap.path, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if as_root:
        # No user namespace: the launcher switches to uid 65534 of the host, with these two
        # capabilities only for that; every other capability is gone before it starts.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    # Folders bwrap would otherwise create 0700 as root (unreadable after the drop to uid 65534,
    # so zlib, binascii, ... could not load): made 0755 first.
    made = set()
    for lib in (*LIBRARY_DIRS, "/dev/null"):
        parent = os.path.dirname(lib)
        if parent != "/" and parent not in made and os.path.isdir(parent) and not os.path.islink(parent):
            made.add(parent)
            argv += ["--perms", "0755", "--dir", parent]
    # Parents of the prefix (say /root/.pyenv/versions): traversable, not listable.
    parents = []
    for parent in Path(prefix).parents:
        if str(parent) != "/" and str(parent) not in made:
            parents.append(str(parent))
    for parent in reversed(parents):
        argv += ["--perms", "0711", "--dir", parent]
    argv += ["--ro-bind", prefix, prefix]
    hidden = hidden_dirs(prefix)
    numpy = [d for d in numpy_dirs() if any(d.startswith(h.rstrip("/") + "/") for h in hidden)]
    for folder in hidden:
        argv += ["--perms", "0555", "--tmpfs", folder]
        for package in numpy:
            if package.startswith(folder.rstrip("/") + "/"):
                argv += ["--ro-bind", package, package]
        argv += ["--remount-ro", folder]
    if not exe.startswith(prefix.rstrip("/") + "/"):
        argv += ["--ro-bind", exe, exe]
    for lib in LIBRARY_DIRS:
        if prefix == lib or lib.startswith(prefix.rstrip("/") + "/"):
            continue
        if os.path.islink(lib):
            argv += ["--symlink", os.readlink(lib), lib]
        elif os.path.isdir(lib):
            argv += ["--ro-bind", lib, lib]
    argv += ["--dev-bind", "/dev/null", "/dev/null", "--dev-bind", "/dev/urandom", "/dev/urandom",
             "--remount-ro", "/dev/urandom",
             *(["--bind", work_source, WORK] if work_source else
               ["--perms", "1777", "--size", str(int(disk_bytes)), "--tmpfs", WORK]), "--symlink", WORK, "/tmp",
             "--ro-bind", launcher, LAUNCHER_IN_JAIL, "--remount-ro", "/",
             "--chdir", WORK, "--clearenv",
             "--setenv", "HOME", WORK, "--setenv", "TMPDIR", WORK, "--setenv", "LANG", "C.UTF-8",
             "--setenv", "PYTHONHASHSEED", "0", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
             *PROGRAM_ENV_ARGS, "--seccomp", str(seccomp_fd),
             exe, "-I", "-S", LAUNCHER_IN_JAIL, *(launcher_args or [])]
    return argv


# Environment of a program's process: one thread for numpy's BLAS, and glibc's malloc arenas
# capped (with 64 MB per thread under the address-space limit, ThreadPoolExecutor(16) failed).
PROGRAM_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MALLOC_ARENA_MAX": "2"}
PROGRAM_ENV_ARGS = [part for k, v in PROGRAM_ENV.items() for part in ("--setenv", k, v)]


def numpy_path() -> list[str]:
    """sys.path entries the launcher adds so that the bound numpy imports."""
    hidden = hidden_dirs(interpreter()[1])
    dirs = [d for d in numpy_dirs() if any(d.startswith(h.rstrip("/") + "/") for h in hidden)]
    return [os.path.dirname(dirs[0])] if dirs else []


# --------------------------------------------------------------------------- a work dir with capped inodes

# Files the program's /work may hold: bwrap's --tmpfs sets size= only, and a flood of empty files
# took hundreds of MB of kernel memory (inodes and dentries) outside every other cap.
WORK_INODES = 8192
# unshare(1) gives bwrap a mount namespace of its own, where sh mounts the capped tmpfs on an
# empty host folder (bwrap then binds it at /work). A preexec_fn doing the same would make
# subprocess fork the evaluator (with a model loaded: tens of ms per program) instead of vfork.
MOUNT_SCRIPT = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 120; shift 2; exec "$@"'
_CAPPED_WORKS: bool | None = None


class CappedWork:
    """/work as a tmpfs with ``size`` and ``nr_inodes`` (root only, with util-linux's unshare and
    mount): the tmpfs exists only in the mount namespace bwrap starts in, so it vanishes with the
    jail whatever happens to the parent; the host folder stays empty and ``close`` removes it."""

    def __init__(self, disk_bytes: int) -> None:
        import tempfile

        self.path = tempfile.mkdtemp(prefix="phibook-work-")
        self.options = f"size={int(disk_bytes)},nr_inodes={WORK_INODES},mode=1777"

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` (bwrap's) started with the capped tmpfs mounted on ``path``."""
        return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", MOUNT_SCRIPT, "phibook-work", self.options, self.path, *argv]

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    @staticmethod
    def available() -> bool:
        """Whether this process can cap /work's inodes (root, unshare, mount; checked once)."""
        global _CAPPED_WORKS
        if _CAPPED_WORKS is None:
            _CAPPED_WORKS = False
            if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("mount") and os.path.exists("/bin/sh"):
                work = CappedWork(1 << 20)
                try:
                    probe = work.wrap(["/bin/sh", "-c", 'test "$(stat -f -c %c "$0")" -le 8192', work.path])
                    _CAPPED_WORKS = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    pass
                finally:
                    work.close()
        return _CAPPED_WORKS
