"""The sandbox's driver: the one program that runs inside every sandbox run (sandbox.py starts it, and reads
what it writes). It walls itself in, then forks one child per test and polices it.

Shipped by source (DRIVER_SOURCE) and run with `python -I -S`, so it imports only the standard library, inside
the function: nothing else is importable there, and every import costs start-up time. Order matters:
  0. into the run's memory cgroup (sandbox.py made it), before anything is allocated or forked;
  1. rlimits and oom_score_adj 1000 for everything started from here on;   2. a session keyring of its own;
  3. the jail (mount namespace, new root, read-only /usr and Python installs, bounded /tmp and System V IPC);
  4. capabilities down to what policing needs; then the preload (trusted);
  5. the system-call filter, then the tests, each in a child that becomes the throw-away uid before it runs
     anything of the program's; a keeper, the unfiltered parent (PID 1), invalidates the uid's user keyrings at
     the end: no key outlives the run.
"""

import inspect
import textwrap


def driver() -> None:
    """The driver: reads the job (marshal on stdin), confines itself, runs each test, writes the results.

    Shipped into the sandbox by source and run with `python -I -S` (no site-packages, no PYTHON* env),
    as root inside fresh namespaces when the host has them. Imports only what starts fast (no json, enum,
    tempfile: they would double the start-up time), so results go out as one header line per test,
    "exit CODE LENGTH", "signal NUMBER LENGTH" or "timeout 0 LENGTH", followed by LENGTH bytes of stdout.
    """
    import ctypes
    import marshal
    import math
    import os
    import resource
    import select
    import sys

    # _signal, not signal: the same calls and numbers without signal's enum import (a tenth of the start-up)
    import _signal as signal

    sigkill = 9
    header_line = os.pread(0, 32, 0).split(b"\n", 1)[0]
    job = marshal.loads(os.pread(0, int(header_line), len(header_line) + 1))  # the inputs stay in the file
    input_offset = len(header_line) + 1 + int(header_line)
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(source, target, fstype, flags, options=None) -> None:
        encode = (lambda s: s.encode() if s is not None else None)
        check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(options)), f"mount {target}")

    # 0. The run's memory cgroup bounds what rlimits cannot: kernel memory (socket buffers, descriptors in flight).
    if job["cgroup"] is not None:
        with open(job["cgroup"], "w") as procs:
            procs.write("0")  # this process; all it starts from here on follows it
    # 1. Limits for every process started from here on (root sets them; they hold after the uid change). When
    #    memory runs out, the sandbox goes before the trainer: the driver at 500 (raising needs no privilege),
    #    the program at 1000, so that in the run's own cgroup the program goes first and the driver reports it.
    with open("/proc/self/oom_score_adj", "w") as oom:
        oom.write("500")
    for limit, value in [(resource.RLIMIT_AS, job["memory_mb"] * 2**20), (resource.RLIMIT_NPROC, job["max_processes"]),
                         (resource.RLIMIT_NOFILE, job["max_open_files"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_MSGQUEUE, 0)]:
        resource.setrlimit(limit, (value, value))

    # 2. A session keyring of our own: the program can neither read nor fill the one the trainer was started in.
    #    Where keyctl is refused (a container's seccomp filter), the program is refused it alike.
    keyctl = {"x86_64": 250, "aarch64": 219, "riscv64": 219}[os.uname().machine]
    if libc.syscall(keyctl, 1, None) < 0 and ctypes.get_errno() not in (1, 38):  # KEYCTL_JOIN_SESSION_KEYRING
        check(-1, "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")

    # 3. The jail: a new root on a tmpfs (in our own mount namespace, so the host sees none of it) holding
    #    read-only /usr and the interpreter's installs, a private /tmp, two devices and our own /proc.
    if job["jail"]:
        ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec = 1, 2, 4, 8, 32, 4096, 16384
        root = "/tmp"  # any existing directory will do as the mount point; the tmpfs hides the host's /tmp here
        # Held open before the tmpfs goes up: a venv under /tmp is still reachable through its descriptor.
        sources = {path: os.open(path, os.O_PATH) for path in ["/usr"] + job["binds"]}

        def bind(path: str, flags: int) -> None:
            source = f"/proc/self/fd/{sources[path]}" if path in sources else path
            mount(source, root + path, None, ms_bind | ms_rec)
            mount(None, root + path, None, ms_remount | ms_bind | flags)  # bind mounts take flags on remount

        mount("tmpfs", root, "tmpfs", ms_nosuid, f"size={job['scratch_mb']}m,nr_inodes={job['scratch_files']},mode=755")
        for path in sources:
            os.makedirs(root + path, exist_ok=True)
            bind(path, ms_rdonly | ms_nosuid | ms_nodev)
        for path in ["/bin", "/lib", "/lib64", "/sbin"]:
            if os.path.islink(path):  # merged /usr: /bin -> usr/bin
                os.symlink(os.readlink(path), root + path)
            elif os.path.isdir(path):
                os.mkdir(root + path)
                bind(path, ms_rdonly | ms_nosuid | ms_nodev)
        os.mkdir(root + "/dev")
        for device in ["/dev/null", "/dev/zero", "/dev/urandom"]:
            open(root + device, "w").close()
            bind(device, ms_nosuid | ms_noexec)
        os.mkdir(root + "/proc")
        mount("proc", root + "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec)  # this PID namespace's processes
        # System V IPC of our own IPC namespace (its limits live there): little shared memory, removed once no
        # process holds it, no message queues; all of it goes when the namespace's last process does.
        shared_bytes = job["shared_memory_mb"] * 2**20
        for name, value in [("shmmax", shared_bytes), ("shmall", shared_bytes // os.sysconf("SC_PAGE_SIZE")),
                            ("shmmni", 16), ("shm_rmid_forced", 1), ("msgmni", 0), ("sem", "32 256 32 8")]:
            with open(f"{root}/proc/sys/kernel/{name}", "w") as setting:
                setting.write(str(value))
        os.makedirs(root + "/tmp", exist_ok=True)
        os.chmod(root + "/tmp", 0o1777)
        os.chroot(root)
        os.chdir("/tmp")
        for fd in sources.values():
            os.close(fd)

    # 4. The driver keeps only what policing needs: as root, the rights to become the program's uid and to kill
    #    it (the program, another uid, can then neither signal nor re-limit the driver); else nothing.
    #    Not dumpable: /proc/1/fd (the job file, other tests' inputs) is closed to the program either way.
    keep = (1 << 5 | 1 << 6 | 1 << 7) if job["uid"] is not None else 0  # CAP_KILL, CAP_SETGID, CAP_SETUID
    capabilities = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable x 2 words
    check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), capabilities), "capset")  # _LINUX_CAPABILITY_VERSION_3
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(4, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    devnull = os.open("/dev/null", os.O_WRONLY)

    def become_program_user() -> None:
        """A throw-away uid, no groups, no capabilities (they go with uid 0), and no way back up."""
        if job["uid"] is not None:
            os.setgroups([])
            os.setresgid(job["uid"], job["uid"], job["uid"])
            os.setresuid(job["uid"], job["uid"], job["uid"])

    class SockFprog(ctypes.Structure):  # struct sock_fprog: the filter's length in instructions and its address
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    def install_syscall_filter() -> None:
        """The BPF program sandbox.py compiled with libseccomp: refused calls fail with EPERM from here on."""
        if job["seccomp"]:
            program = SockFprog(len(job["seccomp"]) // 8, job["seccomp"])  # 8 bytes per instruction
            check(libc.prctl(22, 2, ctypes.byref(program), 0, 0), "prctl(PR_SET_SECCOMP)")  # SECCOMP_MODE_FILTER

    def forget_keys() -> None:
        """Invalidate the uid's user and user-session keyrings (the kernel keeps them after the run's processes
        end): a later run, even of the same uid, finds no key. Done by a helper of the program's uid."""
        with open("/proc/key-users") as owners:  # the kernel's key count per uid: none, nothing to forget
            if not any(line.split(":")[0].strip() == str(job["uid"]) for line in owners):
                return
        helper = os.fork()
        if helper == 0:
            try:
                become_program_user()
                # by serial number: each lookup by special id (-4 @u, -5 @us) would make a fresh pair again
                rings = [libc.syscall(keyctl, 0, ring, 0) for ring in (-4, -5)]  # KEYCTL_GET_KEYRING_ID
                for serial in rings:
                    if serial > 0:
                        libc.syscall(keyctl, 21, serial)  # KEYCTL_INVALIDATE: freed with every key in it
            finally:
                os._exit(0)
        os.waitpid(helper, 0)

    preloaded = {}
    if job["preload"] is not None:
        try:
            exec(compile(job["preload"], "preload.py", "exec"), preloaded)  # noqa: S102  (trusted code)
        except BaseException as error:  # noqa: BLE001
            sys.stdout.buffer.write(f"preload {type(error).__name__}: {error}".encode())
            sys.stdout.buffer.flush()
            os._exit(3)

    def run_program(test: dict, stdin_file, stdout_file) -> int:
        """In the forked child: limits, redirections, then the program. Returns the exit status."""
        with open("/proc/self/oom_score_adj", "w") as oom:
            oom.write("1000")
        become_program_user()
        os.setsid()  # a session and group of its own: no terminal, and a timeout kills the whole group at once
        # The limit is CPU time, the program's own: SIGPROF at exactly the limit, RLIMIT_CPU behind it (whole
        # seconds: SIGXCPU, then SIGKILL), so a neighbour's hog slows it but cannot fail it.
        cpu_seconds = max(1, math.ceil(job["time_limit"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        signal.setitimer(signal.ITIMER_PROF, job["time_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["output_limit"], job["output_limit"]))
        os.dup2(stdin_file.fileno(), 0)
        os.dup2(stdout_file.fileno(), 1)
        os.dup2(devnull, 2)
        # new standard streams on the redirected descriptors, for the rest of this child's short life
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        namespace = dict(preloaded, __name__="solution" if "call" in test else "__main__")
        try:
            exec(compile(job["program"], "solution.py", "exec"), namespace)  # noqa: S102  (what the sandbox is for)
            if "call" in test:
                value = eval(test["call"], namespace)
                sys.stdout.write("\n" + repr(value) + "\n")
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:  # noqa: BLE001  (whatever the program raises is its failure, status 1)
            status = 1
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001  (e.g. the program closed stdout, or wrote past the output cap)
            status = status or 1
        return status

    def kill_leftovers() -> None:
        """Whatever a test left behind (say, a daemon that left its group) goes. kill(-1) reaches every process
        the caller may signal: in the jail, the driver reaches just the jail (never PID 1, its keeper if it has
        one); outside, a helper of the program's uid reaches just that uid."""
        if job["jail"]:
            try:
                os.kill(-1, sigkill)
            except ProcessLookupError:
                pass
        elif job["uid"] is not None:
            helper = os.fork()
            if helper == 0:
                try:
                    become_program_user()
                    os.kill(-1, sigkill)
                finally:
                    os._exit(0)
        while True:  # reap our children, the helper included (orphans go to PID 1: us, or the keeper)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break

    def run_test(test: dict, input_offset: int) -> bytes:
        stdin_file = os.fdopen(os.memfd_create("stdin"), "w+b")  # in-memory files: nothing on any disk
        stdout_file = os.fdopen(os.memfd_create("stdout"), "w+b")
        copied = 0
        while copied < test.get("input_length", 0):  # file to file in the kernel: never in this process's memory
            copied += os.sendfile(stdin_file.fileno(), 0, input_offset + copied, test["input_length"] - copied)
        stdin_file.seek(0)
        pid = os.fork()
        if pid == 0:  # the child never returns into this loop, whatever the program does
            status = 1
            try:
                os.close(0)  # the job file: other tests' inputs
                status = run_program(test, stdin_file, stdout_file)
            finally:
                os._exit(status & 0xFF)
        pidfd = os.pidfd_open(pid)  # the wall-clock backstop: for a program that sleeps, or is starved for long
        finished = bool(select.select([pidfd], [], [], job["wall_limit"])[0])
        os.close(pidfd)
        if not finished:
            for kill, target in [(os.killpg, pid), (os.kill, pid)]:  # the group, or the child not yet its leader
                try:
                    kill(target, sigkill)
                except ProcessLookupError:
                    pass
        _, wait_status, usage = os.wait4(pid, 0)
        out_of_cpu = os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) in (signal.SIGPROF, signal.SIGXCPU)
        finished = finished and not out_of_cpu and usage.ru_utime + usage.ru_stime <= job["time_limit"]
        kill_leftovers()
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

    def keep_until_done(policing: int) -> None:
        """The keeper: waits for the policing driver (reaping, as PID 1, the orphans it leaves), then forgets
        the uid's keys and exits as the driver did. kill(-1) from the driver cannot reach PID 1."""
        while True:
            pid, wait_status = os.wait()
            if pid == policing:
                break
        forget_keys()
        code = os.waitstatus_to_exitcode(wait_status)
        os._exit(code if code >= 0 else 1)

    # 5. The system-call filter, once for the run: each test's process inherits it (one per process would cost its
    #    compilation every time). What needs a refused call later (keyctl, to forget the uid's keys) is left to an
    #    unfiltered keeper, the parent of the driver that polices the tests.
    if job["uid"] is not None:
        policing = os.fork()
        if policing != 0:
            keep_until_done(policing)
    install_syscall_filter()
    for test in job["tests"]:
        sys.stdout.buffer.write(run_test(test, input_offset))
        sys.stdout.buffer.flush()
        input_offset += test.get("input_length", 0)


DRIVER_SOURCE = textwrap.dedent(inspect.getsource(driver)) + "\ndriver()\n"


# Run by sandbox.py as the throw-away uid after a run whose driver did not get to forget_keys(): the same steps.
FORGET_KEYS_PROGRAM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {"x86_64": 250, "aarch64": 219, "riscv64": 219}[os.uname().machine]
for serial in [libc.syscall(keyctl, 0, ring, 0) for ring in (-4, -5)]:
    if serial > 0:
        libc.syscall(keyctl, 21, serial)
"""
