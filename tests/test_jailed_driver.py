"""prorl_verifiers/jailed_driver.py is shipped into the jail as its file's text and run with
`python -I -S -c`: it must run so, alone (standard library only), and read as short top-level
functions."""

import ast
import marshal
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prorl_verifiers import jailed_driver, sandbox_host


def test_the_shipped_source_is_the_module_file_and_imports_only_the_standard_library():
    with open(jailed_driver.__file__, encoding="utf-8") as module_file:
        assert sandbox_host.DRIVER_SOURCE == module_file.read()
    assert sandbox_host.PRELOAD_FAILED == jailed_driver.PRELOAD_FAILED
    tree = ast.parse(sandbox_host.DRIVER_SOURCE)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    outside = imported - set(sys.stdlib_module_names)
    assert imported and not outside, outside


def test_the_driver_is_short_top_level_functions():
    tree = ast.parse(sandbox_host.DRIVER_SOURCE)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    # it was one 208-line function shipped by inspect.getsource
    assert len(functions) >= 15
    longest = max(node.end_lineno - node.lineno + 1 for node in functions)
    assert longest <= 40, longest


def test_the_shipped_text_runs_as_a_driver_outside_any_jail(tmp_path):
    """The text alone, as `python -I -S -c` runs it: a job with no jail, uid, cgroup or filter, two
    tests (stdin and a call), and the verdicts in the driver's format, worked out by hand."""
    program = ("def double(x):\n    return 2 * x\n"
               "if __name__ == '__main__':\n    print(double(int(input())))\n")
    job = {"program": program, "preload": None, "time_limit": 5.0, "wall_limit": 20.0, "uid": None,
           "jail": False, "seccomp": b"", "cgroup": None, "binds": [], "memory_mb": 512,
           "max_processes": 64, "max_open_files": 64, "output_limit": 2**20, "scratch_mb": 16,
           "scratch_files": 1024, "shared_memory_mb": 16,
           "tests": [{"input_length": 3}, {"call": "double(5)"}]}
    header = marshal.dumps(job, 4)
    job_path = tmp_path / "job"
    job_path.write_bytes(b"%d\n" % len(header) + header + b"21\n")
    with open(job_path, "rb") as job_file:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", sandbox_host.DRIVER_SOURCE],
                              stdin=job_file, capture_output=True, timeout=60, cwd=tmp_path,
                              check=False)
    assert done.returncode == 0, done.stderr.decode()
    # "exit 0 3\n" + "42\n"; then the call test: its module run as "solution", then "\n10\n"
    assert done.stdout == b"exit 0 3\n42\nexit 0 4\n\n10\n"


def test_forget_keys_mode_runs_as_shipped():
    command = [sys.executable, "-I", "-S", "-c", sandbox_host.DRIVER_SOURCE, "--forget-keys"]
    done = subprocess.run(command,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == b"", done.stderr.decode()


# ------------------------------------------------------------- zygotes (issue 23: code rewards/s)

def jail_by_zygote():
    system = sandbox_host._system()
    if not system.get("zygote"):
        pytest.skip("runs are forked by zygotes only as root with namespaces")
    return system


def test_a_run_forked_by_a_zygote_holds_no_socket_and_no_state_of_an_earlier_run():
    jail_by_zygote()
    program = ("import os\n"
               "fds = ['/proc/self/fd/' + fd for fd in os.listdir('/proc/self/fd')]\n"
               "print(sorted(os.readlink(fd) for fd in fds if os.path.exists(fd)))\n"
               "print(os.getppid(), sorted(os.listdir('/tmp')))\n"
               "open('/tmp/left-by-a-run', 'w').write('x')\n")
    first, second = (sandbox_host.run_tests(program, [{"input": ""}])[0] for _ in range(2))
    for result in (first, second):
        descriptors, parent = result["output"].splitlines()
        # the zygote's line to the host stays in the zygote
        assert "socket:" not in descriptors
        # the driver is PID 1 (or 2 under its keeper) of a fresh PID namespace; a fresh /tmp, empty
        # but for the mount point of an interpreter that lives under /tmp (CI's venv in mktemp -d)
        pid, listing = parent.split(" ", 1)
        under_tmp = {Path(p).parts[2] for p in {sys.prefix, sys.base_prefix}
                     if Path(p).parts[1:2] == ("tmp",) and len(Path(p).parts) > 2}
        assert pid in ("1", "2") and set(ast.literal_eval(listing)) <= under_tmp, result["output"]


def test_no_descriptor_of_a_test_reaches_the_job_file():
    """The job file holds every test's input: each test's process must hold no descriptor to it (the
    driver closes its stdin; the zygote closes what it received once it has placed it)."""
    program = ("import os, sys\nown = sys.stdin.read().encode()\nfound = []\n"
               "for fd in os.listdir('/proc/self/fd'):\n"
               "    try:\n"
               "        found.append(os.pread(int(fd), 1 << 16, 0))\n"
               "    except OSError:\n"
               "        pass\n"
               "print(own, any(b'-secret-' in data and data != own for data in found))\n")
    tests = [{"input": "A-secret-one"}, {"input": "B-secret-two"}]
    results = sandbox_host.run_tests(program, tests)
    assert [result["output"] for result in results] == ["b'A-secret-one' False\n",
                                                        "b'B-secret-two' False\n"]


def run_once(program: str, time_limit: float = 2.0):
    return sandbox_host.run_tests(program, [{"input": ""}], time_limit=time_limit)


def zygotes_of_this_process() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"A zygote: one long-lived process" in command:
            found.append(int(entry))
    return found


def kill_and_wait(pids: list[int]) -> None:
    """SIGKILL each, then wait until each is gone or a zombie (a zombie's command line is empty)."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while zygotes_of_this_process() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_zygote_that_dies_fails_at_most_the_run_it_was_running():
    jail_by_zygote()
    assert run_once("print(1)") == [{"status": "ok", "output": "1\n"}]
    # idle ones, dead before the next run: it starts a fresh zygote (one dying as the run is sent
    # to it fails that run, like a driver killed mid-run: the busy case below)
    kill_and_wait(zygotes_of_this_process())
    assert run_once("print(2)") == [{"status": "ok", "output": "2\n"}]
    results = []
    running = threading.Thread(target=lambda: results.append(
        run_once("import time\ntime.sleep(5)\nprint(3)", time_limit=10)))
    running.start()
    time.sleep(2)
    # the busy one among them
    for pid in zygotes_of_this_process():
        os.kill(pid, signal.SIGKILL)
    running.join()
    # the run it was running failed, as a killed driver's does
    assert results == [None]
    assert run_once("print(4)") == [{"status": "ok", "output": "4\n"}]
