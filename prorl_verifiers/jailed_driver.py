"""The program that runs inside every sandbox run: sandbox_host.py starts it, reads what it writes.

Shipped as this file's text (sandbox_host.DRIVER_SOURCE), run with `python -I -S -c`: no
site-packages, so it imports only the standard library, and only what starts fast (no json, enum,
tempfile). It reads the job (marshal on stdin), walls itself in (main() reads in that order:
cgroup, limits, keyring, jail, capabilities, preload, system-call filter), then forks one child per
test and polices it. Results go out as one header line per test, "exit CODE LENGTH", "signal NUMBER
LENGTH" or "timeout 0 LENGTH", then LENGTH bytes of stdout. With `--forget-keys` (run as a uid by
the host, for a run whose driver did not get to it) it only invalidates that uid's keyrings.
"""

# _signal, not signal: the same calls without signal's enum import (a tenth of the start-up time)
import _signal as signal
import ctypes
import marshal
import math
import os
import resource
import select
import sys

# keyctl's system-call number, and the operations used here
KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219}[os.uname().machine]
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_INVALIDATE = 0, 1, 21
# @u and @us, by special id
USER_KEYRINGS = (-4, -5)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
# any existing directory will do as the mount point; the tmpfs hides the host's /tmp
JAIL_ROOT = "/tmp"
# CAP_KILL, CAP_SETGID, CAP_SETUID: what policing needs, as root
POLICING_CAPABILITIES = 1 << 5 | 1 << 6 | 1 << 7
# the exit status when the preload raised; stdout then says what
PRELOAD_FAILED = 3
LIBC = ctypes.CDLL(None, use_errno=True)


def main() -> None:
    """Read the job, confine this process step by step, then run and report each test."""
    job, input_offset = read_job()
    join_cgroup(job)
    set_limits(job)
    join_own_session_keyring()
    if job["jail"]:
        build_jail(job)
    drop_capabilities(job)
    preloaded = run_preload(job)
    # 5. The filter, once for the run: each test's process inherits it (one per process would cost
    # its compilation every time). What needs a refused call later (keyctl, to forget the uid's
    # keys) is left to an unfiltered keeper, the parent of the driver that polices the tests.
    if job["uid"] is not None:
        policing = os.fork()
        if policing != 0:
            keep_until_done(job, policing)
    install_syscall_filter(job)
    devnull = os.open("/dev/null", os.O_WRONLY)
    for test in job["tests"]:
        sys.stdout.buffer.write(run_test(job, test, input_offset, preloaded, devnull))
        sys.stdout.buffer.flush()
        input_offset += test.get("input_length", 0)


def read_job():
    """The job ("LENGTH\\n" + marshal) and where the inputs start: they stay in the file."""
    header_line = os.pread(0, 32, 0).split(b"\n", 1)[0]
    job = marshal.loads(os.pread(0, int(header_line), len(header_line) + 1))
    return job, len(header_line) + 1 + int(header_line)


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, options=None) -> None:
    def encode(text):
        return text.encode() if text is not None else None
    check(LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(options)),
          f"mount {target}")


# ----------------------------------------------------------------------------- 0-2: before the jail

def join_cgroup(job: dict) -> None:
    """0. The run's memory cgroup bounds what rlimits cannot: kernel memory (socket buffers,
    descriptors in flight). This process goes in; all it starts from here on follows it."""
    if job["cgroup"] is not None:
        with open(job["cgroup"], "w") as procs:
            procs.write("0")


def set_limits(job: dict) -> None:
    """1. Limits for every process started from here on (root sets them; they hold after the uid
    change). When memory runs out the sandbox goes before the trainer: the driver at 500 (raising
    needs no privilege), the program at 1000, so that in the run's cgroup the program goes first."""
    with open("/proc/self/oom_score_adj", "w") as oom:
        oom.write("500")
    limits = [(resource.RLIMIT_AS, job["memory_mb"] * 2**20),
              (resource.RLIMIT_NPROC, job["max_processes"]),
              (resource.RLIMIT_NOFILE, job["max_open_files"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_MSGQUEUE, 0)]
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))


def join_own_session_keyring() -> None:
    """2. A session keyring of our own: the program can neither read nor fill the trainer's. Where
    keyctl is refused (a container's seccomp filter: EPERM, ENOSYS), the program is refused it
    alike."""
    joined = LIBC.syscall(KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)
    if joined < 0 and ctypes.get_errno() not in (1, 38):
        check(-1, "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")


# ----------------------------------------------------------------------------- 3: the jail

def build_jail(job: dict) -> None:
    """3. A new root on a tmpfs (in our own mount namespace: the host sees none of it) holding
    read-only /usr and the interpreter's installs, a private /tmp, three devices and our own /proc;
    then chroot."""
    root = JAIL_ROOT
    # Held open before the tmpfs goes up: a venv under /tmp is still reachable through its
    # descriptor.
    sources = {path: os.open(path, os.O_PATH) for path in ["/usr"] + job["binds"]}
    options = f"size={job['scratch_mb']}m,nr_inodes={job['scratch_files']},mode=755"
    mount("tmpfs", root, "tmpfs", MS_NOSUID, options)
    for path, fd in sources.items():
        os.makedirs(root + path, exist_ok=True)
        bind(f"/proc/self/fd/{fd}", root + path, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in ["/bin", "/lib", "/lib64", "/sbin"]:
        if os.path.islink(path):
            # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            os.mkdir(root + path)
            bind(path, root + path, MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.mkdir(root + "/dev")
    for device in ["/dev/null", "/dev/zero", "/dev/urandom"]:
        open(root + device, "w").close()
        bind(device, root + device, MS_NOSUID | MS_NOEXEC)
    os.mkdir(root + "/proc")
    # this PID namespace's processes only
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    limit_ipc(job, root)
    os.makedirs(root + "/tmp", exist_ok=True)
    os.chmod(root + "/tmp", 0o1777)
    os.chroot(root)
    os.chdir("/tmp")
    for fd in sources.values():
        os.close(fd)


def bind(source: str, target: str, flags: int) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    # bind mounts take their flags on a remount
    mount(None, target, None, MS_REMOUNT | MS_BIND | flags)


def limit_ipc(job: dict, root: str) -> None:
    """System V IPC of our own IPC namespace (its limits live there): little shared memory, removed
    once no process holds it, no message queues; all of it goes when the namespace's last process
    does."""
    shared_bytes = job["shared_memory_mb"] * 2**20
    settings = [("shmmax", shared_bytes), ("shmall", shared_bytes // os.sysconf("SC_PAGE_SIZE")),
                ("shmmni", 16), ("shm_rmid_forced", 1), ("msgmni", 0), ("sem", "32 256 32 8")]
    for name, value in settings:
        with open(f"{root}/proc/sys/kernel/{name}", "w") as setting:
            setting.write(str(value))


# ----------------------------------------------------------------------------- 4-5: privileges

def drop_capabilities(job: dict) -> None:
    """4. Only what policing needs: as root, the rights to become the program's uid and to kill it
    (the program, another uid, can then neither signal nor re-limit the driver); else nothing. Not
    dumpable: /proc/1/fd (the job file, other tests' inputs) is closed to the program either way."""
    keep = POLICING_CAPABILITIES if job["uid"] is not None else 0
    # effective, permitted, inheritable; two 32-bit words each (_LINUX_CAPABILITY_VERSION_3)
    capabilities = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)
    check(LIBC.capset((ctypes.c_uint32 * 2)(0x20080522, 0), capabilities), "capset")
    check(LIBC.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(LIBC.prctl(4, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def become_program_user(job: dict) -> None:
    """A throw-away uid, no groups, no capabilities (they go with uid 0), and no way back up."""
    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])


class SockFprog(ctypes.Structure):
    """struct sock_fprog: the filter's length in instructions and its address."""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install_syscall_filter(job: dict) -> None:
    """The BPF program the host compiled with libseccomp: refused calls fail with EPERM from here
    on."""
    if job["seccomp"]:
        # 8 bytes per instruction; prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ...)
        program = SockFprog(len(job["seccomp"]) // 8, job["seccomp"])
        check(LIBC.prctl(22, 2, ctypes.byref(program), 0, 0), "prctl(PR_SET_SECCOMP)")


def run_preload(job: dict) -> dict:
    """The preload's globals (trusted code, run once before any test); a preload that raises ends
    the driver with PRELOAD_FAILED and its error on stdout."""
    preloaded = {}
    if job["preload"] is not None:
        try:
            exec(compile(job["preload"], "preload.py", "exec"), preloaded)  # noqa: S102  (trusted)
        except BaseException as error:  # noqa: BLE001
            sys.stdout.buffer.write(f"preload {type(error).__name__}: {error}".encode())
            sys.stdout.buffer.flush()
            os._exit(PRELOAD_FAILED)
    return preloaded


# ----------------------------------------------------------------------------- keys

def invalidate_own_keyrings() -> None:
    """Invalidate this uid's user and user-session keyrings, freed with every key in them. By serial
    number: each lookup by special id would make a fresh pair again."""
    rings = [LIBC.syscall(KEYCTL, KEYCTL_GET_KEYRING_ID, ring, 0) for ring in USER_KEYRINGS]
    for serial in rings:
        if serial > 0:
            LIBC.syscall(KEYCTL, KEYCTL_INVALIDATE, serial)


def forget_keys(job: dict) -> None:
    """The kernel keeps a uid's keyrings after the run's processes end: a helper of the program's
    uid invalidates them, so a later run, even of the same uid, finds no key."""
    # the kernel's key count per uid: none, nothing to forget
    with open("/proc/key-users") as owners:
        if not any(line.split(":")[0].strip() == str(job["uid"]) for line in owners):
            return
    helper = os.fork()
    if helper == 0:
        try:
            become_program_user(job)
            invalidate_own_keyrings()
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def keep_until_done(job: dict, policing: int) -> None:
    """The keeper (PID 1, which the driver's kill(-1) cannot reach): reaps orphans until the
    policing driver ends, then forgets the uid's keys and exits as the driver did."""
    while True:
        pid, wait_status = os.wait()
        if pid == policing:
            break
    forget_keys(job)
    code = os.waitstatus_to_exitcode(wait_status)
    os._exit(code if code >= 0 else 1)


# ----------------------------------------------------------------------------- one test

def run_test(job: dict, test: dict, input_offset: int, preloaded: dict, devnull: int) -> bytes:
    """Fork the test's process, wait for it under the wall-clock backstop, clean up, report."""
    # in-memory files: nothing on any disk
    stdin_file = os.fdopen(os.memfd_create("stdin"), "w+b")
    stdout_file = os.fdopen(os.memfd_create("stdout"), "w+b")
    copy_input(test, input_offset, stdin_file)
    pid = os.fork()
    if pid == 0:
        # the child never returns into the driver's loop, whatever the program does
        status = 1
        try:
            # the job file holds other tests' inputs
            os.close(0)
            status = run_program(job, test, preloaded, (stdin_file, stdout_file, devnull))
        finally:
            os._exit(status & 0xFF)
    finished, wait_status = wait_for(job, pid)
    kill_leftovers(job)
    stdout_file.seek(0)
    output = stdout_file.read(job["output_limit"])
    stdin_file.close()
    stdout_file.close()
    if not finished:
        kind, number = "timeout", 0
    elif os.WIFSIGNALED(wait_status):
        kind, number = "signal", os.WTERMSIG(wait_status)
    else:
        kind, number = "exit", os.WEXITSTATUS(wait_status)
    return f"{kind} {number} {len(output)}\n".encode() + output


def copy_input(test: dict, input_offset: int, stdin_file) -> None:
    """File to file in the kernel: the input never passes through the driver's memory."""
    copied, length = 0, test.get("input_length", 0)
    while copied < length:
        copied += os.sendfile(stdin_file.fileno(), 0, input_offset + copied, length - copied)
    stdin_file.seek(0)


def wait_for(job: dict, pid: int):
    """(whether the test finished within its CPU time, its wait status). The wall-clock backstop is
    for a program that sleeps, or is starved for long: then its group is killed."""
    pidfd = os.pidfd_open(pid)
    finished = bool(select.select([pidfd], [], [], job["wall_limit"])[0])
    os.close(pidfd)
    if not finished:
        # the group, or the child not yet its leader
        for kill, target in [(os.killpg, pid), (os.kill, pid)]:
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _, wait_status, usage = os.wait4(pid, 0)
    out_of_cpu = os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) in (
        signal.SIGPROF, signal.SIGXCPU)
    within = usage.ru_utime + usage.ru_stime <= job["time_limit"]
    return finished and not out_of_cpu and within, wait_status


def run_program(job: dict, test: dict, preloaded: dict, files: tuple) -> int:
    """In the forked child: limits, redirections, then the program. Returns the exit status."""
    stdin_file, stdout_file, devnull = files
    with open("/proc/self/oom_score_adj", "w") as oom:
        oom.write("1000")
    become_program_user(job)
    # a session and group of its own: no terminal, and a timeout kills the whole group at once
    os.setsid()
    limit_cpu_and_output(job)
    os.dup2(stdin_file.fileno(), 0)
    os.dup2(stdout_file.fileno(), 1)
    os.dup2(devnull, 2)
    # new standard streams on the redirected descriptors, for the rest of this child's short life
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    status = execute(job, test, preloaded)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001  (the program closed stdout, or wrote past the cap)
        status = status or 1
    return status


def limit_cpu_and_output(job: dict) -> None:
    """CPU time, the program's own: SIGPROF at exactly the limit, RLIMIT_CPU behind it (whole
    seconds: SIGXCPU, then SIGKILL), so a neighbour's hog slows it but cannot fail it. Output:
    RLIMIT_FSIZE."""
    cpu_seconds = max(1, math.ceil(job["time_limit"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    signal.setitimer(signal.ITIMER_PROF, job["time_limit"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["output_limit"], job["output_limit"]))


def execute(job: dict, test: dict, preloaded: dict) -> int:
    """The program, as __main__ (stdin tests) or as a module then the call; its exit status."""
    namespace = dict(preloaded, __name__="solution" if "call" in test else "__main__")
    try:
        # what the sandbox is for
        exec(compile(job["program"], "solution.py", "exec"), namespace)  # noqa: S102
        if "call" in test:
            value = eval(test["call"], namespace)
            sys.stdout.write("\n" + repr(value) + "\n")
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # noqa: BLE001  (whatever the program raises is its failure)
        return 1


def kill_leftovers(job: dict) -> None:
    """Whatever a test left behind (a daemon that left its group) goes: kill(-1) reaches, in the
    jail, just the jail (never PID 1); outside, from a helper of the program's uid, that uid."""
    if job["jail"]:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif job["uid"] is not None:
        helper = os.fork()
        if helper == 0:
            try:
                become_program_user(job)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
    # reap our children, the helper included (orphans go to PID 1: us, or the keeper)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


if __name__ == "__main__":
    if sys.argv[1:] == ["--forget-keys"]:
        invalidate_own_keyrings()
    else:
        main()
