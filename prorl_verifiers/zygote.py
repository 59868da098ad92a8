"""A zygote: one long-lived process per sandbox worker that forks each run's driver.

Why: a run used to start a fresh interpreter under `unshare` for its driver, and that start (the
unshare program, the interpreter, the driver's imports) was most of a short run's cost. The zygote
pays it once per worker, then for each run forks a child that takes fresh namespaces (unshare(2):
mount, network, PID, IPC, UTS, as `unshare --fork --kill-child` gave) and forks the run's PID 1,
which runs jailed_driver.main() exactly as a fresh driver would. The zygote never reads a job, so
no run's process holds anything of another run.

Shipped as this file's text, run as root with `python -I -S -c ZYGOTE_SOURCE DRIVER_SOURCE`; stdin
is a Unix socket to the host. Per run the host sends the timeout (text) with two descriptors, the
job file and the result file; the zygote answers with the run's exit status (text) once the run
ends, or once it killed the run at the timeout.
"""

import os
import select
import socket
import sys

# CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
NAMESPACES = 0x20000 | 0x4000000 | 0x8000000 | 0x20000000 | 0x40000000
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG = 1
SIGKILL = 9


def serve(driver: dict) -> None:
    """Run one job per message until the host closes the socket."""
    host = socket.socket(fileno=0)
    while True:
        message, fds, _, _ = socket.recv_fds(host, 64, 2)
        if not message or len(fds) != 2:
            break
        status = run(driver, fds, float(message))
        for fd in fds:
            os.close(fd)
        host.sendall(b"%d" % status)


def run(driver: dict, fds: list[int], timeout: float) -> int:
    """Fork the run, wait for it at most `timeout` seconds; its exit status (1 if killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = start_run(driver, fds)
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    finished = select.select([pidfd], [], [], timeout)[0]
    os.close(pidfd)
    if not finished:
        # its PID 1 dies with it (the death signal), and the kernel then kills the rest
        os.kill(pid, SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 1


def start_run(driver: dict, fds: list[int]) -> int:
    """In the run's first process: fresh namespaces, then PID 1 runs the driver. Its exit status."""
    libc = driver["LIBC"]
    # the run goes if the zygote does
    driver["check"](libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.setsid()
    os.dup2(fds[0], 0)
    os.dup2(fds[1], 1)
    # nothing of the zygote's (its socket to the host) reaches the run
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    driver["check"](libc.unshare(NAMESPACES), "unshare")
    # as unshare(1) does: no mount made in the run propagates back to the host
    driver["mount"]("none", "/", None, MS_REC | MS_PRIVATE)
    alive_read, alive_write = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(alive_write)
        driver["check"](libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        # the parent already gone (the pipe at its end): no run without a supervisor
        if select.select([alive_read], [], [], 0)[0]:
            os._exit(1)
        os.close(alive_read)
        os._exit(run_driver(driver))
    _, wait_status = os.waitpid(first, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 1


def run_driver(driver: dict) -> int:
    """The driver's main() as PID 1 of the run; its exit status as `python -c` would give it."""
    try:
        driver["main"]()
        sys.stdout.flush()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # noqa: BLE001  (a driver that fails fails the run, as a traceback would)
        return 1


if __name__ == "__main__":
    jailed_driver = {"__name__": "jailed_driver"}
    exec(compile(sys.argv[1], "jailed_driver.py", "exec"), jailed_driver)  # noqa: S102  (ours)
    serve(jailed_driver)
