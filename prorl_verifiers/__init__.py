"""The verifiers rewards.py reaches, and the sandbox they run in (rewards.py is their one entry).

    sandbox_host.py    the trainer's side of the sandbox: builds each run's jail, ships the driver
                       in, reads its verdicts (run_tests)
    jailed_driver.py   the program that runs inside the jail: walls itself in, runs each test,
                       reports; shipped as this file's text, so it imports only the standard library
    zygote.py          one process per worker that forks each run's driver into fresh namespaces
    sandbox_probe.py   which protections hold on this machine, proven by a probe in the sandbox
    confinement.py     the system-call filter (seccomp) and the memory cgroup of each run
    logic_scorer.py    reasoning-gym's scorers, wrapped, run inside the sandbox
    ifeval.py          IFEval's instruction checks
"""
