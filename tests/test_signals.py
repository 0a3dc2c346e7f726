"""Blinker signals, in the caller and in the worker."""

from __future__ import annotations

from flask_pymacaron_async import signals
from tests.apps import basic


def test_task_queued_in_caller(app, module_worker):
    seen = []

    def receiver(sender, **extra):
        seen.append((sender, extra))

    with signals.task_queued.connected_to(receiver):
        result = basic.add.delay(1, 2)
    assert seen == [(app, {"task_name": basic.add.name, "task_id": result.id})]


def test_worker_signals_started_succeeded_failed(app, module_worker, reports, unique):
    ok = basic.add.delay(1, 2)
    events = reports.get(f"signal:{ok.id}", 2)
    assert [e["signal"] for e in events] == ["task_started", "task_succeeded"]
    assert events[1]["result"] == "3" and events[0]["sender"] == "tests.apps.basic"
    bad = basic.fail.delay(unique)
    events = reports.get(f"signal:{bad.id}", 2)
    assert [e["signal"] for e in events] == ["task_started", "task_failed"]
    assert "boom" in events[1]["exception"]
    assert f"Task tests.apps.basic.fail[{bad.id}] failed" in module_worker.log()
