"""The library in pipeline/ uses no orchestrator, data-versioning tool, VCS or command-line parser;
test modules share code through tests/conftest.py and tests/servers.py only.

Provenance (git commit, dvc.lock hashes), Airflow context and argument parsing live in components/;
the library takes what it needs as arguments. This reads the code of every pipeline/ module, not
its prose: an import (static, or by name through importlib), a tool started as a subprocess, the
command line (`sys.argv`) or an orchestrator's environment variable is a dependency; a docstring
that names Airflow or DVC to explain where a value comes from is not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "pipeline"
TESTS = ROOT / "tests"
# top-level modules the library must not import: orchestrators, DVC, VCS bindings, argument
# parsers, and the layers above it
FORBIDDEN_MODULES = {
    "airflow",
    "dvc",
    "git",
    "pygit2",
    "kfp",
    "argparse",
    "click",
    "typer",
    "components",
    "dags",
    "scripts",
}
# programs the library must not start
FORBIDDEN_PROGRAMS = {"airflow", "dvc", "git", "kfp"}
# environment variables only an orchestrator or DVC sets
FORBIDDEN_ENV_PREFIXES = ("AIRFLOW", "DVC_", "CXR_RUN_")
IMPORT_BY_NAME = {"import_module", "find_spec", "__import__"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
ENV_READS = {"get", "getenv", "pop", "setdefault"}


def _top(name: str) -> str:
    return name.split(".")[0]


def _call_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _first_string(node: ast.Call) -> str | None:
    """The first argument of a call as a string constant, or the first item of a list or tuple."""
    if not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, (ast.List, ast.Tuple)) and arg.elts:
        arg = arg.elts[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def _is_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def _violation(node: ast.AST) -> str | None:
    """What in `node` ties the library to a tool, or None."""
    if isinstance(node, ast.Import):
        bad = sorted({_top(a.name) for a in node.names} & FORBIDDEN_MODULES)
        return f"imports {', '.join(bad)}" if bad else None
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _top(node.module or "") in FORBIDDEN_MODULES:
        return f"imports {node.module}"
    if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", None) == "sys":
        return "reads sys.argv"
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        key = node.slice.value if isinstance(node.slice, ast.Constant) else None
        if isinstance(key, str) and key.startswith(FORBIDDEN_ENV_PREFIXES):
            return f"reads ${key}"
    if not isinstance(node, ast.Call):
        return None
    name, first = _call_name(node.func), _first_string(node)
    if first is None:
        return None
    if name in IMPORT_BY_NAME and _top(first) in FORBIDDEN_MODULES:
        return f"imports {first} by name"
    if name in SUBPROCESS_CALLS and Path(first).name in FORBIDDEN_PROGRAMS:
        return f"runs {first}"
    environ = name == "getenv" or (name in ENV_READS and _is_environ(getattr(node.func, "value", None)))
    if environ and first.startswith(FORBIDDEN_ENV_PREFIXES):
        return f"reads ${first}"
    return None


def tool_dependencies(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: what` (file relative to `root`) for every tie of `files`' code to a forbidden tool."""
    hits = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = [(node.lineno, what) for node in ast.walk(tree) if (what := _violation(node)) is not None]
        hits += [f"{path.relative_to(root)}:{line}: {what}" for line, what in sorted(found)]
    return hits


def test_library_depends_on_no_tools() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20, f"expected the library's modules under {LIBRARY}, found {len(files)}"
    hits = tool_dependencies(files)
    assert not hits, (
        "pipeline/ must not depend on Airflow, DVC, git, the command line or the layers above it; "
        "move this to components/ and pass the library what it needs as arguments:\n" + "\n".join(hits)
    )


def test_the_check_finds_code_and_ignores_prose(tmp_path: Path) -> None:
    module = tmp_path / "pipeline" / "m.py"
    module.parent.mkdir()
    module.write_text(
        '"""Reads the lock file that DVC writes; Airflow passes the run id. See git and argparse."""\n'
        "import os, subprocess, sys\n"
        "import dvc.api\n"
        "from airflow.sdk import task\n"
        "from components.common import run_main\n"
        "from . import argparse_like  # a relative import of our own\n"
        'X = os.environ["AIRFLOW_CTX_DAG_ID"]  # see Git\n'
        'Y = os.environ.get("CXR_RUN_OVERRIDES"), os.getenv("HOME")\n'
        'subprocess.run(["git", "rev-parse", "HEAD"])\n'
        "args = sys.argv[1:]\n"
        'importlib.import_module("dvc.repo")\n'
        "digit = 'legit dvc airflow'  # words in a string are not a dependency\n"
    )
    assert tool_dependencies([module], tmp_path) == [
        "pipeline/m.py:3: imports dvc",
        "pipeline/m.py:4: imports airflow.sdk",
        "pipeline/m.py:5: imports components.common",
        "pipeline/m.py:7: reads $AIRFLOW_CTX_DAG_ID",
        "pipeline/m.py:8: reads $CXR_RUN_OVERRIDES",
        "pipeline/m.py:9: runs git",
        "pipeline/m.py:10: reads sys.argv",
        "pipeline/m.py:11: imports dvc.repo by name",
    ]


def test_modules_import_from_no_other_test_module() -> None:
    """A test module that imports another runs that module's fixtures and module-level code too, and
    ties the two together: what tests share lives in conftest.py and servers.py."""
    hits = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.ImportFrom):  # `from tests.test_x import y`, `from . import test_x`
                names.append(node.module or "")
            hits += [f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not hits, "move what these share into tests/conftest.py or tests/servers.py:\n" + "\n".join(hits)
