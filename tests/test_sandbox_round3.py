"""The sandbox, round three (issue 23): the system-call filter, uids never reused and keys gone with
a run, CPU-time limits beside a hog, oom_score_adj, kernel memory in a memory cgroup, and libseccomp
missing.
Helpers and the autouse fixture that records each run's throw-away uids come from test_sandbox."""
import os
import subprocess
import sys
import time

import pytest
from test_sandbox import LIMIT, leftovers, python_block, record_uids, require, sum_example  # noqa: F401

import rewards
import tasks
from prorl_verifiers import confinement, sandbox_host

SYSCALLS_X86_64 = {"keyctl": 250, "add_key": 248, "request_key": 249, "ptrace": 101,
                   "process_vm_readv": 310, "process_vm_writev": 311, "io_uring_setup": 425,
                   "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
                   "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166,
                   "unshare": 272, "setns": 308, "kexec_load": 246, "kexec_file_load": 320}


def require_x86_64() -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the system-call numbers below are x86_64's")


def test_socket_families_other_than_unix_cannot_be_created():
    # vsock is not confined by a network namespace: a filter on socket families is the only wall.
    program = """
import socket
for name in ["AF_VSOCK", "AF_PACKET", "AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"]:
    try:
        kind = socket.SOCK_DGRAM if name == "AF_NETLINK" else socket.SOCK_STREAM
        socket.socket(getattr(socket, name), kind)
        print(name, "created")
    except OSError as error:
        print(name, error.errno)
[end.close() for end in socket.socketpair()]
print("pair created")
"""
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result["status"] == "ok", result
    assert result["output"].split("\n")[:-1] == ["AF_VSOCK 1", "AF_PACKET 1", "AF_NETLINK 1",
                                                 "AF_INET 1", "AF_INET6 1", "AF_UNIX created",
                                                 "pair created"]


def test_calls_a_test_program_has_no_use_for_fail_with_eperm():
    require_x86_64()
    # Arguments that fail harmlessly (EINVAL, EFAULT, EBADF, ...) or do nothing when the call is
    # allowed: only the filter answers EPERM for every one of them. ptrace(-1) is an unknown
    # request, unshare(0) a no-op.
    calls = {name: "(-1, 0, 0, 0, 0, 0)" if name in ("ptrace", "setns", "bpf", "keyctl")
             else "(0, 0, 0, 0, 0, 0)"
             for name in SYSCALLS_X86_64}
    program = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" + "".join(
        f"print({name!r}, libc.syscall({SYSCALLS_X86_64[name]}, *{args}), ctypes.get_errno())\n"
        for name, args in calls.items())
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result["status"] == "ok", result
    answers = {line.split()[0]: line.split()[1:] for line in result["output"].split("\n")[:-1]}
    assert answers == {name: ["-1", "1"] for name in SYSCALLS_X86_64}, answers


def key_users() -> dict[int, str]:
    """The kernel's per-uid key accounting (/proc/key-users: "uid: usage nkeys/nikeys ..."),
    readable by all."""
    with open("/proc/key-users") as lines:
        return {int(line.split(":")[0]): line.split(":")[1].strip() for line in lines}


@pytest.mark.parametrize("walls", ["filter and cleanup", "cleanup alone"])
def test_a_key_planted_by_one_run_is_not_readable_by_the_next_even_with_the_same_uid(
        walls, monkeypatch):
    require_x86_64()
    require("own_user")
    # one uid for both runs: the counter wrapped
    uid = sandbox_host.UID_BASE + 2**30 - 2**10 + os.getpid() % 2**10
    monkeypatch.setattr(sandbox_host, "_throwaway_uid", lambda: uid)
    if walls == "cleanup alone":  # the system-call filter off, so the program can add the key
        monkeypatch.setattr(confinement, "syscall_filter", lambda: b"")
    marker = f"prorl-planted-{os.getpid()}"
    # -4: the uid's user keyring
    plant = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"print(libc.syscall(248, b'user', {marker.encode()!r}, b'secret', 6, -4) > 0)")
    [planted] = sandbox_host.run_tests(plant, [{"input": ""}])
    assert planted["output"] == ("True\n" if walls == "cleanup alone" else "False\n")
    search = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"  # KEYCTL_SEARCH @u
              f"print(libc.syscall(250, 10, -4, b'user', {marker.encode()!r}, 0))")
    # the reader may search, filter or not
    monkeypatch.setattr(confinement, "syscall_filter", lambda: b"")
    [searched] = sandbox_host.run_tests(search, [{"input": ""}])
    assert searched["output"] == "-1\n", searched
    # the kernel frees an invalidated keyring in its garbage collector
    deadline = time.monotonic() + 5
    while uid in key_users() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert uid not in key_users(), key_users().get(uid)  # no key of the uid left in the kernel


def test_uids_are_not_reused_across_processes(tmp_path, monkeypatch):
    counter = tmp_path / "uids"
    script = ("from prorl_verifiers import sandbox_host\n"
              f"sandbox_host.UID_COUNTER_FILE = {str(counter)!r}\n"
              "print(*(sandbox_host._throwaway_uid() for _ in range(200)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                             text=True)
            for _ in range(3)]
    uids = [int(uid) for run in runs for uid in run.communicate(timeout=60)[0].split()]
    assert len(uids) == 600 and len(set(uids)) == 600  # three processes at once, no uid twice
    assert all(sandbox_host.UID_BASE <= uid < 2**31 for uid in uids)
    monkeypatch.setattr(sandbox_host, "UID_COUNTER_FILE", str(counter))
    # the counter persists: a later process goes on from it
    assert sandbox_host._throwaway_uid() == max(uids) + 1


def test_an_honest_cpu_bound_program_passes_beside_eight_setsid_spinners():
    require("process_limit", "own_user")
    # The honest program needs half its limit in CPU time; the hog's processes, each in a session of
    # its own, spin on every core meanwhile. The honest verdict must count the honest program's own
    # CPU time.
    honest = python_block(f"import time\nwhile time.process_time() < 0.5 * {LIMIT}:\n    pass\n"
                          "a, b = map(int, input().split())\nprint(a + b)")
    hog = python_block("import os, time\nfor _ in range(8):\n    try:\n        if os.fork() == 0:\n"
                       "            os.setsid()\n            while True:\n                pass\n"
                       "    except OSError:\n        break\ntime.sleep(100)")
    scores = rewards.score_batch([sum_example(), sum_example()], [hog, honest], workers=2)
    assert scores == [0.0, 1.0]
    assert not leftovers()


def test_everything_in_the_sandbox_is_the_first_to_go_when_memory_runs_out():
    program = "print(open('/proc/self/oom_score_adj').read().strip())"
    [result] = sandbox_host.run_tests(program, [{"input": ""}])
    assert result == {"status": "ok", "output": "1000\n"}


HOARD = """
import socket
reported, total, parked = 0, 0, []
carrier, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
while total < 3 * {budget}:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 2**20)
    a.setblocking(False)
    while True:
        try:
            total += a.send(b"x" * 60000)
        except BlockingIOError:
            break
        if total - reported > 2**20:
            print(total >> 20, flush=True)
            reported = total
    try:  # parked in flight: buffers held without a descriptor slot
        socket.send_fds(carrier, [b"x"], [a.fileno(), b.fileno()])
        a.close(), b.close()
    except OSError:
        parked.append((a, b))
"""


def test_socket_buffers_count_against_the_runs_memory_in_a_cgroup(monkeypatch):
    require("own_user")
    if sandbox_host._system()["cgroup"] is None:
        pytest.skip("no memory cgroup can be created here "
                    "(the fallback's test covers this machine)")
    # a small budget: what the hoarder queues is real memory
    monkeypatch.setattr(sandbox_host, "RUN_MEMORY_MB", 96)
    [result] = sandbox_host.run_tests(HOARD.format(budget=96 * 2**20), [{"input": ""}],
                                      time_limit=10)
    queued_mb = max([0] + [int(line) for line in result["output"].split()])
    print(f"socket buffers queued before the cgroup stopped it: {queued_mb} MB of a 96 MB "
          f"budget; {result['status']}")
    assert result["status"] != "ok" and 0 < queued_mb <= 96


def test_without_a_memory_cgroup_the_sandbox_says_kernel_memory_is_unbounded(monkeypatch):
    monkeypatch.setattr(confinement, "cgroup_parent", lambda: None)
    with pytest.warns(UserWarning, match="kernel memory .*socket buffers.* not bounded"):
        fallback = sandbox_host._system.__wrapped__()
    assert fallback["cgroup"] is None


def test_without_libseccomp_code_is_not_scored_and_the_error_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # as on a machine without libseccomp.so.2
    # not the cached one
    monkeypatch.setattr(confinement, "syscall_filter", confinement.syscall_filter.__wrapped__)
    monkeypatch.setattr(sandbox_host, "_system", sandbox_host._system.__wrapped__)
    with pytest.raises(RuntimeError, match="apt-get install libseccomp2"):
        confinement.syscall_filter()
    # never a silent 0
    with pytest.raises(rewards.VerifierUnavailable, match="apt-get install libseccomp2"):
        rewards.score(sum_example(), python_block("print(3)"))


def test_without_libseccomp_a_run_with_code_stops_before_training(monkeypatch):
    """The first code score would raise mid-run; the task mix checks the sandbox when it is
    built."""
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # as on a machine without libseccomp.so.2
    monkeypatch.setattr(confinement, "syscall_filter", confinement.syscall_filter.__wrapped__)
    monkeypatch.setattr(sandbox_host, "_system", sandbox_host._system.__wrapped__)
    rewards.check_code_sandbox.cache_clear()  # a success earlier in this process is remembered
    with pytest.raises(ValueError, match="apt-get install libseccomp2"):
        tasks.TaskMix("code")
    rewards.check_code_sandbox.cache_clear()
    monkeypatch.undo()
    tasks.TaskMix("code")  # with the filter back, the check passes
