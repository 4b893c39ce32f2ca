"""Every DVC stage depends on all the project code it runs.

A stage's `cmd` runs one component (`python -m components.<name>`). Its code is that module and every
project module (`pipeline.*`, `components.*`) it imports, directly or not: found by reading each
module's import statements, those inside functions and under TYPE_CHECKING included. Each of those
files must be covered by one of the stage's `deps` (the file, or a folder above it), or DVC would
skip the stage after that code changed and keep outputs the new code would not make.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "components")
COMPONENT = re.compile(r"python\s+-m\s+(components\.\w+)")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module `name` under `root` (a package's __init__.py); None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs its packages' __init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(name: str, root: Path = ROOT) -> set[str]:
    """Project modules that module `name`'s import statements name, anywhere in its file."""
    path = module_file(name, root)
    assert path is not None, f"{name} is not a module under {root}"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..y import z`
                parts = package.split(".")
                assert node.level - 1 < len(parts), f"{path}:{node.lineno}: relative import beyond the top package"
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(with_parents(base))
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                if module_file(f"{base}.{alias.name}", root) is not None:
                    found.add(f"{base}.{alias.name}")
    return {m for m in found if module_file(m, root) is not None}


def code_closure(module: str, root: Path = ROOT) -> set[Path]:
    """Files of `module` and of every project module it imports, transitively, relative to `root`."""
    seen: set[str] = set()
    todo = with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name, root) is None:
            continue
        seen.add(name)
        todo.extend(imported_modules(name, root) - seen)
    return {module_file(m, root).relative_to(root) for m in seen}


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """Files (as posix paths) that no dep names, either as the file itself or as a folder above it."""
    roots = [d.rstrip("/") for d in deps]
    return sorted(
        f.as_posix() for f in files if not any(f.as_posix() == d or f.as_posix().startswith(d + "/") for d in roots)
    )


def stage_component(name: str, stage: dict) -> str:
    found = COMPONENT.search(stage.get("cmd", ""))
    assert found, f"dvc.yaml stage {name}: its cmd {stage.get('cmd')!r} runs no `python -m components.<name>`"
    return found.group(1)


def missing_code_deps(name: str, stage: dict, root: Path = ROOT) -> list[str]:
    """Project files the stage's component runs that its `deps` do not cover."""
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps") or []]
    return uncovered(code_closure(stage_component(name, stage), root), deps)


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_the_code_it_runs() -> None:
    problems = {name: missing for name, stage in stages().items() if (missing := missing_code_deps(name, stage))}
    assert not problems, "\n".join(
        f"dvc.yaml stage {name} runs code it does not depend on: {', '.join(files)}; add them (or their folder) "
        f"to the stage's deps in dvc.yaml"
        for name, files in problems.items()
    )


def test_the_check_reports_a_dependency_taken_away() -> None:
    train = stages()["train"]
    needed = code_closure(stage_component("train", train))
    losses = sorted(f.as_posix() for f in needed if f.parts[:2] == ("pipeline", "losses"))
    assert "pipeline/losses/dwml.py" in losses and Path("components/train.py") in needed
    assert "pipeline/losses" in train["deps"]
    without_losses = {**train, "deps": [d for d in train["deps"] if d != "pipeline/losses"]}
    assert missing_code_deps("train", without_losses) == losses


def test_imports_found_in_functions_relative_and_submodules(tmp_path: Path) -> None:
    files = {
        "components/__init__.py": "",
        "components/step.py": "def main():\n    from pipeline.data import reader\n    return reader\n",
        "pipeline/__init__.py": "",
        "pipeline/data/__init__.py": "",
        "pipeline/data/reader.py": "from . import layout\nfrom ..util import slugify\nimport numpy\n",
        "pipeline/data/layout.py": "NAME = 'x'\n",
        "pipeline/data/unused.py": "",
        "pipeline/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.typing_only\n",
        "pipeline/typing_only.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    closure = {p.as_posix() for p in code_closure("components.step", tmp_path)}
    assert closure == set(files) - {"pipeline/data/unused.py"}
    stage = {"cmd": "python -m components.step --out x", "deps": ["components", "pipeline/data/reader.py"]}
    assert missing_code_deps("step", stage, tmp_path) == [
        "pipeline/__init__.py",
        "pipeline/data/__init__.py",
        "pipeline/data/layout.py",
        "pipeline/typing_only.py",
        "pipeline/util.py",
    ]
