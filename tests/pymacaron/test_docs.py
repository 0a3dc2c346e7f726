"""docs/pymacaron.rst covers the public names of pymacaron_async and the worker command."""

from __future__ import annotations

import re

import pytest

import pymacaron_async
from pymacaron_async.__main__ import _parser
from tests.conftest import ROOT

PAGE = (ROOT / "docs" / "pymacaron.rst").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", pymacaron_async.__all__)
def test_public_name_is_documented(name):
    obj = getattr(pymacaron_async, name)
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    assert re.search(rf"^\.\. (function|class|exception):: {name}\b", PAGE, re.M), f"{name} is not in the page"


def test_worker_command_options_are_documented():
    for action in _parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert option in PAGE, f"pymacaron-async {option} is not in docs/pymacaron.rst"


def test_settings_are_documented():
    from pymacaron_async import config

    for name in ("ENV_BROKER_URL", "ENV_QUEUE", "ENV_SECRET_KEY", "ENV_SPAWN_WORKER"):
        assert f"``{getattr(config, name)}``" in PAGE
    for key in ("with_async", "worker_count", "async_broker_url", "async_queue", "async_secret_key", "jwt_secret"):
        assert f"``{key}``" in PAGE
