"""A sandbox for model-written Python: run a program on test inputs; nothing it does gets out.

    sandbox.run_tests(program, [{"input": "1 2\\n"}, {"call": "add(1, 2)"}])
      -> [{"status": "ok", "output": "3\\n"}, {"status": "ok", "output": "\\n3\\n"}]   (None if the sandbox failed)

One run = one fresh sandbox. A small driver (`_sandbox_main` below, shipped in by source) starts there
as root inside new Linux namespaces, walls itself in, becomes a throw-away user, and then forks one
child per test. The verdict is not the sandbox's: the expected outputs never enter it, rewards.py
compares outputs outside, so a program passes a test only by printing the right answer.

Protections, and where each comes from:
  per run   its own network namespace: no interface but a downed loopback, so no network at all
            its own PID namespace: sees and can signal only its own processes; when the driver
            (PID 1 there) ends, the kernel kills everything left inside
            its own mount namespace and root: read-only /usr (and the interpreter's install), a
            private size-capped /tmp as working directory, /dev/{null,zero,urandom}, its own /proc;
            no host file (your data, its expected outputs) is visible, nothing outside is writable
            a throw-away uid of its own, no groups, no capabilities, no_new_privs: it can touch
            nothing of yours, and RLIMIT_NPROC, which counts per uid, holds each run to its own
            budget (with a shared `nobody`, one fork bomb would starve the runs beside it)
            a clean environment (PATH, HOME, TMPDIR, LANG only)
            RLIMIT_AS (memory), RLIMIT_NPROC (processes), RLIMIT_NOFILE, no core dumps
  per test  its own session and process group (setsid): no controlling terminal
            wall-clock limit (the driver kills the test's process group, then every process left
            in the sandbox), CPU-time limit (RLIMIT_CPU), output cap (RLIMIT_FSIZE on its stdout)

Where the system refuses some of this, the sandbox says so once (a warning) and runs with what it has:
  - `unshare` refused (e.g. a container without CAP_SYS_ADMIN): no namespaces, so the program can
    reach the network and see the machine's files; as root it still runs as a throw-away uid with
    every limit above, and leftovers are killed by uid.
  - not root: the namespaces come from a user namespace (`unshare --user`), capabilities are dropped
    after the walls go up; without user namespaces the program runs as you, with the limits only.
`protections()` proves which protections hold by running a harmless probe program in the sandbox.
"""

import functools
import inspect
import itertools
import json
import marshal
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

DEFAULT_TIME_LIMIT = 2.0   # seconds of wall-clock time per test; the CPU-time limit is this, rounded up
MEMORY_MB = 512            # address space of each process in the sandbox (RLIMIT_AS)
MAX_PROCESSES = 8          # processes and threads of the throw-away user (RLIMIT_NPROC)
MAX_OPEN_FILES = 64        # RLIMIT_NOFILE
OUTPUT_LIMIT = 2**20       # bytes of stdout kept per test; writing past it, or any file past it, fails (RLIMIT_FSIZE)
SCRATCH_MB = 16            # size of the private /tmp, the program's working directory ...
SCRATCH_FILES = 1024       # ... and how many files it may hold (inodes)
SHARED_MEMORY_MB = 16      # System V shared memory of the run's own IPC namespace, all segments together
# The most one run's processes can hold together: each process its address space and a capped file (memfd,
# pipe) per descriptor; then the scratch disk and shared memory, which belong to the run, not to a process.
RUN_MEMORY_MB = MAX_PROCESSES * (MEMORY_MB + MAX_OPEN_FILES * OUTPUT_LIMIT // 2**20) + SCRATCH_MB + SHARED_MEMORY_MB
STARTUP_SECONDS = 10.0     # allowance for starting the sandbox on a busy machine, on top of the tests' limits
UID_BASE = 2**30           # throw-away uids live far above any real user's (1000+) and container ranges (100000+)


def run_tests(program: str, tests: list[dict], time_limit: float = DEFAULT_TIME_LIMIT,
              preload: str | None = None) -> list[dict] | None:
    """Run `program` once per test, each test {"input": stdin text} or {"call": a Python expression}.

    stdin tests run the program as __main__ with the input on stdin; call tests run it as a module,
    then print repr(value of the call) on a line of its own, last. Returns one {"status", "output"}
    per test: status "ok", "exit code N", "killed by SIGNAME" or "timeout"; output is stdout, at most
    OUTPUT_LIMIT bytes. None when the sandbox itself failed (its driver killed, or out of time).
    `preload`, trusted code only, runs once in the driver before the tests (say, a slow import); each test's
    program starts from a copy of its globals. A preload that raises is a RuntimeError naming the error.
    """
    return _run(_system(), program, tests, time_limit, preload)


@functools.cache
def protections() -> dict[str, bool]:
    """Which protections hold on this machine, each proven by a harmless probe run in the sandbox."""
    # A host process for the probe to signal. Pids do not compare across pid namespaces (inside a jail, the
    # same number names a sandbox process), so what counts is whether this process is hit, not whether kill()
    # succeeds.
    target = subprocess.Popen(["sleep", "60"], start_new_session=True)
    with socket.socket() as listener, tempfile.TemporaryDirectory() as host_dir:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        marker = os.path.join(host_dir, "visible-to-the-sandbox?")
        open(marker, "w").close()
        os.chmod(host_dir, 0o755)
        os.chmod(marker, 0o644)  # readable by anyone: only walls can hide it
        probe_input = json.dumps({"port": listener.getsockname()[1], "host_pid": target.pid, "marker": marker,
                                  "forks": MAX_PROCESSES + 8, "allocate": (MEMORY_MB + 64) * 2**20})
        try:
            results = run_tests(_PROBE, [{"input": probe_input}], time_limit=20)
            try:
                target.wait(timeout=0.5)  # a signal sent is delivered at once; give the exit a moment to show
                host_signalled = True
            except subprocess.TimeoutExpired:
                host_signalled = False
        finally:
            target.kill()
            target.wait()
    if not results or results[0]["status"] != "ok":
        raise RuntimeError(f"the sandbox probe did not finish cleanly: {results}")
    facts = json.loads(results[0]["output"])
    return {
        "own_user": facts["uid"] not in (0, os.getuid()),      # not root, not you: a throw-away uid
        "own_session": facts["sid"] == facts["pid"],           # a session leader (sids do not compare across namespaces)
        "no_network": not facts["network"],
        "cannot_signal_host": not host_signalled,
        "own_pid_namespace": facts["parent_pid"] == 1,          # the driver is PID 1: a namespace of its own
        "process_limit": facts["fork_refused"],
        "memory_limit": facts["allocation_refused"],
        "private_filesystem": not facts["marker_visible"],
        "clean_environment": set(facts["environment"]) <= {"PATH", "HOME", "TMPDIR", "LANG"},
    }


# ----------------------------------------------------------------------------- host side

_run_numbers = itertools.count()


def _throwaway_uid() -> int:
    """A uid no other live run uses: this process's pid and a run counter, offset above real users."""
    return UID_BASE + (os.getpid() % 2**14) * 2**16 + next(_run_numbers) % 2**16


def _run(system: dict, program: str, tests: list[dict], time_limit: float, preload: str | None = None):
    uid = _throwaway_uid() if system["root"] else None
    inputs = [test.get("input", "").encode() for test in tests]
    job = {"program": program, "preload": preload, "time_limit": time_limit, "uid": uid, "jail": system["jail"],
           "tests": [{"call": t["call"]} if "call" in t else {"input_length": len(i)} for t, i in zip(tests, inputs)],
           "binds": _python_dirs(), "memory_mb": MEMORY_MB, "max_processes": MAX_PROCESSES,
           "max_open_files": MAX_OPEN_FILES, "output_limit": OUTPUT_LIMIT, "scratch_mb": SCRATCH_MB,
           "scratch_files": SCRATCH_FILES, "shared_memory_mb": SHARED_MEMORY_MB}
    with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as result_file, \
            tempfile.TemporaryDirectory() as host_workdir:
        # The inputs follow the job, unread by the driver until it copies each one straight into its own test's
        # stdin: a test's process, a fork of the driver, finds no other test's input in its memory.
        header = marshal.dumps(job, 4)  # format 4: read alike by every Python 3.4+ the sandbox may use
        job_file.write(b"%d\n" % len(header) + header + b"".join(inputs))
        job_file.seek(0)
        workdir = "/tmp" if system["jail"] else host_workdir  # in the jail, /tmp is its private tmpfs
        if uid is not None and not system["jail"]:
            os.chown(host_workdir, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        process = subprocess.Popen(system["command"], stdin=job_file, stdout=result_file, stderr=subprocess.DEVNULL,
                                   cwd=host_workdir, env=env, start_new_session=True)
        try:
            process.wait(timeout=STARTUP_SECONDS * (1 + (preload is not None)) + len(tests) * (time_limit + 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # in the jail, the kernel then kills all the rest
            process.wait()
        if process.returncode != 0 and uid is not None and not system["jail"]:
            _kill_user(uid)  # no PID namespace to take leftovers down with the driver: find them by uid
        result_file.seek(0)
        raw = result_file.read((OUTPUT_LIMIT + 64) * len(tests) + 4096)
    if process.returncode == PRELOAD_FAILED and raw.startswith(b"preload "):
        raise RuntimeError(f"the sandbox's preload failed: {raw[len(b'preload '):].decode(errors='replace')}")
    return _parse_results(raw, len(tests)) if process.returncode == 0 else None


PRELOAD_FAILED = 3  # the driver's exit status when the preload raised; its stdout then says what


def _python_dirs() -> list[str]:
    """This interpreter's installs and site-packages outside /usr: bound read-only into the jail. (The driver's
    `python -S` does not read a venv's pyvenv.cfg, so its sys.prefix would miss the venv: name them here.)"""
    paths = sysconfig.get_paths()
    dirs = {os.path.abspath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, paths["purelib"],
                                          paths["platlib"]] if os.path.isdir(p)}
    outside = sorted(d for d in dirs if not (d + "/").startswith("/usr/"))
    return [d for d in outside if not any(d.startswith(other + "/") for other in outside)]  # one bind per tree


def _parse_results(raw: bytes, count: int) -> list[dict] | None:
    """The driver's "KIND NUMBER LENGTH\\n" + LENGTH bytes per test -> [{"status", "output"}], None if malformed."""
    results, position = [], 0
    for _ in range(count):
        header_end = raw.find(b"\n", position)
        try:
            kind, number, length = raw[position:header_end].decode().split(" ")
            number, length = int(number), int(length)
        except ValueError:
            return None
        output = raw[header_end + 1: header_end + 1 + length]
        if header_end < 0 or len(output) != length or kind not in ("exit", "signal", "timeout"):
            return None
        if kind == "timeout":
            status = "timeout"
        elif kind == "signal":
            status = f"killed by {signal.Signals(number).name}" if number in signal.valid_signals() else f"killed by {number}"
        else:
            status = "ok" if number == 0 else f"exit code {number}"
        results.append({"status": status, "output": output.decode("utf-8", "replace")})
        position = header_end + 1 + length
    return results if position == len(raw) else None


def _kill_user(uid: int) -> None:
    """SIGKILL every process of `uid`, until none is left (a fork bomb may race the first sweeps)."""
    for _ in range(100):
        found = False
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not found:
            return


@functools.cache
def _system(allow_jail: bool = True) -> dict:
    """How this machine can sandbox: the strongest mode that really runs, worked out once per process.

    Tries the namespaced jail first (unless `allow_jail` is False: tests use that to check the fallback),
    then plain processes; with the running interpreter first, then the system's python3 (an interpreter
    under /root, e.g. pyenv's, is unreadable to the throw-away user when there is no jail to bind it into).
    """
    root = os.geteuid() == 0
    unshare = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    if not root:
        unshare += ["--user", "--map-root-user"]
    pythons = [sys.executable] + [p for p in [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")] if p]
    for jail in ([True] if allow_jail and shutil.which("unshare") else []) + [False]:
        for python in pythons:
            system = {"root": root, "jail": jail,
                      "command": (unshare if jail else []) + [python, "-I", "-S", "-c", _DRIVER_SOURCE]}
            if _run(system, _STARTUP_CHECK, [{"input": ""}], time_limit=10) == [{"status": "ok", "output": "ok\n"}]:
                if not jail:
                    warnings.warn("sandbox: Linux namespaces are unavailable (unshare failed), so sandboxed programs "
                                  "can reach the network and read this machine's files" +
                                  ("" if root else ", and they run as your own user"), stacklevel=3)
                return system
    raise RuntimeError("the code sandbox cannot start Python on this machine (tried "
                       f"{', '.join(pythons)}, with and without namespaces).")


_STARTUP_CHECK = "import decimal, fractions, heapq, json\nprint('ok')\n"  # stdlib, C extensions included

# The probe: facts about what a program inside can do, each found without harming anything (the forks it
# tries are bounded and killed, the allocation fails or is freed, the connection goes to our own listener).
_PROBE = """
import json, os, socket, sys, time
given = json.loads(sys.stdin.read())
facts = {"uid": os.getuid(), "pid": os.getpid(), "sid": os.getsid(0), "parent_pid": os.getppid(), "environment": sorted(os.environ),
         "marker_visible": os.path.exists(given["marker"])}
try:
    socket.create_connection(("127.0.0.1", given["port"]), timeout=2).close()
    facts["network"] = True
except OSError:
    facts["network"] = False
if given["host_pid"] not in (os.getpid(), os.getppid()):  # those two are plainly ours, never the host's
    try:
        os.kill(given["host_pid"], 15)
    except OSError:
        pass
children, facts["fork_refused"] = [], False
for _ in range(given["forks"]):
    try:
        pid = os.fork()
    except OSError:
        facts["fork_refused"] = True
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
try:
    bytearray(given["allocate"])
    facts["allocation_refused"] = False
except MemoryError:
    facts["allocation_refused"] = True
print(json.dumps(facts))
"""


# ----------------------------------------------------------------------------- inside the sandbox

def _sandbox_main() -> None:
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

    # 1. Limits for every process started from here on (root sets them; they hold after the uid change).
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
        become_program_user()
        os.setsid()  # a session and group of its own: no terminal, and a timeout kills the whole group at once
        cpu_seconds = max(1, math.ceil(job["time_limit"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU, then SIGKILL
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
        the caller may signal: in the jail, the driver (PID 1) reaches just the jail; outside, a helper of the
        program's uid reaches just that uid."""
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
        while True:  # reap them (as PID 1 we inherit the orphans), and the helper
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
        pidfd = os.pidfd_open(pid)
        finished = bool(select.select([pidfd], [], [], job["time_limit"])[0])
        os.close(pidfd)
        if not finished:
            for kill, target in [(os.killpg, pid), (os.kill, pid)]:  # the group, or the child not yet its leader
                try:
                    kill(target, sigkill)
                except ProcessLookupError:
                    pass
        _, wait_status = os.waitpid(pid, 0)
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

    for test in job["tests"]:
        sys.stdout.buffer.write(run_test(test, input_offset))
        sys.stdout.buffer.flush()
        input_offset += test.get("input_length", 0)


_DRIVER_SOURCE = textwrap.dedent(inspect.getsource(_sandbox_main)) + "\n_sandbox_main()\n"
