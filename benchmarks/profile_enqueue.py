"""Where the time of one immediate-mode enqueue goes: ``python -m benchmarks.profile_enqueue``.

Profiles (cProfile) requests to this extension's ``/queue`` endpoint through
the test client and prints one JSON object: the cumulative µs per request of
the steps of ``Publisher.publish`` and the functions with the most own time.
cProfile slows everything down by a similar factor, so read the shares, not
the absolute figures.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
from typing import Any

from benchmarks.common import HEADERS

REQUESTS = 3000

#: (file suffix, function name) of the steps worth following, in call order.
STEPS = (
    ("flask_pymacaron_async/_task.py", "delay"),
    ("flask_pymacaron_async/_task.py", "celery_task"),
    ("flask_pymacaron_async/_publish.py", "publish"),
    ("flask_pymacaron_async/serialization.py", "check_arguments"),
    ("flask_pymacaron_async/_context.py", "take"),
    ("flask_pymacaron_async/_context.py", "_snapshot"),
    ("flask_pymacaron_async/_publish.py", "send"),
    ("flask_pymacaron_async/_task.py", "celery_apply_async"),
    ("celery/app/task.py", "apply_async"),
    ("celery/app/base.py", "send_task"),
    ("celery/app/amqp.py", "as_task_v2"),
    ("flask_pymacaron_async/_amqp.py", "send_task_message"),
    ("flask_pymacaron_async/_context.py", "sign"),
    ("celery/app/amqp.py", "send_task_message"),
    ("kombu/messaging.py", "publish"),
    ("kombu/transport/virtual/base.py", "basic_publish"),
    ("kombu/transport/redis.py", "_put"),
    ("blinker/base.py", "send"),
)


def profile(target: str = "ext", requests: int = REQUESTS) -> dict[str, Any]:
    if target == "ext":
        from benchmarks.app_ext import app
    else:
        from benchmarks.app_celery import app

    client = app.test_client()
    for _ in range(200):
        client.get("/queue", headers=HEADERS).close()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(requests):
        client.get("/queue", headers=HEADERS).close()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def where(key: tuple[str, int, str]) -> str:
        path, line, name = key
        short = "/".join(path.split("/")[-2:])
        return f"{short}:{line}({name})"

    steps = []
    for suffix, name in STEPS:
        for key, (_cc, calls, _tt, cumtime, _callers) in stats.items():
            if key[0].endswith(suffix) and key[2] == name:
                steps.append({"function": where(key), "calls": calls, "cum_us_per_request": cumtime / requests * 1e6})
    total = sum(tt for _cc, _nc, tt, _ct, _callers in stats.values())
    own = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:20]
    return {
        "target": target,
        "requests": requests,
        "profiled_us_per_request": total / requests * 1e6,
        "steps": steps,
        "top_own_time": [
            {"function": where(key), "calls": nc, "own_us_per_request": tt / requests * 1e6}
            for key, (_cc, nc, tt, _ct, _callers) in own
        ],
    }


if __name__ == "__main__":
    print(json.dumps(profile(*sys.argv[1:2])))
