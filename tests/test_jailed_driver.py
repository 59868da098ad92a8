"""verifiers/jailed_driver.py is shipped into the jail as its file's text and run with `python -I -S -c`:
it must run so, alone (standard library only), and read as short top-level functions."""

import ast
import marshal
import subprocess
import sys

from verifiers import jailed_driver, sandbox_host


def test_the_shipped_source_is_the_module_file_and_imports_only_the_standard_library():
    with open(jailed_driver.__file__, encoding="utf-8") as module_file:
        assert sandbox_host.DRIVER_SOURCE == module_file.read()
    tree = ast.parse(sandbox_host.DRIVER_SOURCE)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_the_driver_is_short_top_level_functions():
    tree = ast.parse(sandbox_host.DRIVER_SOURCE)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert len(functions) >= 15  # it was one 208-line function shipped by inspect.getsource
    longest = max(node.end_lineno - node.lineno + 1 for node in functions)
    assert longest <= 40, longest


def test_the_shipped_text_runs_as_a_driver_outside_any_jail(tmp_path):
    """The text alone, as `python -I -S -c` runs it: a job with no jail, uid, cgroup or filter, two tests
    (stdin and a call), and the verdicts in the driver's format, worked out by hand."""
    program = "def double(x):\n    return 2 * x\nif __name__ == '__main__':\n    print(double(int(input())))\n"
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
                              stdin=job_file, capture_output=True, timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr.decode()
    # "exit 0 3\n" + "42\n"; then the call test: its module run as "solution", then "\n10\n"
    assert done.stdout == b"exit 0 3\n42\nexit 0 4\n\n10\n"


def test_forget_keys_mode_runs_as_shipped():
    done = subprocess.run([sys.executable, "-I", "-S", "-c", sandbox_host.DRIVER_SOURCE, "--forget-keys"],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == b"", done.stderr.decode()
