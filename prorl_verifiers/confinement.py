"""What confines a sandboxed process beyond namespaces and rlimits (sandbox_host.py uses both):

  a system-call filter  compiled once by libseccomp (through pyseccomp, a maintained ctypes binding
                        to the system's libseccomp.so.2) into a BPF program that the jailed driver
                        installs in every test's process
  a memory cgroup       per run, bounding its memory with kernel memory included (socket buffers,
                        descriptors in flight), which rlimits cannot: cgroup v2 where this
                        process's own cgroup delegates the memory controller, else cgroup v1's
                        memory hierarchy
"""

import errno
import functools
import itertools
import os
import signal
import socket
import tempfile
import time
import warnings

# Refused in every sandboxed process (EPERM): calls a test program has no use for, which reach the
# kernel's less guarded corners (keys outlive a run, io_uring and bpf bypass other checks, vsock
# ignores network namespaces).
DENIED_CALLS = ["keyctl", "add_key", "request_key", "ptrace", "process_vm_readv",
                "process_vm_writev", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
                "perf_event_open", "userfaultfd", "mount", "umount2", "pivot_root", "chroot",
                "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
                "mount_setattr", "unshare", "setns", "kexec_load", "kexec_file_load",
                "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
                "acct", "quotactl", "name_to_handle_at", "open_by_handle_at"]
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
CLONE_NAMESPACES = 0x7E020000
LIBSECCOMP_HELP = ("the code sandbox needs libseccomp to filter system calls: install it "
                   "(Debian/Ubuntu: apt-get install libseccomp2; Fedora: dnf install libseccomp) "
                   "and pip install pyseccomp")


@functools.cache
def syscall_filter() -> bytes:
    """The system-call filter (a BPF program, compiled once by libseccomp through pyseccomp) that
    every sandboxed process installs before the program runs: DENIED_CALLS, sockets other than
    AF_UNIX and namespaces fail with EPERM; clone3 with ENOSYS, since its flags cannot be inspected
    (the C library then falls back to clone)."""
    try:
        # drives the system's libseccomp.so.2 by ctypes
        import pyseccomp as seccomp
        rules = seccomp.SyscallFilter(seccomp.ALLOW)
    # ImportError, or OSError from loading the library
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"{LIBSECCOMP_HELP} ({type(error).__name__}: {error})") from None
    for call in DENIED_CALLS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), call)
    for call in ["socket", "socketpair"]:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    for flag in [1 << bit for bit in range(32) if CLONE_NAMESPACES >> bit & 1]:
        has_flag = seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", has_flag)
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as compiled:
        rules.export_bpf(compiled)
        compiled.seek(0)
        return compiled.read()


def cgroup_parent() -> str | None:
    """Where this process may make a memory cgroup per run, found from /proc/self/cgroup and the
    mounts: under its cgroup v2 (where memory is delegated) or beside it, else under its cgroup v1
    memory cgroup; None if none lets it (not root, no delegation)."""
    # "cgroup2", or each v1 controller -> its mount point
    mounts = {}
    with open("/proc/self/mounts") as lines:
        for line in lines:
            _, point, kind, options = line.split()[:4]
            if kind == "cgroup2":
                mounts.setdefault("cgroup2", point)
            for name in options.split(",") if kind == "cgroup" else []:
                mounts.setdefault(name, point)
    with open("/proc/self/cgroup") as lines:
        places = [line.rstrip("\n").split(":", 2)[1:] for line in lines]
    v2_root = mounts.get("cgroup2", "")
    own_v2 = [v2_root + path for controllers, path in places if controllers == "" and v2_root]
    # v2: children of our own cgroup where it delegates memory, else siblings of it where it has
    # memory (root)
    candidates = [c for c in own_v2 if "memory" in _controllers(c, "cgroup.subtree_control")]
    candidates += [os.path.dirname(c.rstrip("/")) for c in own_v2
                   if c.rstrip("/") != v2_root.rstrip("/")
                   and "memory" in _controllers(c, "cgroup.controllers")]
    candidates += [mounts["memory"] + path for controllers, path in places
                   if "memory" in controllers.split(",") and "memory" in mounts]
    for parent in candidates:
        try:
            remove_cgroup(make_cgroup(parent))
            return parent
        except OSError:
            continue
    return None


def make_cgroup(parent: str, memory_mb: int = 64) -> str:
    """A fresh cgroup under `parent` holding `memory_mb`, kernel memory included, swap none."""
    path = os.path.join(parent, f"prorl-sandbox-{os.getpid()}-{next(_cgroup_numbers)}")
    os.mkdir(path)
    limit = str(memory_mb * 2**20)
    v2 = os.path.exists(os.path.join(path, "memory.max"))
    settings = [("memory.max", limit), ("memory.swap.max", "0")] if v2 else [
        # in this order (v1)
        ("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)]
    try:
        for name, value in settings:
            required = name in ("memory.max", "memory.limit_in_bytes")
            if required or os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as setting:
                    setting.write(value)
    except OSError:
        os.rmdir(path)
        raise
    return path


def remove_cgroup(path: str) -> None:
    """Kill whatever is left in the cgroup (outside a PID namespace, leftovers live on), then remove
    it."""
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
        for pid in _read(os.path.join(path, "cgroup.procs")).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    warnings.warn(f"sandbox: could not remove the cgroup {path}", stacklevel=2)


def _controllers(cgroup: str, listing: str) -> list[str]:
    return _read(os.path.join(cgroup, listing)).split()


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


_cgroup_numbers = itertools.count()
