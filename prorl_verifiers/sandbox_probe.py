"""Which of the sandbox's protections hold on this machine, each proven by a harmless probe program
run in the sandbox:

    python -c "from prorl_verifiers import sandbox_probe; print(sandbox_probe.protections())"
"""

import functools
import json
import os
import socket
import subprocess
import tempfile

from prorl_verifiers import sandbox_host


@functools.cache
def protections() -> dict[str, bool]:
    """Which protections hold on this machine: name -> whether the probe proved it."""
    # A host process for the probe to signal. Pids do not compare across pid namespaces (inside a
    # jail, the same number names a sandbox process), so what counts is whether this process is hit,
    # not whether kill() succeeds.
    target = subprocess.Popen(["sleep", "60"], start_new_session=True)
    with socket.socket() as listener, tempfile.TemporaryDirectory() as host_dir:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        marker = os.path.join(host_dir, "visible-to-the-sandbox?")
        open(marker, "w").close()
        os.chmod(host_dir, 0o755)
        # readable by anyone: only walls can hide it
        os.chmod(marker, 0o644)
        probe_input = json.dumps({"port": listener.getsockname()[1], "host_pid": target.pid,
                                  "marker": marker, "forks": sandbox_host.MAX_PROCESSES + 8,
                                  "allocate": (sandbox_host.MEMORY_MB + 64) * 2**20})
        try:
            results = sandbox_host.run_tests(PROBE, [{"input": probe_input}], time_limit=20)
            try:
                # a signal sent is delivered at once; give the exit a moment to show
                target.wait(timeout=0.5)
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
        # not root, not you: a throw-away uid
        "own_user": facts["uid"] not in (0, os.getuid()),
        # a session leader (sids don't compare across namespaces)
        "own_session": facts["sid"] == facts["pid"],
        "no_network": not facts["network"],
        "cannot_signal_host": not host_signalled,
        # the driver is PID 1, or 2 under its keeper (jailed_driver.py): a namespace of its own
        "own_pid_namespace": facts["parent_pid"] in (1, 2),
        "process_limit": facts["fork_refused"],
        "memory_limit": facts["allocation_refused"],
        "private_filesystem": not facts["marker_visible"],
        "clean_environment": set(facts["environment"]) <= {"PATH", "HOME", "TMPDIR", "LANG"},
    }


# The probe: facts about what a program inside can do, each found without harming anything (the
# forks it tries are bounded and killed, the allocation fails or is freed, the connection goes to
# our own listener).
PROBE = """
import json, os, socket, sys, time
given = json.loads(sys.stdin.read())
facts = {"uid": os.getuid(), "pid": os.getpid(), "sid": os.getsid(0), "parent_pid": os.getppid(),
         "environment": sorted(os.environ), "marker_visible": os.path.exists(given["marker"])}
try:
    socket.create_connection(("127.0.0.1", given["port"]), timeout=2).close()
    facts["network"] = True
except OSError:
    facts["network"] = False
# those two are plainly ours, never the host's
if given["host_pid"] not in (os.getpid(), os.getppid()):
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
