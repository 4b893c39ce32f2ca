"""The library in pipeline/ names no orchestrator, data-versioning tool, VCS or command-line parser.

Provenance (git commit, dvc.lock hashes), Airflow context and argument parsing live in components/;
the library takes what it needs as arguments. This reads every line of every pipeline/ module,
comments and docstrings included, so tool knowledge cannot creep back in as a hint or a remark.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "pipeline"
FORBIDDEN = re.compile(r"\b(airflow|dvc|git|argparse)\b|AIRFLOW_", re.IGNORECASE)


def tool_mentions(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: text` (file relative to `root`) for every line of `files` naming a forbidden tool."""
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_library_names_no_tools() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20, f"expected the library's modules under {LIBRARY}, found {len(files)}"
    hits = tool_mentions(files)
    assert not hits, (
        "pipeline/ must not know of Airflow, DVC, git or argparse; move this to components/ "
        "(or reword it to speak of files and settings):\n" + "\n".join(hits)
    )


def test_the_check_finds_a_mention(tmp_path: Path) -> None:
    module = tmp_path / "pipeline" / "m.py"
    module.parent.mkdir()
    module.write_text(
        '"""Reads the lock file."""\nimport os\nX = os.environ["AIRFLOW_CTX_DAG_ID"]  # see Git\n'
        "digit = 'legit'  # not a word match\n"
    )
    hits = tool_mentions([module], tmp_path)
    assert hits == ['pipeline/m.py:3: X = os.environ["AIRFLOW_CTX_DAG_ID"]  # see Git']
