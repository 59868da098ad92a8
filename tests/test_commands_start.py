"""Every `python ...` command README.md and docs/workshop.md tell a reader to run starts as written.

Each runs as a subprocess from the repository root, with `--help` appended, in the environment the
tests run in (the README's install): a script's own folder comes first on sys.path then, so a file
of ours there that shadows an installed module (bench/kernels.py did, for Hugging Face's `kernels`)
fails here, as it would for a reader. In-process tests cannot see that: bench/ is not on their path.
"""
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", REPO / "docs" / "workshop.md"]


def split_shell(line: str) -> list[str]:
    """The commands of one shell line joined by && or ; (outside quotes: `python -c "a; b"` stays
    whole)."""
    return re.split(r"&&|;(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", line)


def code_block_commands(text: str) -> list[str]:
    """`python ...` lines of fenced code blocks; a trailing backslash joins the next line."""
    commands, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        pending += line.rstrip().removesuffix("\\")
        if line.rstrip().endswith("\\"):
            continue
        commands += [c for c in split_shell(pending) if c.strip().startswith("python ")]
        pending = ""
    return commands


def inline_commands(text: str) -> list[str]:
    """`python ...` spans in running text (`python -c` snippets are not commands a reader runs as
    scripts)."""
    spans = re.findall(r"`([^`\n]*\bpython [^`\n]*)`", text)
    return [c for span in spans for c in split_shell(span) if c.strip().startswith("python ")]


def documented_commands() -> list[list[str]]:
    """Each distinct command, as argv after `python`, comments and shell placeholders dropped."""
    seen = {}
    for doc in DOCS:
        text = doc.read_text()
        for command in code_block_commands(text) + inline_commands(text):
            argv = shlex.split(command, comments=True)[1:]
            if argv and argv[0].endswith(".py"):  # python -c snippets are not scripts
                seen.setdefault(" ".join(argv), argv)
    return list(seen.values())


COMMANDS = documented_commands()


def test_the_docs_name_the_scripts_a_reader_runs():
    scripts = {argv[0] for argv in COMMANDS}
    assert {"train.py", "evaluation.py", "bench/ablate.py", "experiments/boundary.py"} <= scripts


def run_help(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=240, check=False)


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    """All commands at once, two at a time (each mostly imports torch and transformers)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(run_help, COMMANDS))
    return {" ".join(argv): run for argv, run in zip(COMMANDS, done, strict=True)}


@pytest.mark.parametrize("command", [" ".join(argv) for argv in COMMANDS])
def test_documented_command_starts(command, help_runs):
    run = help_runs[command]
    assert run.returncode == 0, (f"python {command} --help exited {run.returncode}: "
                                 f"{run.stderr[-1500:]}")
    assert "usage:" in run.stdout
