"""pytest plugin: each test's final outcome, duration and failure text, written as JSON to ``$CONFORMANCE_RESULTS``.

Loaded with ``-p tests.conformance.results`` on both sides. A rerun (pytest-rerunfailures, the suite's ``flaky``
mark) starts the test's record over; a failed phase (setup, call, teardown, a subtest) fails the test; an xfail
counts as skipped, an xpass (not strict) as passed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_results: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = _results.setdefault(report.nodeid, {"outcome": None, "duration": 0.0, "reruns": 0, "error": ""})
    if not hasattr(report, "context"):  # a subtest's time is in its test's already
        record["duration"] += report.duration
    if report.outcome == "rerun":
        record.update(outcome=None, error="", reruns=record["reruns"] + 1)
    elif report.failed:
        record.update(outcome="failed", error=(record["error"] + "\n" + report.longreprtext).strip())
    elif record["outcome"] == "failed":
        pass
    elif report.skipped:
        record["outcome"] = "skipped"
    elif report.when == "call" and record["outcome"] is None:
        record["outcome"] = "passed"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("CONFORMANCE_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f, indent=1)
