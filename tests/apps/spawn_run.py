"""A script that serves the spawn test app with `app.run()`, as examples/run_demo.py does.

Environment: PMA_SPAWN_PORT, and PMA_SPAWN_RELOAD=1 for the reloader.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.apps.spawn import app  # noqa: E402

if __name__ == "__main__":
    app.run(
        port=int(os.environ["PMA_SPAWN_PORT"]),
        debug=True,
        use_reloader=os.environ.get("PMA_SPAWN_RELOAD") == "1",
    )
