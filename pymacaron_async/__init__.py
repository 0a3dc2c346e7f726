"""pymacaron-async for pymacaron services on Python 3.11, built on flask-pymacaron-async.

A drop-in replacement of the ``pymacaron-async`` package: services keep
``from pymacaron_async import asynctask`` and ``with_async: true`` in
pym-config.yaml; pymacaron's ``letsgo`` calls :func:`start_celery`.
"""

from __future__ import annotations

from .process import start_celery
from .task import PymacaronTask, TaskCrashed, asynctask, is_celery_task

__all__ = ["PymacaronTask", "TaskCrashed", "asynctask", "is_celery_task", "start_celery"]
