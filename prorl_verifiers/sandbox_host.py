"""The host's side of the sandbox for model-written Python: build each run's jail, ship the driver
(jailed_driver.py) in, read its verdicts. Nothing the program does gets out.

    sandbox_host.run_tests(program, [{"input": "1 2\\n"}, {"call": "add(1, 2)"}])
      -> [{"status": "ok", "output": "3\\n"}, {"status": "ok", "output": "\\n3\\n"}]
         (None if the sandbox failed)

One run = one fresh sandbox. The driver starts there as root inside new Linux namespaces, walls
itself in, and forks one child per test; each child becomes a throw-away user before it runs the
program. As root, each run's driver is forked by a zygote (zygote.py, one per worker, started once:
the interpreter's start was most of a short run's cost), else started by `unshare`. The verdict
is not the sandbox's: the expected outputs never enter it, rewards.py compares outputs outside, so a
program passes a test only by printing the right answer.

Protections, and where each comes from:
  per run   its own network namespace: no interface but a downed loopback, so no network at all
            its own PID namespace: sees and can signal only its own processes; when the driver's
            keeper (PID 1 there) ends, the kernel kills everything left inside
            its own mount namespace and root: read-only /usr (and the interpreter's installs and
            site-packages), a private /tmp capped in size and files as working directory,
            /dev/{null,zero,urandom}, its own /proc; no host file (your data, its expected
            outputs) is visible, nothing outside is writable
            its own IPC namespace: SHARED_MEMORY_MB of System V shared memory, no message queues;
            gone with the run; and its own session keyring: the trainer's keys are out of reach
            a throw-away uid no earlier run had (a counter across processes), no groups, no
            capabilities, no_new_privs: it can touch nothing of yours, RLIMIT_NPROC, which counts
            per uid, holds each run to its own budget, and the uid's keyrings are invalidated at
            the end
            a system-call filter (confinement.py, seccomp): no socket but AF_UNIX, no keys, ptrace,
            io_uring, bpf, mounts or namespaces (EPERM); without libseccomp, no sandbox (an error)
            a driver of another uid (as root: root with only CAP_KILL/SETUID/SETGID, not dumpable):
            the program can neither signal it, re-limit it (prlimit) nor read its memory or files
            a clean environment (PATH, HOME, TMPDIR, LANG only)
            RLIMIT_AS (memory) x RLIMIT_NPROC (processes) and the caps on files, scratch and shared
            memory: RUN_MEMORY_MB in all; a memory cgroup holds the run to it, kernel memory
            (socket buffers) included, where one can be made (else a start-up warning);
            RLIMIT_NOFILE, no core dumps; oom_score_adj 1000 (the driver 500): under memory
            pressure the sandbox goes first
  per test  its own process, forked from the driver, holding only its own input (the inputs go
            from the job file straight into each test's stdin, never through the driver's memory)
            its own session and process group (setsid): no controlling terminal
            CPU-time limit, its own (ITIMER_PROF, RLIMIT_CPU behind it: a neighbour's hog cannot
            fail it), a wall-clock backstop WALL_FACTOR times as long (the driver kills the test's
            process group, then every process left in the sandbox), output cap (RLIMIT_FSIZE on
            its stdout)

Where the system refuses some of this, the sandbox says so once (a warning) and runs with what it
has:
  - `unshare` refused (e.g. a container without CAP_SYS_ADMIN): no namespaces, so the program can
    reach the network, see the machine's files and use its System V IPC; as root it still runs as a
    throw-away uid with every limit above, and leftovers are killed by uid.
  - not root: the namespaces come from a user namespace (`unshare --user`), capabilities are
    dropped after the walls go up, and the program shares the driver's one mapped uid: as PID 1 the
    driver ignores its signals, but it could re-limit the driver and so fail the run (never forge a
    result); without user namespaces the program runs as you, with the limits only.
sandbox_probe.protections() proves which protections hold, with a harmless probe program.
"""

import fcntl
import functools
import itertools
import marshal
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from prorl_verifiers import confinement

# seconds of CPU time per test, the program's own
DEFAULT_TIME_LIMIT = 2.0
# ... and a wall-clock backstop this many times as long (a sleeper, a starved test)
WALL_FACTOR = 4
# address space of each process in the sandbox (RLIMIT_AS)
MEMORY_MB = 512
# processes and threads of the throw-away user (RLIMIT_NPROC)
MAX_PROCESSES = 8
# RLIMIT_NOFILE
MAX_OPEN_FILES = 64
# bytes of stdout kept per test; writing past it, or any file past it, fails (RLIMIT_FSIZE)
OUTPUT_LIMIT = 2**20
# size of the private /tmp, the program's working directory ...
SCRATCH_MB = 16
# ... and how many files it may hold (inodes)
SCRATCH_FILES = 1024
# System V shared memory of the run's own IPC namespace, all segments together
SHARED_MEMORY_MB = 16
# The most one run's processes can hold together: each process its address space and a capped file
# (memfd, pipe) per descriptor; then the scratch disk and shared memory, which belong to the run,
# not to a process.
PROCESS_MEMORY_MB = MEMORY_MB + MAX_OPEN_FILES * OUTPUT_LIMIT // 2**20
RUN_MEMORY_MB = MAX_PROCESSES * PROCESS_MEMORY_MB + SCRATCH_MB + SHARED_MEMORY_MB
# allowance for starting the sandbox on a busy machine, on top of the tests' limits
STARTUP_SECONDS = 10.0
# throw-away uids live far above any real user's (1000+) and container ranges (100000+)
UID_BASE = 2**30
# ... up to 2**31 - 2, one per run, from a counter kept across processes in a root-only file
UID_COUNT = 2**30 - 1
UID_COUNTER_FILE = "/var/lib/prorl/sandbox-uids"
# The driver goes in as its module's text: it runs as `python -I -S -c DRIVER_SOURCE`, importing
# nothing of ours (nothing of ours is importable inside the jail). Read, not imported: its
# module-level code is the jail's (keyctl's number for this machine), not the trainer's.
DRIVER_SOURCE = pathlib.Path(__file__).with_name("jailed_driver.py").read_text(encoding="utf-8")
ZYGOTE_SOURCE = pathlib.Path(__file__).with_name("zygote.py").read_text(encoding="utf-8")
# the driver's exit status when the preload raised (jailed_driver.PRELOAD_FAILED)
PRELOAD_FAILED = 3
CLEAN_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def run_tests(program: str, tests: list[dict], time_limit: float = DEFAULT_TIME_LIMIT,
              preload: str | None = None, memory_mb: int | None = None) -> list[dict] | None:
    """Run `program` once per test, each test {"input": stdin text} or {"call": a Python
    expression}.

    stdin tests run the program as __main__ with the input on stdin; call tests run it as a module,
    then print repr(value of the call) on a line of its own, last. Returns one {"status", "output"}
    per test: status "ok", "exit code N", "killed by SIGNAME" or "timeout"; output is stdout, at
    most OUTPUT_LIMIT bytes. None when the sandbox itself failed (its driver killed, or out of
    time). `preload`, trusted code only, runs once in the driver before the tests (say, a slow
    import); each test's program starts from a copy of its globals. A preload that raises is a
    RuntimeError naming the error. `memory_mb` (a problem's own limit) lowers each process's address
    space below MEMORY_MB, never raises it.
    """
    memory_mb = MEMORY_MB if memory_mb is None else max(1, min(int(memory_mb), MEMORY_MB))
    return _run(_system(), program, tests, time_limit, preload, memory_mb)


# ----------------------------------------------------------------------------- host side

def _throwaway_uid() -> int:
    """A uid no earlier run on this machine had: the next value of a counter in a root-only file,
    taken under a lock (so across processes too). It wraps after UID_COUNT runs; by then every run's
    keyrings went with it."""
    os.makedirs(os.path.dirname(UID_COUNTER_FILE), mode=0o700, exist_ok=True)
    counter = os.open(UID_COUNTER_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(counter, fcntl.LOCK_EX)
        text = os.pread(counter, 32, 0).strip()
        number = int(text) % UID_COUNT if text.isdigit() else 0
        # fixed width: no stale digits left behind
        os.pwrite(counter, b"%-20d\n" % (number + 1), 0)
    finally:
        # and the lock with it
        os.close(counter)
    return UID_BASE + number


def _run(system: dict, program: str, tests: list[dict], time_limit: float,
         preload: str | None = None, memory_mb: int = MEMORY_MB):
    """One sandbox run: the job goes in on stdin, the verdicts come back on stdout; None if the
    driver did not finish cleanly."""
    uid = _throwaway_uid() if system["root"] else None
    inputs = [test.get("input", "").encode() for test in tests]
    cgroup = system.get("cgroup") and confinement.make_cgroup(system["cgroup"], RUN_MEMORY_MB)
    job = _job(system, program, tests, inputs, time_limit, uid)
    job.update(preload=preload, memory_mb=memory_mb,
               cgroup=cgroup and os.path.join(cgroup, "cgroup.procs"))
    with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as result_file:
        # The inputs follow the job, unread by the driver until it copies each one straight into its
        # own test's stdin: a test's process, a fork of the driver, finds no other test's input in
        # its memory. Marshal format 4: read alike by every Python 3.4+ the sandbox may use.
        header = marshal.dumps(job, 4)
        job_file.write(b"%d\n" % len(header) + header + b"".join(inputs))
        job_file.seek(0)
        startup = STARTUP_SECONDS * (1 + (preload is not None))
        timeout = startup + len(tests) * (job["wall_limit"] + 1)
        returncode = _drive(system, uid, job_file, result_file, timeout)
        if cgroup:
            confinement.remove_cgroup(cgroup)
        if returncode != 0 and uid is not None:
            # the driver did not get to it
            _forget_keys(uid)
        result_file.seek(0)
        raw = result_file.read((OUTPUT_LIMIT + 64) * len(tests) + 4096)
    if returncode == PRELOAD_FAILED and raw.startswith(b"preload "):
        error = raw[len(b"preload "):].decode(errors="replace")
        raise RuntimeError(f"the sandbox's preload failed: {error}")
    return _parse_results(raw, len(tests)) if returncode == 0 else None


def _job(system: dict, program: str, tests: list[dict], inputs: list[bytes], time_limit: float,
         uid: int | None) -> dict:
    """What the driver reads first: the program, the limits, the walls to build; each test's call,
    or the length of its input (the inputs follow the job in the same file)."""
    return {"program": program, "time_limit": time_limit, "uid": uid, "jail": system["jail"],
            "wall_limit": WALL_FACTOR * time_limit, "seccomp": confinement.syscall_filter(),
            "tests": [{"call": test["call"]} if "call" in test else {"input_length": len(text)}
                      for test, text in zip(tests, inputs)],
            "binds": _python_dirs(), "max_processes": MAX_PROCESSES,
            "max_open_files": MAX_OPEN_FILES, "output_limit": OUTPUT_LIMIT,
            "scratch_mb": SCRATCH_MB, "scratch_files": SCRATCH_FILES,
            "shared_memory_mb": SHARED_MEMORY_MB}


def _drive(system: dict, uid: int | None, job_file, result_file, timeout: float) -> int:
    """Start the driver on the job, wait for it at most `timeout` seconds; its exit status."""
    if system.get("zygote"):
        return _drive_by_zygote(system, job_file, result_file, timeout)
    with tempfile.TemporaryDirectory() as host_workdir:
        # in the jail, /tmp is its private tmpfs
        workdir = "/tmp" if system["jail"] else host_workdir
        if uid is not None and not system["jail"]:
            os.chown(host_workdir, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        process = subprocess.Popen(system["command"], stdin=job_file, stdout=result_file,
                                   stderr=subprocess.DEVNULL, cwd=host_workdir, env=env,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # in the jail, the kernel then kills all the rest
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.returncode != 0 and uid is not None and not system["jail"]:
            # no PID namespace to take leftovers down with the driver: find them by uid
            _kill_user(uid)
    return process.returncode


# Zygotes waiting for a run (prorl_verifiers/zygote.py), by command: one per worker that runs at
# once.
_idle_zygotes: dict[tuple, queue.SimpleQueue] = {}


def _drive_by_zygote(system: dict, job_file, result_file, timeout: float) -> int:
    """The run forked by an idle zygote (or a new one); its exit status. A zygote that fails to
    answer is killed, and the run fails."""
    idle = _idle_zygotes.setdefault(tuple(system["zygote"]), queue.SimpleQueue())
    while True:
        try:
            process, host = idle.get_nowait()
        except queue.Empty:
            process, host = _start_zygote(system)
        if process.poll() is None:
            break
        # one that died while idle: the run has not started, so the next zygote takes it
        host.close()
    try:
        message = b"%f" % timeout
        socket.send_fds(host, [message], [job_file.fileno(), result_file.fileno()])
        host.settimeout(timeout + STARTUP_SECONDS)
        status = int(host.recv(32))
    except (OSError, ValueError):
        process.kill()
        process.wait()
        host.close()
        return -signal.SIGKILL
    idle.put((process, host))
    return status


def _start_zygote(system: dict) -> tuple[subprocess.Popen, socket.socket]:
    host, inside = socket.socketpair()
    process = subprocess.Popen(system["zygote"], stdin=inside, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd="/", env=CLEAN_ENVIRONMENT,
                               start_new_session=True)
    inside.close()
    return process, host


@functools.cache
def _python_dirs() -> list[str]:
    """This interpreter's installs and site-packages outside /usr: bound read-only into the jail.
    (The driver's `python -S` does not read a venv's pyvenv.cfg, so its sys.prefix would miss the
    venv: name them here.)"""
    paths = sysconfig.get_paths()
    places = [sys.prefix, sys.base_prefix, sys.exec_prefix, paths["purelib"], paths["platlib"]]
    dirs = {os.path.abspath(p) for p in places if os.path.isdir(p)}
    outside = sorted(d for d in dirs if not (d + "/").startswith("/usr/"))
    # one bind per tree
    return [d for d in outside if not any(d.startswith(other + "/") for other in outside)]


def _parse_results(raw: bytes, count: int) -> list[dict] | None:
    """The driver's "KIND NUMBER LENGTH\\n" + LENGTH bytes per test -> [{"status", "output"}], None
    if malformed."""
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
    """What the driver does at the end of a run, for a run whose driver did not get there:
    invalidate the uid's user keyrings, as that uid (no_new_privs, no groups)."""
    # readable by uid
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
    subprocess.run([python, "-I", "-S", "-c", DRIVER_SOURCE, "--forget-keys"], user=uid, group=uid,
                   extra_groups=[], check=False, timeout=30, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _kill_user(uid: int) -> None:
    """SIGKILL every process of `uid`, until none is left (a fork bomb may race the first sweeps).
    """
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
    """How this machine can sandbox: the strongest mode that really runs, worked out once per
    process.

    Tries the namespaced jail first (unless `allow_jail` is False: tests use that to check the
    fallback), then plain processes; with the running interpreter first, then the system's python3
    (an interpreter under /root, e.g. pyenv's, is unreadable to the throw-away user when there is no
    jail to bind it into).
    """
    root = os.geteuid() == 0
    # no libseccomp: a one-line error naming the fix, never a sandbox without the filter
    confinement.syscall_filter()
    # root, or a delegated cgroup v2 subtree
    cgroup = confinement.cgroup_parent()
    unshare = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    if not root:
        unshare += ["--user", "--map-root-user"]
    system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    pythons = [sys.executable] + ([system_python] if system_python else [])
    jails = ([True] if allow_jail and shutil.which("unshare") else []) + [False]
    # then without the cgroup: one the driver cannot join is none
    modes = itertools.product(jails, pythons, [cgroup, None] if cgroup else [None])
    for jailed, python, run_cgroup in modes:
        command = (unshare if jailed else []) + [python, "-I", "-S", "-c", DRIVER_SOURCE]
        system = {"root": root, "jail": jailed, "cgroup": run_cgroup, "command": command}
        # as root, the jail's runs are forked by zygotes (the same walls, started once), else each
        # run starts its own driver
        forking = [python, "-I", "-S", "-c", ZYGOTE_SOURCE, DRIVER_SOURCE]
        for zygote_command in ([forking] if jailed and root else []) + [None]:
            system = dict(system, zygote=zygote_command)
            started = _run(system, _STARTUP_CHECK, [{"input": ""}], time_limit=10)
            if started == [{"status": "ok", "output": "ok\n"}]:
                _warn_of_missing_walls(jailed, run_cgroup, root)
                return system
    raise RuntimeError("the code sandbox cannot start Python on this machine (tried "
                       f"{', '.join(pythons)}, with and without namespaces).")


def _warn_of_missing_walls(jailed: bool, cgroup: str | None, root: bool) -> None:
    """Say once at start-up what this machine's sandbox does not bound."""
    if not jailed:
        warnings.warn("sandbox: Linux namespaces are unavailable (unshare failed), so sandboxed "
                      "programs can reach the network, read this machine's files and use its "
                      "System V IPC" + ("" if root else ", and they run as your own user"),
                      stacklevel=4)
    if cgroup is None:
        warnings.warn("sandbox: no memory cgroup can be made here (it needs root, or a delegated "
                      "cgroup v2 subtree with the memory controller), so rlimits bound each run's "
                      "memory; kernel memory (socket buffers, descriptors in flight) is not "
                      "bounded",
                      stacklevel=4)


# stdlib, C extensions included
_STARTUP_CHECK = "import decimal, fractions, heapq, json\nprint('ok')\n"
