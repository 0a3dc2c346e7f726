"""The worker app of ``python -m benchmarks.ablate --workers``: benchmarks.app_ext with a variant applied."""

from __future__ import annotations

import os

from benchmarks.ablate import ABLATE_ENV, patch_worker
from benchmarks.app_ext import app, celery

patch_worker(os.environ.get(ABLATE_ENV, ""), celery)

__all__ = ["app", "celery"]
