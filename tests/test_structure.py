"""The code's shape, as the README's "How one step flows" states it: each module imports only
modules listed after it (imports run downward), no project module is imported inside a function,
train.py fits one screen's worth (< 300 lines) and every other module stays ≤ 400 lines."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, list[Path]]:
    modules = {path.stem: [path] for path in ROOT.glob("*.py")}
    for package in ROOT.glob("*/__init__.py"):
        modules[package.parent.name] = sorted(package.parent.glob("*.py"))
    return modules


def imported(files: list[Path], modules) -> list[tuple[str, bool]]:
    """(project module imported, whether the import statement sits inside a function) for every
    import."""
    found = []
    for file in files:
        tree = ast.parse(file.read_text())
        inside = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef,
                  ast.AsyncFunctionDef)) for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [(name.split(".")[0], id(node) in inside) for name in names
                      if name.split(".")[0] in modules]
    return found


def readme_order() -> list[str]:
    """Module names in the order of the README's step table, files in one row in the order
    written."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| order |", text.index("## How one step flows")):]
    table = table[:table.index("\n\n")]
    order = []
    for row in table.splitlines()[2:]:
        cell = row.split("|")[2]
        order += [name.rstrip("/").removesuffix(".py") for name in re.findall(r"`([\w/.]+)`", cell)]
    return [name for name in order if name not in ("bench", "tests")]


def test_imports_run_downward_in_the_readme_order_and_never_inside_a_function():
    modules = project_modules()
    order = readme_order()
    assert set(order) == set(modules), \
        f"modules missing from the README table: {set(modules) ^ set(order)}"
    for position, name in enumerate(order):
        for target, in_function in imported(modules[name], modules):
            if target == name:
                continue  # a package importing its own submodules
            assert not in_function, f"{name} imports {target} inside a function"
            assert order.index(target) > position, \
                f"{name} imports {target}, which the README lists above it"


def test_train_fits_a_screen_and_every_module_stays_short():
    lengths = {path.name: len(path.read_text().splitlines())
               for files in project_modules().values() for path in files}
    assert lengths["train.py"] < 300
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def reading_guide() -> dict[str, list[str]]:
    """README's "How to read the code" table: {row: [module, ...]}."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How to read the code"):text.index("## How one step flows")]
    table = section[section.index("| read |"):]
    rows = {}
    for row in table.strip().splitlines()[2:]:
        _, label, files, _ = row.split("|")
        rows[label.strip()] = [name.rstrip("/").removesuffix(".py")
                               for name in re.findall(r"`([\w/.]+)`", files)]
    return rows


def test_the_reading_guide_names_every_module_once_and_the_core_first():
    rows = reading_guide()
    named = [name for files in rows.values() for name in files]
    assert sorted(named) == sorted(project_modules()), \
        "each module in exactly one row of the reading guide"
    core = rows["first: the RL core"]
    assert core[0] == "train" and len(core) <= 8
    # the core reads in the order a step runs: sample → score → RL math → update → reset
    assert [core.index(m) for m in ("sampling", "rewards", "grpo", "learner", "reset")] == sorted(
        core.index(m) for m in ("sampling", "rewards", "grpo", "learner", "reset"))
