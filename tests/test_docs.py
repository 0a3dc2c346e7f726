"""The docs cover the public API and every configuration key.

Reads the reST sources (no Sphinx needed): every public name has a docstring
and an autodoc directive, every signal is documented, and every key of
``config.DEFAULTS`` has a ``.. data::`` entry whose default matches the code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from blinker import Signal
from flask import Flask

import flask_pymacaron_async
from flask_pymacaron_async import config, serialization, signals

DOCS = Path(__file__).resolve().parent.parent / "docs"

# `.. autoclass:: target` and its indented option lines.
_AUTODOC = re.compile(r"^\.\. (auto\w+):: *(\S+)[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)*)", re.M)
_DATA = re.compile(r"^\.\. (?:py:)?data:: *(\w+)[ \t]*$", re.M)


def _sources() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.rst"))}


def _listed_members(body: str) -> list[str] | None:
    """The ``:members:`` option of a directive: None when absent, [] when bare."""
    match = re.search(r"^[ \t]+:members:(.*)$", body, re.M)
    if match is None:
        return None
    return [name.strip() for name in match.group(1).split(",") if name.strip()]


def _public(namespace: Any) -> list[str]:
    names = getattr(namespace, "__all__", None)
    return list(names) if names is not None else [n for n in vars(namespace) if not n.startswith("_")]


def _autodocumented() -> list[Any]:
    """The objects the autodoc directives of docs/*.rst document."""
    objects: list[Any] = []
    for text in _sources().values():
        for kind, target, body in _AUTODOC.findall(text):
            if kind == "automodule":
                module = importlib.import_module(target)
                listed = _listed_members(body)
                names = [] if listed is None else listed or _public(module)
                objects += [getattr(module, name) for name in names]
            else:
                module_name, _, attr = target.rpartition(".")
                objects.append(getattr(importlib.import_module(module_name), attr))
    return objects


def _is_documented(obj: Any) -> bool:
    return any(obj is documented for documented in _autodocumented())


@pytest.mark.parametrize("name", flask_pymacaron_async.__all__)
def test_public_name_has_a_docstring(name):
    obj = getattr(flask_pymacaron_async, name)
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def _rendered_members() -> list[tuple[str, str]]:
    """(class path, member) of every member an ``autoclass`` directive renders."""
    members = []
    for text in _sources().values():
        for kind, target, body in _AUTODOC.findall(text):
            if kind != "autoclass":
                continue
            module_name, _, attr = target.rpartition(".")
            listed = _listed_members(body)
            if listed is None:
                continue
            names = listed or _public(getattr(importlib.import_module(module_name), attr))
            members += [(target, name) for name in names]
    return members


@pytest.mark.parametrize(("target", "member"), _rendered_members())
def test_rendered_member_has_a_docstring(target, member):
    module_name, _, attr = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    if member in dir(cls):
        # An override may keep the documentation of the method it overrides.
        assert inspect.getdoc(getattr(cls, member)), f"{target}.{member} has no docstring"
    else:  # an instance attribute, documented by a `#:` comment where __init__ sets it
        source = inspect.getsource(cls)
        assert re.search(rf"#:[^\n]*\n[ \t]*self\.{member}\b", source), f"{target}.{member} is not documented"


@pytest.mark.parametrize("name", flask_pymacaron_async.__all__)
def test_public_name_is_in_the_api_docs(name):
    assert _is_documented(getattr(flask_pymacaron_async, name)), f"no autodoc directive in docs/ covers {name}"


#: The modules a user imports besides the package itself; every other one is underscored.
PUBLIC_MODULES = {"broker", "config", "errors", "process", "serialization", "signals", "spawn", "testing", "tracing"}


def test_every_module_is_public_by_name_or_underscored():
    package = Path(flask_pymacaron_async.__file__).parent
    names = {path.stem for path in package.glob("*.py")} - {"__init__"}
    assert {n for n in names if not n.startswith("_")} == PUBLIC_MODULES


def test_the_api_page_documents_the_public_surface_only():
    """Every autodoc target of docs/api.rst is the package itself, a name it exports, or a public module's."""
    text = (DOCS / "api.rst").read_text(encoding="utf-8")
    targets = [target for _, target, _ in _AUTODOC.findall(text)]
    assert targets
    for target in targets:
        parts = target.split(".")
        assert parts[0] == "flask_pymacaron_async", target
        assert not any(part.startswith("_") for part in parts[1:]), f"{target}: an internal name in the API docs"
        assert len(parts) == 1 or parts[1] in PUBLIC_MODULES or parts[1] in flask_pymacaron_async.__all__, target


@pytest.mark.parametrize("name", [n for n, v in vars(signals).items() if isinstance(v, Signal)])
def test_signal_is_documented(name):
    assert _is_documented(getattr(signals, name)), f"signals.{name} is not in the docs"
    source = inspect.getsource(signals)
    assert re.search(rf"^#:.+\n{name} = ", source, re.M), f"signals.{name} has no #: doc comment"


def test_register_type_is_documented():
    assert serialization.register_type.__doc__
    assert _is_documented(serialization.register_type)


def _data_entries() -> dict[str, str]:
    """``.. data::`` entries of configuration.rst: key -> its indented body."""
    text = (DOCS / "configuration.rst").read_text(encoding="utf-8")
    matches = list(_DATA.finditer(text))
    entries = {}
    for match, following in zip(matches, [*matches[1:], None]):
        end = following.start() if following else len(text)
        body = text[match.end() : end]
        # The entry ends at the first line that is not indented.
        entry = re.match(r"(?:\n[ \t]+.*|\n[ \t]*(?=\n))*", body)
        entries[match.group(1)] = entry.group(0) if entry else ""
    return entries


@pytest.mark.parametrize("key", list(config.DEFAULTS))
def test_config_key_documented_with_its_default(key):
    entries = _data_entries()
    assert key in entries, f"docs/configuration.rst has no `.. data:: {key}` entry"
    body = entries[key]
    match = re.search(r"Default: ``(.+?)``", body)
    assert match, f"the entry of {key} does not say `Default: ``...```"
    assert ast.literal_eval(match.group(1)) == config.DEFAULTS[key], f"documented default of {key} is stale"
    meaning = re.sub(r"Default: ``.+?``.*", "", body).strip()
    assert len(meaning) > 40, f"the entry of {key} does not say what the key means"


def test_no_documented_key_is_unknown():
    stale = [key for key in _data_entries() if key not in config.DEFAULTS]
    assert not stale, f"docs/configuration.rst documents keys the code does not read: {stale}"


def test_pytest_fixtures_are_documented():
    from flask_pymacaron_async import testing

    fixtures = [
        name
        for name, obj in vars(testing).items()
        if hasattr(obj, "_fixture_function_marker") or hasattr(obj, "_pytestfixturefunction")
    ]
    assert {"captured_tasks", "async_worker"} <= set(fixtures)
    text = (DOCS / "testing.rst").read_text(encoding="utf-8")
    missing = [name for name in fixtures if f"``{name}``" not in text]
    assert not missing, f"docs/testing.rst does not describe the fixtures {missing}"


def test_cli_commands_and_options_are_documented():
    from flask_pymacaron_async._cli import async_cli

    text = "\n".join(_sources().values())
    for name, command in async_cli.commands.items():
        assert f"async {name}" in text, f"`flask async {name}` is not in the docs"
        for param in command.params:
            if param.param_type_name == "option":
                assert any(opt in text for opt in param.opts), (
                    f"`flask async {name} {param.opts[-1]}` is not in the docs"
                )


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    toctree = re.search(r"^\.\. toctree::\n((?:[ \t]+.*\n|[ \t]*\n)*)", index, re.M)
    assert toctree
    entries = [line.strip() for line in toctree.group(1).splitlines() if line.strip() and ":" not in line]
    pages = sorted(path.stem for path in DOCS.glob("*.rst") if path.stem != "index")
    assert sorted(entries) == pages, "docs/index.rst's toctree and the pages in docs/ differ"


def _code_blocks(page: str) -> list[str]:
    """The Python code blocks of ``docs/<page>``, dedented."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^\.\. code-block:: python\n((?:[ \t]+.*\n|[ \t]*\n)+)", text, re.M)
    return [textwrap.dedent(block).strip() + "\n" for block in blocks]


@pytest.mark.skipif(not hasattr(Flask, "post"), reason="the quickstart is written for Flask 2+ (@app.post)")
def test_quickstart_app_and_testing_example_run_as_written(tmp_path):
    """hello.py from the quickstart, tested by the captured_tasks example of the testing page."""
    [hello] = [block for block in _code_blocks("quickstart.rst") if "def send_welcome" in block]
    [example] = [block for block in _code_blocks("testing.rst") if "captured_tasks.run_all()" in block]
    (tmp_path / "hello.py").write_text(hello, encoding="utf-8")
    (tmp_path / "test_hello.py").write_text(
        "import logging\n\nimport pytest\n\nimport hello\n\n\n"
        "@pytest.fixture\ndef app():\n    return hello.app\n\n\n"
        + example
        + "\n\ndef test_the_task_saw_the_request_and_the_user(client, captured_tasks, caplog):\n"
        "    caplog.set_level(logging.INFO, logger='hello')\n"
        "    test_signup_queues_welcome_mail(client, captured_tasks)\n"
        "    [record] = [r for r in caplog.records if r.name == 'hello']\n"
        "    assert record.getMessage() == (\n"
        "        'Welcome mail to ada@example.com, for ada, queued by POST http://localhost/signup?email=ada@example.com'\n"
        "    )\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    # Only the plugins the example needs, whether or not this package is pip-installed here.
    env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=os.pathsep.join([str(DOCS.parent), str(tmp_path)]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "flask_pymacaron_async.testing",
            "-p",
            "pytest_flask.plugin",
            "-p",
            "no:cacheprovider",
            "test_hello.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
