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
import tempfile
import textwrap
import warnings

DEFAULT_TIME_LIMIT = 2.0   # seconds of wall-clock time per test; the CPU-time limit is this, rounded up
MEMORY_MB = 1024           # address space of each process in the sandbox (RLIMIT_AS)
MAX_PROCESSES = 32         # processes and threads of the throw-away user (RLIMIT_NPROC)
MAX_OPEN_FILES = 64        # RLIMIT_NOFILE
OUTPUT_LIMIT = 2**20       # bytes of stdout kept per test; writing past it fails (RLIMIT_FSIZE)
SCRATCH_MB = 16            # size of the private /tmp, the program's working directory
STARTUP_SECONDS = 10.0     # allowance for starting the sandbox on a busy machine, on top of the tests' limits
UID_BASE = 2**30           # throw-away uids live far above any real user's (1000+) and container ranges (100000+)


def run_tests(program: str, tests: list[dict], time_limit: float = DEFAULT_TIME_LIMIT) -> list[dict] | None:
    """Run `program` once per test, each test {"input": stdin text} or {"call": a Python expression}.

    stdin tests run the program as __main__ with the input on stdin; call tests run it as a module,
    then print repr(value of the call) on a line of its own, last. Returns one {"status", "output"}
    per test: status "ok", "exit code N", "killed by SIGNAME" or "timeout"; output is stdout, at most
    OUTPUT_LIMIT bytes. None when the sandbox itself failed (its driver killed, or out of time).
    """
    return _run(_system(), program, tests, time_limit)


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


def _run(system: dict, program: str, tests: list[dict], time_limit: float) -> list[dict] | None:
    uid = _throwaway_uid() if system["root"] else None
    job = {"program": program, "tests": tests, "time_limit": time_limit, "uid": uid, "jail": system["jail"],
           "kill_all": system["jail"] or uid is not None,  # kill(-1) reaches only the sandbox's own processes
           "memory_mb": MEMORY_MB, "max_processes": MAX_PROCESSES, "max_open_files": MAX_OPEN_FILES,
           "output_limit": OUTPUT_LIMIT, "scratch_mb": SCRATCH_MB}
    with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as result_file, \
            tempfile.TemporaryDirectory() as host_workdir:
        job_file.write(marshal.dumps(job, 4))  # format 4: read alike by every Python 3.4+ the sandbox may use
        job_file.seek(0)
        workdir = "/tmp" if system["jail"] else host_workdir  # in the jail, /tmp is its private tmpfs
        if uid is not None and not system["jail"]:
            os.chown(host_workdir, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        process = subprocess.Popen(system["command"], stdin=job_file, stdout=result_file, stderr=subprocess.DEVNULL,
                                   cwd=host_workdir, env=env, start_new_session=True)
        try:
            process.wait(timeout=STARTUP_SECONDS + len(tests) * (time_limit + 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # in the jail, the kernel then kills all the rest
            process.wait()
        if process.returncode != 0 and uid is not None and not system["jail"]:
            _kill_user(uid)  # no PID namespace to take leftovers down with the driver: find them by uid
        result_file.seek(0)
        raw = result_file.read((OUTPUT_LIMIT + 64) * len(tests))
    return _parse_results(raw, len(tests)) if process.returncode == 0 else None


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
    job = marshal.loads(sys.stdin.buffer.read())
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
                         (resource.RLIMIT_NOFILE, job["max_open_files"]), (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(limit, (value, value))

    # 2. The jail: a new root on a tmpfs (in our own mount namespace, so the host sees none of it) holding
    #    read-only /usr and the interpreter's own install, a private /tmp, two devices and our own /proc.
    if job["jail"]:
        ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec = 1, 2, 4, 8, 32, 4096, 16384
        root = "/tmp"  # any existing directory will do as the mount point; the tmpfs hides the host's /tmp here

        def bind(path: str, flags: int) -> None:
            mount(path, root + path, None, ms_bind | ms_rec)
            mount(None, root + path, None, ms_remount | ms_bind | flags)  # bind mounts take flags on remount

        mount("tmpfs", root, "tmpfs", ms_nosuid, f"size={job['scratch_mb']}m,mode=755")
        for path in ["/usr"] + [p for p in {sys.base_prefix, sys.prefix} if not p.startswith("/usr/")]:
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
        os.mkdir(root + "/tmp")
        os.chmod(root + "/tmp", 0o1777)
        os.chroot(root)
        os.chdir("/tmp")

    # 3. Become nobody in particular: a throw-away uid, no groups, no capabilities, and no way back up
    #    (no_new_privs: setuid binaries and file capabilities grant nothing).
    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    no_capabilities = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x two 32-bit words: all zero
    check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), no_capabilities), "capset")  # _LINUX_CAPABILITY_VERSION_3
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    devnull = os.open("/dev/null", os.O_WRONLY)

    def run_program(test: dict, stdin_file, stdout_file) -> int:
        """In the forked child: limits, redirections, then the program. Returns the exit status."""
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
        namespace = {"__name__": "solution" if "call" in test else "__main__"}
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

    def run_test(test: dict) -> bytes:
        stdin_file = os.fdopen(os.memfd_create("stdin"), "w+b")  # in-memory files: nothing on any disk
        stdout_file = os.fdopen(os.memfd_create("stdout"), "w+b")
        stdin_file.write(test.get("input", "").encode())
        stdin_file.seek(0)
        pid = os.fork()
        if pid == 0:  # the child never returns into this loop, whatever the program does
            status = 1
            try:
                status = run_program(test, stdin_file, stdout_file)
            finally:
                os._exit(status & 0xFF)
        pidfd = os.pidfd_open(pid)
        finished = bool(select.select([pidfd], [], [], job["time_limit"])[0])
        os.close(pidfd)
        if not finished:
            try:
                os.killpg(pid, sigkill)
            except ProcessLookupError:
                pass
        _, wait_status = os.waitpid(pid, 0)
        if job["kill_all"]:  # whatever the test left behind (say, a daemon that left its group) goes too
            try:
                os.kill(-1, sigkill)
            except ProcessLookupError:
                pass
            while True:  # as PID 1 we inherit the orphans: reap them
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break
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
        sys.stdout.buffer.write(run_test(test))
    sys.stdout.buffer.flush()


_DRIVER_SOURCE = textwrap.dedent(inspect.getsource(_sandbox_main)) + "\n_sandbox_main()\n"
