"""The code sandbox: honest programs are judged right; hostile ones end within their limits, score
0, and leave the machine as it was.

Hostile programs run only through the sandbox, and only once `sandbox_probe.protections()` has
proven, with harmless probes, the walls they would break through if the sandbox failed. Where a wall
is missing (no namespaces in a container, not root), the test that needs it is skipped and says
which wall, rather than run a fork bomb or kill(-1) unprotected.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import rewards
from prorl_verifiers import sandbox_host, sandbox_probe

LIMIT = 1.0  # seconds per test in the hostile examples below
SLACK = 8.0  # starting the sandbox on a busy two-core machine, on top of the tests' own limits


def require(*needed: str, any_of: tuple[str, ...] = ()) -> None:
    """Skip, naming what is missing, unless every protection in `needed` (and one of `any_of`) is
    proven."""
    proven = sandbox_probe.protections()
    missing = [name for name in needed if not proven[name]]
    if any_of and not any(proven[name] for name in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        pytest.skip(f"not safe to run here: the sandbox cannot prove {', '.join(missing)} "
                    "on this machine")


def sum_example(**extra) -> dict:
    """Read two integers, print their sum: three tests, each limited to LIMIT seconds."""
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"},
             {"input": "0 0\n", "output": "0\n"}]
    return {"task": "code", "prompt": "...", "tests": tests, "time_limit": LIMIT, **extra}


def python_block(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\n"


UIDS_USED = set()  # every throw-away uid this test process handed out


@pytest.fixture(autouse=True)
def record_uids(monkeypatch):
    allocate = sandbox_host._throwaway_uid
    monkeypatch.setattr(sandbox_host, "_throwaway_uid",
                        lambda: UIDS_USED.add(uid := allocate()) or uid)


def leftovers() -> list[int]:
    """Live processes under this test process's throw-away uids (none may outlive a run).

    SIGKILL is delivered asynchronously, so a dying process gets two seconds to go; zombies don't
    count.
    """
    deadline = time.monotonic() + 2
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid in UIDS_USED:
                    with open(f"/proc/{entry}/stat") as stat:
                        if stat.read().rpartition(")")[2].split()[0] != "Z":
                            alive.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def score_hostile(program: str, example: dict | None = None) -> tuple[float, float]:
    """(reward, seconds) of a hostile program, scored like any completion."""
    start = time.monotonic()
    reward = rewards.score(example or sum_example(), python_block(program))
    return reward, time.monotonic() - start


# ----------------------------------------------------------------------- the probe, honest programs

def test_protections_are_probed_and_the_basic_ones_hold_everywhere():
    proven = sandbox_probe.protections()
    print("sandbox protections on this machine:", proven)
    assert set(proven) == {"own_user", "own_session", "no_network", "cannot_signal_host",
                           "own_pid_namespace", "process_limit", "memory_limit",
                           "private_filesystem", "clean_environment"}
    assert all(isinstance(value, bool) for value in proven.values())
    # These come from rlimits, setsid and the environment we pass: no system can take them away.
    assert proven["own_session"] and proven["memory_limit"] and proven["clean_environment"]


def test_the_sandbox_uses_every_wall_this_machine_allows():
    # Checked independently of the sandbox, so that a regression fails here instead of turning into
    # skips.
    flags = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork"]
    flags += [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    namespaces = subprocess.run(["unshare", *flags, "true"], check=False,
                                capture_output=True).returncode == 0
    proven = sandbox_probe.protections()
    if namespaces:
        for wall in ["no_network", "own_pid_namespace", "private_filesystem", "cannot_signal_host",
                     "process_limit"]:
            assert proven[wall], wall
    if os.geteuid() == 0:
        for wall in ["own_user", "cannot_signal_host", "process_limit"]:
            assert proven[wall], wall



def test_the_probe_holds_when_the_host_itself_runs_in_a_pid_namespace():
    """CI runs the tests inside a PID namespace whose session leader is outside it (getsid there is
    0), and pids inside the sandbox can equal host pids: the probe must not compare ids across
    namespaces."""
    flags = ["--pid", "--fork", "--mount-proc"] + ([] if os.geteuid() == 0
                                                   else ["--user", "--map-root-user"])
    if subprocess.run(["unshare", *flags, "true"], check=False,
                      capture_output=True).returncode != 0:
        pytest.skip("unshare --pid is refused on this machine")
    script = ("import json; from prorl_verifiers import sandbox_probe; "
              "print(json.dumps(sandbox_probe.protections()))")
    done = subprocess.run(["unshare", *flags, sys.executable, "-c", script], check=False,
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    nested = json.loads(done.stdout.strip().splitlines()[-1])
    assert nested["own_session"] and nested["memory_limit"] and nested["clean_environment"], nested
    for wall in ["cannot_signal_host", "own_pid_namespace", "no_network"]:
        assert nested[wall] == sandbox_probe.protections()[wall], (wall, nested)

def test_stdin_and_call_tests_run_and_report_what_happened():
    program = "a, b = map(int, input().split())\nprint(a + b)"
    results = sandbox_host.run_tests(program, [{"input": "1 2\n"}, {"input": "x y\n"}])
    assert results == [{"status": "ok", "output": "3\n"}, {"status": "exit code 1", "output": ""}]
    program = ("def add(a, b):\n    print('adding', end='')\n    return a + b\n\n"
               "if __name__ == '__main__':\n    print('main')")
    results = sandbox_host.run_tests(program, [{"call": "add(1, 2)"}, {"call": "add('a', 'b')"},
                                               {"call": "add(1)"}])
    # a call test runs the program as a module (no __main__ block) and prints repr(value) on a last
    # line of its own
    assert results[0] == {"status": "ok", "output": "adding\n3\n"}
    assert results[1] == {"status": "ok", "output": "adding\n'ab'\n"}
    assert results[2]["status"] == "exit code 1"
    assert sandbox_host.run_tests("import sys\nsys.exit(3)", [{"input": ""}]) == [
        {"status": "exit code 3", "output": ""}]


def test_each_test_gets_a_fresh_process_and_only_its_own_input():
    program = ("import sys\ncounter = globals().setdefault('seen', [])\ncounter.append(1)\n"
               "print(len(counter), sys.stdin.read())")
    results = sandbox_host.run_tests(program, [{"input": "first"}, {"input": "second"}])
    assert [r["output"] for r in results] == ["1 first\n", "1 second\n"]


def test_programs_see_a_clean_environment_and_a_private_scratch_directory(monkeypatch):
    monkeypatch.setenv("PRORL_TEST_SECRET", "hunter2")
    program = ("import os\nopen('scratch.txt', 'w').write('x')\n"
               "print(sorted(os.environ), os.path.exists('scratch.txt'))")
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result == {"status": "ok", "output": "['HOME', 'LANG', 'PATH', 'TMPDIR'] True\n"}


# ----------------------------------------------------------------------------- hostile programs

def test_infinite_loop_is_stopped_at_the_time_limit():
    reward, seconds = score_hostile("while True:\n    pass")
    assert reward == 0.0
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    assert sandbox_host.run_tests("while True:\n    pass", [{"input": ""}],
                                  time_limit=0.5)[0]["status"] == "timeout"
    assert not leftovers()


def test_every_test_runs_under_the_documented_limits():
    program = ("import resource\nfor name in ['CPU', 'AS', 'NPROC', 'FSIZE', 'NOFILE', 'CORE']:\n"
               "    print(name, *resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))")
    [result] = sandbox_host.run_tests(program, [{"input": ""}], time_limit=1.5)
    megabytes = sandbox_host.MEMORY_MB * 2**20
    assert result["output"].split("\n")[:-1] == [
        "CPU 2 3",  # 1.5 s rounded up; SIGXCPU at the soft limit, SIGKILL a second later
        f"AS {megabytes} {megabytes}",
        f"NPROC {sandbox_host.MAX_PROCESSES} {sandbox_host.MAX_PROCESSES}",
        f"FSIZE {sandbox_host.OUTPUT_LIMIT} {sandbox_host.OUTPUT_LIMIT}",
        f"NOFILE {sandbox_host.MAX_OPEN_FILES} {sandbox_host.MAX_OPEN_FILES}", "CORE 0 0"]


def test_fork_bomb_is_contained():
    require("process_limit", "cannot_signal_host")
    program = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
               "        pass")
    reward, seconds = score_hostile(program)
    assert reward == 0.0
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    assert not leftovers()
    # the host can still start processes
    assert subprocess.run(["true"], check=False).returncode == 0


def test_allocating_20_gb_fails_at_once():
    require("memory_limit")
    reward, seconds = score_hostile("block = bytearray(20 * 2**30)\nprint(len(block))")
    assert reward == 0.0
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    [result] = sandbox_host.run_tests("block = bytearray(20 * 2**30)", [{"input": ""}])
    assert result["status"] == "exit code 1"  # MemoryError, not an out-of-memory killer on the host


def test_printing_1_gb_is_cut_at_the_output_limit():
    program = "import sys\nline = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(line)"
    reward, seconds = score_hostile(program)
    assert reward == 0.0
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result["status"] == "exit code 1"  # the write past RLIMIT_FSIZE fails
    assert len(result["output"]) == sandbox_host.OUTPUT_LIMIT


def test_writing_outside_its_directory_changes_nothing_on_the_host(tmp_path):
    require("private_filesystem")
    targets = [str(tmp_path / "escaped.txt"), sandbox_host.__file__ + ".escaped",
               f"/tmp/prorl-escaped-{os.getpid()}"]
    program = "\n".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass"
                        for t in targets)
    assert score_hostile(program)[0] == 0.0
    # it did try every write
    assert sandbox_host.run_tests(program, [{"input": ""}])[0]["status"] == "ok"
    assert not any(os.path.exists(t) for t in targets)  # the world-writable /tmp included


def test_reading_the_parents_environment_finds_nothing(monkeypatch):
    require("clean_environment", any_of=("own_user", "own_pid_namespace"))
    monkeypatch.setenv("PRORL_TEST_SECRET", "hunter2-" + str(os.getpid()))
    program = ("import os\nprint(os.environ)\n"
               "for pid in os.listdir('/proc'):\n"
               "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
               "    except OSError:\n        pass\n"
               f"for pid in (os.getppid(), 1, {os.getpid()}):\n"
               "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
               "    except OSError:\n        pass")
    reward, _ = score_hostile(program)
    assert reward == 0.0
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result["status"] == "ok"
    assert "hunter2" not in result["output"]


def test_killing_its_parent_and_this_process_fails():
    require("cannot_signal_host")
    program = (f"import os\nfor pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
               "    try:\n        os.kill(pid, 9)\n    except OSError:\n        pass")
    reward, seconds = score_hostile(program)
    assert reward == 0.0  # and this test is still running
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    assert not leftovers()


def test_kill_all_reaches_nothing_outside():
    require("cannot_signal_host", any_of=("own_user", "own_pid_namespace"))
    reward, seconds = score_hostile("import os\nos.kill(-1, 9)")
    assert reward == 0.0  # and this test, like everything else on the machine, is still running
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK


def test_segfault_is_just_a_failed_test():
    reward, _ = score_hostile("import ctypes\nctypes.string_at(0)")
    assert reward == 0.0
    assert sandbox_host.run_tests("import ctypes\nctypes.string_at(0)",
                                  [{"input": ""}])[0]["status"] == "killed by SIGSEGV"


def test_exiting_before_the_tests_run_passes_nothing():
    # Harnesses that append asserts to the program and trust exit code 0 are fooled by this; ours
    # compares output.
    call_example = {"task": "code", "prompt": "...", "entry_point": "add", "time_limit": LIMIT,
                    "tests": [{"call": "add(1, 2)", "output": "3"},
                              {"call": "add(2, 2)", "output": "4"}]}
    assert rewards.score(call_example, python_block(
        "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b")) == 0.0
    assert rewards.score(call_example, python_block(
        "import os\nos._exit(0)\ndef add(a, b):\n    return a + b")) == 0.0
    assert rewards.score(sum_example(), python_block("import sys\nsys.exit(0)")) == 0.0
    # the honest version
    assert rewards.score(call_example, python_block("def add(a, b):\n    return a + b")) == 1.0


def test_a_child_that_outlives_its_parent_is_killed_and_its_late_answer_ignored():
    require(any_of=("own_pid_namespace", "own_user"))
    # The parent exits at once; a detached child would print the right answer long after the limit.
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(5)\n"
               "    a, b = map(int, input().split())\n    print(a + b, flush=True)")
    reward, seconds = score_hostile(program)
    assert reward == 0.0
    # the wall-clock backstop, per test
    assert seconds < 3 * sandbox_host.WALL_FACTOR * LIMIT + SLACK
    assert not leftovers()


def test_no_network():
    require("no_network")
    # our own loopback listener: the only address a test may ever try
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        program = ("import socket\ntry:\n"
                   f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "    print('connected')\nexcept OSError as error:\n    print('refused', error)")
        [result] = sandbox_host.run_tests(program, [{"input": ""}])
        assert result["status"] == "ok" and result["output"].startswith("refused")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


# ------------------------------------------------------------------ the fallback without namespaces

@pytest.mark.skipif(os.geteuid() != 0,
                    reason="the no-namespace fallback isolates by uid, which needs root")
def test_fallback_without_namespaces_still_isolates_by_uid(monkeypatch):
    with pytest.warns(UserWarning, match="namespaces are unavailable"):
        plain = sandbox_host._system(allow_jail=False)
    assert "unshare" not in plain["command"]
    monkeypatch.setattr(sandbox_host, "_system", lambda: plain)
    honest = python_block("a, b = map(int, input().split())\nprint(a + b)")
    assert rewards.score(sum_example(), honest) == 1.0
    # Here the driver is not PID 1, so a program can kill it; the run then fails as a whole and its
    # leftovers are found by uid. The host test process stays out of reach (another uid).
    program = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
               f"os.kill({os.getpid()}, 0)\n")  # raises PermissionError: a different user
    assert score_hostile(program)[0] == 0.0
    assert score_hostile("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                         "    time.sleep(30)\nos.kill(os.getppid(), 9)")[0] == 0.0
    assert not leftovers()
    results = sandbox_host.run_tests("import os\nprint(os.getuid())", [{"input": ""}])
    assert int(results[0]["output"]) >= sandbox_host.UID_BASE


def test_status_names_come_from_signal_numbers():
    raw = b"exit 0 2\nhisignal 11 0\ntimeout 0 0\nexit 2 0\n"
    assert sandbox_host._parse_results(raw, 4) == [
        {"status": "ok", "output": "hi"}, {"status": "killed by SIGSEGV", "output": ""},
        {"status": "timeout", "output": ""}, {"status": "exit code 2", "output": ""}]
    assert sandbox_host._parse_results(raw, 5) is None          # a result missing
    assert sandbox_host._parse_results(raw + b"x", 4) is None   # bytes left over
    assert sandbox_host._parse_results(b"exit 0 9\nhi", 1) is None  # output shorter than announced


# ------------------------------------------------------------------ what one run may hold, and keep

def test_a_runs_processes_together_hold_no_more_than_its_memory_budget():
    require("process_limit", "own_pid_namespace")
    # Every process the program can start reserves address space until refused, all holding at once;
    # untouched reservations cost the machine nothing, yet count against the limits exactly as used
    # memory would.
    program = """
import mmap, os, time
reported, writer = os.pipe()
children = 0
for _ in range(40):
    try:
        if os.fork() == 0:
            held, total = [], 0
            while True:
                try:
                    held.append(mmap.mmap(-1, 32 * 2**20))
                    total += 32
                except (OSError, MemoryError):
                    break
            os.write(writer, b"%d\\n" % total)
            time.sleep(60)
        children += 1
    except OSError:
        break
lines = os.fdopen(reported)
print(sum(int(lines.readline()) for _ in range(children)))
"""
    [result] = sandbox_host.run_tests(program, [{"input": ""}], time_limit=20)
    held_mb = int(result["output"])
    print(f"one run's processes held {held_mb} MB at once; budget {sandbox_host.RUN_MEMORY_MB} MB")
    assert sandbox_host.MEMORY_MB <= held_mb <= sandbox_host.RUN_MEMORY_MB
    # the process-held part of it
    assert sandbox_host.MAX_PROCESSES * sandbox_host.MEMORY_MB <= sandbox_host.RUN_MEMORY_MB
    # one run per core must fit a small machine; 32 GB per run did not
    assert sandbox_host.RUN_MEMORY_MB <= 8192
    assert not leftovers()


def test_system_v_shared_memory_is_bounded_and_gone_after_the_run():
    require("own_pid_namespace")
    key = 0x50520000 + os.getpid() % 2**16  # a key of our own, to look for on the host afterwards
    program = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.restype = ctypes.c_int
# IPC_PRIVATE | IPC_CREAT, 1 GB: above shmmax
huge = libc.shmget(0, ctypes.c_size_t(2**30), 0o1600)
mine = libc.shmget({key}, ctypes.c_size_t(2**20), 0o1600)   # a small one, left behind on purpose
total = 1 if mine >= 0 else 0
while libc.shmget(0, ctypes.c_size_t(2**20), 0o1600) >= 0 and total < 4096:
    total += 1
print(huge, mine >= 0, total)
"""
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    huge, made, total_mb = result["output"].split()
    # refused, yet the program could use System V memory at all
    assert huge == "-1" and made == "True"
    assert int(total_mb) <= sandbox_host.SHARED_MEMORY_MB
    with open("/proc/sysvipc/shm") as segments:
        # gone with the run's namespace
        assert not [line for line in segments if line.split()[0] == str(key)]


def test_a_key_added_by_the_program_is_not_in_the_hosts_session_keyring():
    numbers = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine)
    if numbers is None:
        pytest.skip(f"no keyctl syscall numbers known for {os.uname().machine}")
    add_key, keyctl = numbers
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # KEYCTL_GET_KEYRING_ID of our session keyring, made if missing
    if libc.syscall(keyctl, 0, -3, 1) < 0:
        pytest.skip(f"keyrings are refused on this machine (errno {ctypes.get_errno()}), "
                    "to the sandbox alike")
    marker = f"prorl-sandbox-key-{os.getpid()}"
    program = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               # -3: @s
               f"print(libc.syscall({add_key}, b'user', {marker.encode()!r}, "
               "b'secret', 6, -3) > 0)")
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result["output"] == "False\n"  # the system-call filter refuses add_key (EPERM)
    # KEYCTL_SEARCH our session keyring
    found = libc.syscall(keyctl, 10, -3, b"user", marker.encode(), 0)
    assert found < 0 and ctypes.get_errno() == 126  # ENOKEY


def test_the_driver_cannot_be_signalled_or_re_limited_by_the_program():
    require("own_user", "cannot_signal_host")
    # PID 1 is the driver in the jail; without one, the parent is. Cut its descriptors to 3, then
    # stop or kill it.
    program = """
import os, resource, signal
for pid in {1, os.getppid()}:
    for attempt in [lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, 3)),
                    lambda: resource.prlimit(pid, resource.RLIMIT_AS, (2**20, 2**20)),
                    lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGKILL)]:
        try:
            attempt()
            print("done")
        except OSError:
            print("refused")
"""
    results = sandbox_host.run_tests(program, [{"input": ""}, {"input": ""}])
    # the driver ran the second test: it was not stopped, killed or re-limited
    assert results is not None
    for result in results:
        attempts = result["output"].split()
        assert (result["status"] == "ok" and len(attempts) in (4, 8)
                and set(attempts) == {"refused"}), result


def test_the_private_tmp_has_an_inode_limit():
    program = ("import os\ncount = 0\ntry:\n    while count < 20 * 1024:\n"
               "        os.mknod(f'/tmp/f{count}')\n        count += 1\nexcept OSError:\n"
               "    pass\nprint(count)")
    require("private_filesystem")
    [result] = sandbox_host.run_tests(program, [{"input": ""}], time_limit=10)
    assert 0 < int(result["output"]) <= sandbox_host.SCRATCH_FILES


def test_a_problems_own_memory_limit_lowers_the_sandboxes_and_never_raises_it():
    """A record's memory_limit_mb (Codeforces', TACO's) applies: 300 MB fits under the default 512
    MB address space but not under a 200 MB problem limit; a 4 GB limit is still capped at
    MEMORY_MB."""
    program = "```python\nblock = bytearray(300 * 2**20)\nprint(len(block) // 2**20)\n```"
    example = {"task": "code", "prompt": "", "tests": [{"input": "", "output": "300\n"}]}
    assert rewards.score(example, program) == 1.0
    assert rewards.score({**example, "memory_limit_mb": 200}, program) == 0.0
    greedy = "```python\nblock = bytearray(600 * 2**20)\nprint(len(block) // 2**20)\n```"
    assert rewards.score({**example, "tests": [{"input": "", "output": "600\n"}],
                          "memory_limit_mb": 4096}, greedy) == 0.0
