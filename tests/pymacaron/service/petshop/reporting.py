"""Where the test service writes what its tasks saw: Redis lists the tests read."""

import hashlib
import json
import os
import sys
import time

import redis
from flask import has_request_context, request
from pymacaron.auth import get_user_token, get_userid

from pymacaron_async import is_celery_task


def _redis():
    return redis.Redis.from_url(os.environ["PMA_TEST_BROKER_URL"])


def report(key, name, value):
    _redis().rpush(f"{os.environ['PMA_TEST_PREFIX']}:{key}:{name}", json.dumps(value))


def fingerprint(token):
    """Tasks report a hash of the token they see, never the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest() if token else None


def seen():
    """What a task sees of its process, request and user."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "argv0": sys.argv[0],
        "is_celery_task": is_celery_task(),
        "time": time.time(),
        "url": request.url if has_request_context() else None,
        "user_id": get_userid(),
        "token": fingerprint(get_user_token()),
    }


def report_crash(title=None, data=None, exception=None):
    """The service's pymacaron error reporter (API(error_reporter=...))."""
    data = data or {}
    _redis().rpush(
        f"{os.environ['PMA_TEST_PREFIX']}:crashes",
        json.dumps(
            {
                "title": title,
                "pid": os.getpid(),
                "user": data.get("user"),
                "url": (data.get("request") or {}).get("url"),
                "trace": "".join(data.get("trace") or []),
            }
        ),
    )
