"""A sandbox for model-written Python: run a program on test inputs; nothing it does gets out.

    sandbox.run_tests(program, [{"input": "1 2\\n"}, {"call": "add(1, 2)"}])
      -> [{"status": "ok", "output": "3\\n"}, {"status": "ok", "output": "\\n3\\n"}]   (None if the sandbox failed)

One run = one fresh sandbox. A small driver (jail.py, shipped in by source) starts there as root inside
new Linux namespaces, walls itself in, and forks one child per test; each child becomes a throw-away user
before it runs the program. The verdict is not the sandbox's: the expected outputs never enter it, rewards.py
compares outputs outside, so a program passes a test only by printing the right answer.

Protections, and where each comes from:
  per run   its own network namespace: no interface but a downed loopback, so no network at all
            its own PID namespace: sees and can signal only its own processes; when the driver's
            keeper (PID 1 there) ends, the kernel kills everything left inside
            its own mount namespace and root: read-only /usr (and the interpreter's installs and
            site-packages), a private /tmp capped in size and files as working directory,
            /dev/{null,zero,urandom}, its own /proc; no host file (your data, its expected outputs) is
            visible, nothing outside is writable
            its own IPC namespace: SHARED_MEMORY_MB of System V shared memory, no message queues; gone
            with the run; and its own session keyring: the trainer's keys are out of reach
            a throw-away uid no earlier run had (a counter across processes), no groups, no
            capabilities, no_new_privs: it can touch nothing of yours, RLIMIT_NPROC, which counts per
            uid, holds each run to its own budget, and the uid's keyrings are invalidated at the end
            a system-call filter (confinement.py, seccomp): no socket but AF_UNIX, no keys, ptrace,
            io_uring, bpf, mounts or namespaces (EPERM); without libseccomp, no sandbox (an error)
            a driver of another uid (as root: root with only CAP_KILL/SETUID/SETGID, not dumpable):
            the program can neither signal it, re-limit it (prlimit) nor read its memory or files
            a clean environment (PATH, HOME, TMPDIR, LANG only)
            RLIMIT_AS (memory) x RLIMIT_NPROC (processes) and the caps on files, scratch and shared
            memory: RUN_MEMORY_MB in all; a memory cgroup holds the run to it, kernel memory (socket
            buffers) included, where one can be made (else a start-up warning); RLIMIT_NOFILE, no core
            dumps; oom_score_adj 1000 (the driver 500): under memory pressure the sandbox goes first
  per test  its own process, forked from the driver, holding only its own input (the inputs go from
            the job file straight into each test's stdin, never through the driver's memory)
            its own session and process group (setsid): no controlling terminal
            CPU-time limit, its own (ITIMER_PROF, RLIMIT_CPU behind it: a neighbour's hog cannot fail
            it), a wall-clock backstop WALL_FACTOR times as long (the driver kills the test's process
            group, then every process left in the sandbox), output cap (RLIMIT_FSIZE on its stdout)

Where the system refuses some of this, the sandbox says so once (a warning) and runs with what it has:
  - `unshare` refused (e.g. a container without CAP_SYS_ADMIN): no namespaces, so the program can
    reach the network, see the machine's files and use its System V IPC; as root it still runs as a
    throw-away uid with every limit above, and leftovers are killed by uid.
  - not root: the namespaces come from a user namespace (`unshare --user`), capabilities are dropped
    after the walls go up, and the program shares the driver's one mapped uid: as PID 1 the driver
    ignores its signals, but it could re-limit the driver and so fail the run (never forge a result);
    without user namespaces the program runs as you, with the limits only.
`protections()` proves which protections hold by running a harmless probe program in the sandbox.
"""

import fcntl
import functools
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
import warnings

import confinement
import jail

DEFAULT_TIME_LIMIT = 2.0   # seconds of CPU time per test, the program's own
WALL_FACTOR = 4            # ... and a wall-clock backstop this many times as long (a sleeper, a starved test)
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
UID_COUNT = 2**30 - 1      # ... up to 2**31 - 2, one per run, from a counter kept across processes in a root-only file
UID_COUNTER_FILE = "/var/lib/prorl/sandbox-uids"


def run_tests(program: str, tests: list[dict], time_limit: float = DEFAULT_TIME_LIMIT,
              preload: str | None = None, memory_mb: int | None = None) -> list[dict] | None:
    """Run `program` once per test, each test {"input": stdin text} or {"call": a Python expression}.

    stdin tests run the program as __main__ with the input on stdin; call tests run it as a module,
    then print repr(value of the call) on a line of its own, last. Returns one {"status", "output"}
    per test: status "ok", "exit code N", "killed by SIGNAME" or "timeout"; output is stdout, at most
    OUTPUT_LIMIT bytes. None when the sandbox itself failed (its driver killed, or out of time).
    `preload`, trusted code only, runs once in the driver before the tests (say, a slow import); each test's
    program starts from a copy of its globals. A preload that raises is a RuntimeError naming the error.
    `memory_mb` (a problem's own limit) lowers each process's address space below MEMORY_MB, never raises it.
    """
    memory_mb = MEMORY_MB if memory_mb is None else max(1, min(int(memory_mb), MEMORY_MB))
    return _run(_system(), program, tests, time_limit, preload, memory_mb)


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
        "own_session": facts["sid"] == facts["pid"],           # a session leader (sids don't compare across namespaces)
        "no_network": not facts["network"],
        "cannot_signal_host": not host_signalled,
        # the driver is PID 1, or 2 under its keeper (jail.py): a namespace of its own
        "own_pid_namespace": facts["parent_pid"] in (1, 2),
        "process_limit": facts["fork_refused"],
        "memory_limit": facts["allocation_refused"],
        "private_filesystem": not facts["marker_visible"],
        "clean_environment": set(facts["environment"]) <= {"PATH", "HOME", "TMPDIR", "LANG"},
    }


# ----------------------------------------------------------------------------- host side

_run_numbers = itertools.count()


def _throwaway_uid() -> int:
    """A uid no earlier run on this machine had: the next value of a counter in a root-only file, taken under a
    lock (so across processes too). It wraps after UID_COUNT runs; by then every run's keyrings went with it."""
    os.makedirs(os.path.dirname(UID_COUNTER_FILE), mode=0o700, exist_ok=True)
    counter = os.open(UID_COUNTER_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(counter, fcntl.LOCK_EX)
        text = os.pread(counter, 32, 0).strip()
        number = int(text) % UID_COUNT if text.isdigit() else 0
        os.pwrite(counter, b"%-20d\n" % (number + 1), 0)  # fixed width: no stale digits left behind
    finally:
        os.close(counter)  # and the lock with it
    return UID_BASE + number


def _run(system: dict, program: str, tests: list[dict], time_limit: float, preload: str | None = None,
         memory_mb: int = MEMORY_MB):
    uid = _throwaway_uid() if system["root"] else None
    inputs = [test.get("input", "").encode() for test in tests]
    cgroup = confinement.make_cgroup(system["cgroup"], RUN_MEMORY_MB) if system.get("cgroup") else None
    job = {"program": program, "preload": preload, "time_limit": time_limit, "uid": uid, "jail": system["jail"],
           "wall_limit": WALL_FACTOR * time_limit, "seccomp": confinement.syscall_filter(),
           "cgroup": cgroup and os.path.join(cgroup, "cgroup.procs"),
           "tests": [{"call": t["call"]} if "call" in t else {"input_length": len(i)} for t, i in zip(tests, inputs)],
           "binds": _python_dirs(), "memory_mb": memory_mb, "max_processes": MAX_PROCESSES,
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
            process.wait(timeout=STARTUP_SECONDS * (1 + (preload is not None)) + len(tests) * (job["wall_limit"] + 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # in the jail, the kernel then kills all the rest
            process.wait()
        if process.returncode != 0 and uid is not None and not system["jail"]:
            _kill_user(uid)  # no PID namespace to take leftovers down with the driver: find them by uid
        if cgroup:
            confinement.remove_cgroup(cgroup)
        if process.returncode != 0 and uid is not None:
            _forget_keys(uid)  # the driver did not get to it
        result_file.seek(0)
        raw = result_file.read((OUTPUT_LIMIT + 64) * len(tests) + 4096)
    if process.returncode == PRELOAD_FAILED and raw.startswith(b"preload "):
        raise RuntimeError(f"the sandbox's preload failed: {raw[len(b'preload '):].decode(errors='replace')}")
    return _parse_results(raw, len(tests)) if process.returncode == 0 else None


PRELOAD_FAILED = 3  # the driver's exit status when the preload raised; its stdout then says what


@functools.cache
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
            name = signal.Signals(number).name if number in signal.valid_signals() else number
            status = f"killed by {name}"
        else:
            status = "ok" if number == 0 else f"exit code {number}"
        results.append({"status": status, "output": output.decode("utf-8", "replace")})
        position = header_end + 1 + length
    return results if position == len(raw) else None


def _forget_keys(uid: int) -> None:
    """What the driver does at the end of a run, for a run whose driver did not get there: invalidate the uid's
    user keyrings, as that uid (no_new_privs, no groups)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable  # readable by uid
    subprocess.run([python, "-I", "-S", "-c", jail.FORGET_KEYS_PROGRAM], user=uid, group=uid, extra_groups=[],
                   check=False, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
    confinement.syscall_filter()  # no libseccomp: a one-line error naming the fix, never a sandbox without the filter
    cgroup = confinement.cgroup_parent()  # root, or a delegated cgroup v2 subtree
    unshare = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    if not root:
        unshare += ["--user", "--map-root-user"]
    pythons = [sys.executable] + [p for p in [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")] if p]
    modes = itertools.product(([True] if allow_jail and shutil.which("unshare") else []) + [False], pythons,
                              [cgroup, None] if cgroup else [None])  # a cgroup the driver cannot join: none
    for jailed, python, run_cgroup in modes:
        system = {"root": root, "jail": jailed, "cgroup": run_cgroup,
                  "command": (unshare if jailed else []) + [python, "-I", "-S", "-c", jail.DRIVER_SOURCE]}
        if _run(system, _STARTUP_CHECK, [{"input": ""}], time_limit=10) == [{"status": "ok", "output": "ok\n"}]:
            if not jailed:
                warnings.warn("sandbox: Linux namespaces are unavailable (unshare failed), so sandboxed programs "
                              "can reach the network, read this machine's files and use its System V IPC" +
                              ("" if root else ", and they run as your own user"), stacklevel=3)
            if run_cgroup is None:
                warnings.warn("sandbox: no memory cgroup can be made here (it needs root, or a delegated cgroup "
                              "v2 subtree with the memory controller), so rlimits bound each run's memory; "
                              "kernel memory (socket buffers, descriptors in flight) is not bounded", stacklevel=3)
            return system
    raise RuntimeError("the code sandbox cannot start Python on this machine (tried "
                       f"{', '.join(pythons)}, with and without namespaces).")


_STARTUP_CHECK = "import decimal, fractions, heapq, json\nprint('ok')\n"  # stdlib, C extensions included

# The probe: facts about what a program inside can do, each found without harming anything (the forks it
# tries are bounded and killed, the allocation fails or is freed, the connection goes to our own listener).
_PROBE = """
import json, os, socket, sys, time
given = json.loads(sys.stdin.read())
facts = {"uid": os.getuid(), "pid": os.getpid(), "sid": os.getsid(0), "parent_pid": os.getppid(),
         "environment": sorted(os.environ), "marker_visible": os.path.exists(given["marker"])}
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
