"""No top-level module of ours may take the name of a module an installed distribution provides.

`python train.py` puts the repository root first on sys.path, so a file or package of ours with such a name
is imported in place of the installed one (our old `kernels/` did that to Hugging Face's `kernels`, which
transformers >= 5 imports when loading any model). Checked against the environment the tests run in.
"""
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_level_names(root: Path) -> set[str]:
    """Names `import NAME` resolves to in `root`: modules (NAME.py) and regular packages (NAME/__init__.py).
    A folder without __init__.py is a namespace portion, which never wins over an installed package."""
    modules = {path.stem for path in root.glob("*.py")}
    packages = {path.parent.name for path in root.glob("*/__init__.py")}
    return modules | packages


def shadowed(root: Path) -> dict[str, list[str]]:
    installed = importlib.metadata.packages_distributions()  # top-level module name → distributions
    return {name: installed[name] for name in sorted(top_level_names(root)) if name in installed}


def test_no_project_module_shadows_an_installed_one():
    assert shadowed(ROOT) == {}, "rename these: an installed distribution provides a module of the same name"


def test_the_check_catches_a_package_folder(tmp_path):
    installed = importlib.metadata.packages_distributions()
    taken = next(iter(sorted(installed)))  # any top-level module some installed distribution provides
    (tmp_path / taken).mkdir()
    (tmp_path / "ours.py").write_text("")
    assert shadowed(tmp_path) == {}  # a plain folder is a namespace portion: it shadows nothing
    (tmp_path / taken / "__init__.py").write_text("")
    assert shadowed(tmp_path) == {taken: installed[taken]}
    (tmp_path / f"{taken}.py").write_text("")  # and a module file of that name
    assert taken in shadowed(tmp_path)
