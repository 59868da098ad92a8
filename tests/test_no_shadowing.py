"""No module of ours that a script can import by accident may take the name of an installed one.

Running a script puts the script's own folder first on sys.path: `python train.py` puts the
repository root there, `python bench/ablate.py` puts bench/. A file or package of ours with the name
of a module an installed distribution provides is then imported in its place (our old `kernels/`,
and later `bench/kernels.py`, did that to Hugging Face's `kernels`, which transformers >= 5 imports
when loading a model). Checked against the environment the tests run in, for the root and every
folder that holds scripts.
"""
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"runs", "base_model", "__pycache__"}


def script_folders(root: Path) -> list[Path]:
    """The root and every folder below it holding .py files that is not itself a package: each is
    sys.path[0] when one of its files runs as a script (bench/, experiments/, tests/, docs/ if it
    ever holds code)."""
    folders = [root]
    for path in sorted(root.rglob("*.py")):
        folder = path.parent
        parts = folder.relative_to(root).parts
        if any(p.startswith(".") or p in SKIP for p in parts) or (folder / "__init__.py").exists():
            continue
        if folder not in folders:
            folders.append(folder)
    return folders


def importable_names(folder: Path) -> set[str]:
    """Names `import NAME` resolves to in `folder`: modules (NAME.py) and regular packages
    (NAME/__init__.py). A folder without __init__.py is a namespace portion, which never wins over
    an installed package."""
    modules = {path.stem for path in folder.glob("*.py")}
    packages = {path.parent.name for path in folder.glob("*/__init__.py")}
    return modules | packages


def shadowed(root: Path) -> dict[str, list[str]]:
    """'folder/name' → the installed distributions providing `name`, for every clash under
    `root`."""
    installed = importlib.metadata.packages_distributions()  # top-level module name → distributions
    clashes = {}
    for folder in script_folders(root):
        for name in sorted(importable_names(folder)):
            if name in installed:
                where = folder.relative_to(root) / name
                clashes[where.as_posix()] = installed[name]
    return clashes


def test_no_module_of_ours_shadows_an_installed_one():
    assert shadowed(ROOT) == {}, ("rename these: an installed distribution provides a module of "
                                  "the same name")


def test_the_check_catches_a_package_folder(tmp_path):
    installed = importlib.metadata.packages_distributions()
    # any top-level module some installed distribution provides
    taken = next(iter(sorted(installed)))
    (tmp_path / taken).mkdir()
    (tmp_path / "ours.py").write_text("")
    assert shadowed(tmp_path) == {}  # a plain folder is a namespace portion: it shadows nothing
    (tmp_path / taken / "__init__.py").write_text("")
    assert shadowed(tmp_path) == {taken: installed[taken]}
    (tmp_path / f"{taken}.py").write_text("")  # and a module file of that name
    assert taken in shadowed(tmp_path)


def test_the_check_covers_folders_of_scripts(tmp_path):
    """bench/kernels.py shadowed `kernels` whenever a bench script ran: a clash one folder down
    counts."""
    installed = importlib.metadata.packages_distributions()
    taken = next(iter(sorted(installed)))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "ablate.py").write_text("")
    assert shadowed(tmp_path) == {}
    (tmp_path / "bench" / f"{taken}.py").write_text("")
    assert shadowed(tmp_path) == {f"bench/{taken}": installed[taken]}
    # inside a package, names are pkg.NAME: no script runs with pkg/ first
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / f"{taken}.py").write_text("")
    assert "pkg/" + taken not in shadowed(tmp_path)
