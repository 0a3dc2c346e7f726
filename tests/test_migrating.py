"""The "after" code of docs/migrating.rst runs: from the Flask docs' recipe, from Flask-CeleryExt.

The recipe's port is tests/apps/recipe (run by tests/test_celery_api.py);
pymacaron-async services are the pymacaron suite's (tests/pymacaron, legacy
environment). Here: the Flask-CeleryExt app after its move, on a real worker,
and the docs page naming the same changed lines as the code.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.apps import celeryext_after

DOC = Path(__file__).resolve().parent.parent / "docs" / "migrating.rst"


def test_a_flask_celeryext_app_after_the_move(start_worker):
    start_worker("tests.apps.celeryext_after:celery")
    client = celeryext_after.app.test_client()
    task_id = client.post("/remember/ada?x=1", headers={"User-Agent": "moved"}).json["id"]
    with celeryext_after.app.app_context():
        value = celeryext_after.remember.AsyncResult(task_id).get(timeout=20)
        assert celeryext_after.add.delay(2, 2).get(timeout=20) == 4
    assert value == {"value": "ada", "url": "http://localhost/remember/ada?x=1", "agent": "moved"}


def _changed(path: Path) -> list[str]:
    """The code of each line with a ``# changed`` comment (whole statements: the test fails on a fragment)."""
    lines = [line.split("# changed")[0].strip() for line in path.read_text().splitlines() if "# changed" in line]
    for line in lines:
        assert re.match(r"^[A-Za-z@]", line) and len(line) > 8, f"{path.name}: `{line}` is not a whole statement"
    return lines


def test_the_guide_shows_the_lines_that_changed():
    """Every line marked "# changed" in the two ported apps is in the guide, as written."""
    text = DOC.read_text()
    root = Path(__file__).resolve().parent / "apps"
    for path in (root / "recipe" / "__init__.py", root / "celeryext_after.py"):
        for line in _changed(path):
            normal = re.sub(r"os\.environ\.get\(\"[A-Z_]+\", (\"[^\"]+\")\)", r"\1", line)
            assert normal in text, f"docs/migrating.rst does not show `{normal}` ({path.name})"
