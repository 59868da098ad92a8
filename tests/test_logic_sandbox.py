"""Logic answers are scored in the sandbox only, each in a process of its own, and never run as
code.

Hostile answers go to spiral_matrix, whose scorer eval()s the answer, in a batch between honest
ones. Each kind is tried twice: against the whole defence, and against process isolation alone (the
literal-only eval and the checked sympy parser switched off), so that each wall is shown to hold by
itself. With isolation alone an answer may run code and so set its own score, never above 1; it must
not reach any other answer.
"""

import os
import sys
import sysconfig
import time

import pytest
import reasoning_gym

import rewards
import tasks
from prorl_verifiers import logic_scorer, sandbox_host, sandbox_probe

LIMIT = 2  # seconds per answer here


def require_walls() -> None:
    proven = sandbox_probe.protections()
    missing = [name for name in ("private_filesystem", "own_user", "cannot_signal_host")
               if not proven[name]]
    if missing:
        pytest.skip(f"not safe to run here: the sandbox cannot prove {', '.join(missing)} "
                    "on this machine")


def logic_example(dataset: str, seed: int) -> dict:
    entry = reasoning_gym.create_dataset(dataset, size=1, seed=seed)[0]
    return {"task": "logic", "prompt": entry["question"], "dataset": dataset, "entry": entry}


def code_answer(source: str) -> str:
    """An answer that spiral_matrix's eval() would run: exec(source), then an empty list."""
    return f"<answer>exec({source!r}) or []</answer>"


# Python run by a hostile answer to claim its own score: "1.0" as all of its output, then exit.
FORGE_OWN_SCORE = ("import os\nfor fd in range(64):\n    try:\n"
                   "        if os.readlink(f'/proc/self/fd/{fd}').startswith('/memfd:stdout'):\n"
                   "            os.ftruncate(fd, 0)\n            os.pwrite(fd, b'1.0', 0)\n"
                   "            os._exit(0)\n"
                   "    except OSError:\n        pass\n")


def finds(oracle: str) -> str:
    """Python that is true when `oracle` is an entry's answer anywhere in the process's objects."""
    return (f"any(isinstance(o, dict) and o.get('answer') == {oracle!r} "
            "for o in __import__('gc').get_objects())")


@pytest.fixture(params=["both walls", "isolation alone"])
def defence(request, monkeypatch):
    monkeypatch.setattr(rewards, "LOGIC_TIME_LIMIT", LIMIT)
    if request.param == "isolation alone":
        preload = logic_scorer.LOGIC_PRELOAD
        for wall in ["sympy_parser.parse_expr = sympy.parse_expr = checked_parse_expr\n",
                     "module.eval, module.exec = literal_only, refuse\n",
                     "    if not answer_like(answer, dataset, entry):\n        return 0.0\n"]:
            assert wall in preload  # else this fixture would test nothing
            # its indent
            preload = preload.replace(wall, wall[: len(wall) - len(wall.lstrip())] + "pass\n")
        monkeypatch.setattr(logic_scorer, "LOGIC_PRELOAD", preload)
    return request.param


def test_hostile_answers_score_0_and_leave_every_other_answer_scored_right(defence, tmp_path):
    require_walls()
    spiral, other = logic_example("spiral_matrix", 1), logic_example("spiral_matrix", 2)
    right = f"<answer>{spiral['entry']['answer']}</answer>"
    wrong = "<answer>1 2 3</answer>"
    marker = tmp_path / "written-by-an-answer"
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox's walls can stop the write
    secret = other["entry"]["answer"]  # another problem's oracle, in the same batch
    assert secret != spiral["entry"]["answer"]
    hostile = {
        "forge a result line": code_answer(
            "import os\nos.write(1, b'exit 0 3\\n1.0')\nprint('0 1.0', flush=True)\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, b'\\n1 1.0\\n')\n"
            "    except OSError:\n        pass"),
        "patch a scorer": code_answer(
            "import reasoning_gym, sys\nfor m in list(sys.modules.values()):\n"
            "    for v in list(vars(m).values()) if m else []:\n"
            "        if isinstance(v, type) and 'score_answer' in vars(v):\n"
            "            v.score_answer = lambda *a, **k: 1.0\n"
            "globals().get('scorers', {}).clear()"),
        "read another oracle": code_answer(
            "import gc, os\nfound = False\n"
            "for path in ['/proc/1/fd/0', '/proc/self/fd/0', '/proc/1/environ']:\n"
            "    try:\n        found |= " + repr(secret.encode()) + " in open(path, 'rb').read()\n"
            "    except OSError:\n        pass\n"
            "found |= " + finds(secret) + "\n"
            "if found:\n" + "".join("    " + line + "\n" for line in FORGE_OWN_SCORE.splitlines())),
        "stop the alarm": code_answer(
            "import signal, time\nsignal.alarm(0)\nsignal.signal(signal.SIGALRM, "
            "signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n"
            "time.sleep(600)"),
        "kill the scorer": code_answer(
            "import os\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
            "        os.kill(pid, 9)\n    except OSError:\n        pass"),
        "truncate or close the output": code_answer(
            "import os\nfor fd in range(64):\n    try:\n"
            "        os.ftruncate(fd, 0)\n    except OSError:\n        pass\n"
            "    try:\n        os.close(fd)\n    except OSError:\n"
            "        pass"),
        "write a file on the host": code_answer(f"open({str(marker)!r}, 'w').write('x')"),
        "exit": "<answer>exit()</answer>",
        "a sympy-style eval": ("<answer>__import__('os').system('touch " + str(marker)
                               + "')</answer>"),
    }
    examples = [spiral, other] + [spiral] * len(hostile) + [spiral, other, spiral]
    completions = [right, wrong, *hostile.values(), wrong, f"<answer>{secret}</answer>", right]
    start = time.monotonic()
    scores = rewards.score_batch(examples, completions)
    seconds = time.monotonic() - start
    print(f"{defence}: {len(completions)} answers, {len(hostile)} hostile, in {seconds:.1f} s: "
          f"{scores}")
    # the honest answers around them, scored right
    assert scores[:2] + scores[-3:] == [1.0, 0.0, 0.0, 1.0, 1.0]
    hostile_scores = dict(zip(hostile, scores[2:-3], strict=True))
    assert not marker.exists()
    assert hostile_scores["read another oracle"] == 0.0  # found nothing: its score would say so
    if defence == "both walls":
        assert set(hostile_scores.values()) == {0.0}, hostile_scores  # none of them ran
    assert all(0.0 <= score <= 1.0 for score in hostile_scores.values())
    assert seconds < 2 * LIMIT + 30  # one answer's time limit (the sleeper), not the batch's


def test_with_isolation_alone_an_answer_that_runs_code_reaches_its_own_score_only(defence):
    """The control for the test above: the forging and oracle-searching code works on what it may
    reach."""
    require_walls()
    if defence != "isolation alone":
        pytest.skip("only meaningful with the literal-only eval switched off")
    spiral = logic_example("spiral_matrix", 1)
    own = spiral["entry"]["answer"]
    finds_own_oracle = code_answer(f"if {finds(own)}:\n"
                                   + "".join("    " + line + "\n"
                                             for line in FORGE_OWN_SCORE.splitlines()))
    assert rewards.score_batch([spiral] * 3, ["<answer>1</answer>", finds_own_oracle,
                                              "<answer>1</answer>"]) == [
        0.0, 1.0, 0.0]


def test_literal_answers_keep_their_scores_and_sympy_gets_math_only():
    # spiral_matrix gives 0.1 for the right list written as a Python list: the literal parser keeps
    # that.
    spiral = logic_example("spiral_matrix", 1)
    as_list = "<answer>[" + ", ".join(spiral["entry"]["answer"].split()) + "]</answer>"
    assert rewards.score(spiral, as_list) == pytest.approx(0.1)
    # polynomial_multiplication hands the answer to sympy's parse_expr: math is read, code is not
    # run.
    poly = logic_example("polynomial_multiplication", 3)
    answer = poly["entry"]["answer"]
    scores = rewards.score_batch([poly] * 4, [f"<answer>{answer}</answer>",
                                              f"<answer>({answer})*1 + 0</answer>",
                                              "<answer>x.__class__</answer>",
                                              "<answer>exec(bytes((49,)))</answer>"])
    assert scores == [1.0, 1.0, 0.0, 0.0]
    # scores 0, and the batch beside it is scored as ever
    unknown = {**poly, "dataset": "no_such_dataset"}
    assert rewards.score_batch([unknown, poly], [f"<answer>{answer}</answer>"] * 2) == [0.0, 1.0]


def test_without_reasoning_gym_in_the_sandbox_scoring_is_an_error_and_nothing_runs(
        tmp_path, monkeypatch):
    require_walls()
    marker = tmp_path / "written-by-an-answer"
    # The sandbox's Python cannot import reasoning-gym: as in a venv whose packages it cannot see.
    monkeypatch.setattr(logic_scorer, "LOGIC_PRELOAD",
                        "import sys\nsys.modules['reasoning_gym'] = None\n"
                        + logic_scorer.LOGIC_PRELOAD)
    called = []
    monkeypatch.setattr(reasoning_gym, "get_score_answer_fn", lambda *args: called.append(args))
    spiral = logic_example("spiral_matrix", 1)
    with pytest.raises(rewards.VerifierUnavailable,
                       match="cannot run reasoning-gym's scorers on this machine"):
        rewards.score(spiral, code_answer(f"open({str(marker)!r}, 'w').write('x')"))
    assert not called and not marker.exists()  # not scored here instead
    rewards.check_logic_sandbox.cache_clear()  # a success earlier in this process is remembered
    with pytest.raises(ValueError, match="cannot run reasoning-gym's scorers"):
        tasks.TaskMix("logic")  # before training starts, one line
    with pytest.raises(ValueError, match="cannot run reasoning-gym's scorers"):
        tasks.TaskMix("rg:spiral_matrix")


def test_the_sandbox_sees_this_pythons_packages():
    """A venv (here perhaps under /tmp, on a pyenv Python under /root): the sandbox's `python -S`
    has the base install's prefix only, so the venv's site-packages must be bound in by name."""
    bound = sandbox_host._python_dirs()
    for directory in (sys.prefix, sys.base_prefix):
        assert (directory + "/").startswith(("/usr/", *(d + "/" for d in bound))), (
            directory, bound)
    [result] = sandbox_host.run_tests(
        "import reasoning_gym\nprint('imported')", [{"input": ""}], time_limit=30,
        preload=f"import site\nsite.addsitedir({sysconfig.get_paths()['purelib']!r})")
    assert result == {"status": "ok", "output": "imported\n"}


def test_identical_answers_to_one_problem_are_scored_once(monkeypatch):
    spiral, other = logic_example("spiral_matrix", 1), logic_example("spiral_matrix", 2)
    right = f"<answer>{spiral['entry']['answer']}</answer>"
    sent = []
    run_tests = sandbox_host.run_tests
    monkeypatch.setattr(sandbox_host, "run_tests",
                        lambda program, tests, **kw: sent.append(len(tests)) or run_tests(
                            program, tests, **kw))
    # the same text for another problem is another job; untagged answers need no sandbox at all
    scores = rewards.score_batch([spiral] * 4 + [other, spiral],
                                 [right, right, f"<answer>\n{right[8:]}", right, right, "no tag"])
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert sent == [2]


def test_the_user_namespace_mode_scores_logic_answers_too(monkeypatch, tmp_path):
    """What a non-root user gets: the walls from `unshare --user`, one mapped uid. Run here by
    making the sandbox believe it is not root (as root, the user namespace maps root to root: the
    same code path)."""
    if os.geteuid() != 0:
        pytest.skip("checked for real by every test here: this process is not root")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    system = sandbox_host._system.__wrapped__()
    monkeypatch.undo()
    if not system["jail"]:
        pytest.skip("user namespaces are refused on this machine")
    monkeypatch.setattr(sandbox_host, "_system", lambda: system)
    marker = tmp_path / "written-by-an-answer"
    os.chmod(tmp_path, 0o777)
    spiral = logic_example("spiral_matrix", 1)
    right = f"<answer>{spiral['entry']['answer']}</answer>"
    hostile = code_answer(f"open({str(marker)!r}, 'w').write('x')")
    assert "--user" in system["command"]
    assert rewards.score_batch([spiral] * 3, [right, hostile, right]) == [1.0, 0.0, 1.0]
    assert not marker.exists()
    [result] = sandbox_host.run_tests("print(open('/proc/sys/kernel/shmmax').read())",
                                      [{"input": ""}])
    # the IPC limits hold there too
    assert int(result["output"]) == sandbox_host.SHARED_MEMORY_MB * 2**20


# --------------------------------------------------------------------------- round three (issue 23)

def test_answers_built_to_stall_sympy_cost_about_a_second_each():
    # puzzle24 and polynomial_multiplication hand the answer to sympy, which evaluates powers as it
    # parses.
    puzzle, poly = logic_example("puzzle24", 3), logic_example("polynomial_multiplication", 3)
    stallers = ["9**9**9**9", "10**10**10**10", "99**99**99", "2**2**2**2**2**2"]
    right = f"<answer>{poly['entry']['answer']}</answer>"
    start = time.monotonic()
    assert rewards.score_batch([poly], [right]) == [1.0]
    # a sandbox's start (reasoning-gym's import) and one quick answer
    one_run = time.monotonic() - start
    examples = [puzzle] * len(stallers) + [poly] * len(stallers) + [poly]
    completions = [f"<answer>{staller}</answer>" for staller in stallers * 2] + [right]
    start = time.monotonic()
    scores = rewards.score_batch(examples, completions)
    per_staller = (time.monotonic() - start - one_run) / (2 * len(stallers))
    print(f"{2 * len(stallers)} stallers: {per_staller:.2f} s each beyond a run's start "
          f"({one_run:.1f} s)")
    assert scores == [0.0] * (2 * len(stallers)) + [1.0]
    assert per_staller <= 1.5


def test_puzzle24_counts_only_the_puzzles_own_numbers():
    # reasoning-gym 0.1.25 checks how many numbers there are and their range, not that they are the
    # puzzle's.
    entry = {**logic_example("puzzle24", 3)["entry"], "answer": "7*4 - 4*1"}
    entry["metadata"] = {**entry["metadata"], "numbers": [7, 4, 4, 1]}
    puzzle = {"task": "logic", "prompt": "Make 24 using 7, 4, 4, 1.", "dataset": "puzzle24",
              "entry": entry}
    answers = ["6*4*1*1", "7*4 - 4*1", "(7 - 4) * 4 * 1 * 2", "7*4 - 4", "4*7 - 1*4", "24"]
    assert rewards.score_batch([puzzle] * len(answers),
                               [f"<answer>{a}</answer>" for a in answers]) == [
        0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
