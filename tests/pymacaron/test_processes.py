"""start_celery's worker is an owned child process: one per server, restarted on reload, never left behind."""

from __future__ import annotations

import os
import signal

from .conftest import WORKER_MARK, alive, cmdline, make_token, wait_for

PET = {"name": "Rex"}


def test_reload_restarts_the_worker_and_sigint_stops_everything(servers, reports, unique):
    server = servers.start()  # debug: Werkzeug's reloader, as letsgo runs it
    first = server.one_worker()
    pools = [pid for pid in server.processes() if pid != first and WORKER_MARK in cmdline(pid)]
    assert pools, "the worker has pool processes"

    # Edit the service: the reloader restarts its child, which asks for a new worker.
    edited = server.folder / "petshop" / "api.py"

    def new_worker():
        with open(edited, "a") as f:  # again, in case the reloader had not looked at the file yet
            f.write("\n# edited\n")
        try:
            return wait_for(lambda: (w := server.workers()) and w != [first] and len(w) == 1 and w[0], 5, 0.2)
        except AssertionError:
            return None

    second = wait_for(new_worker, 60, 0, "a new worker")
    assert second in server.started_workers() and not alive(first) and not any(alive(pid) for pid in pools)
    wait_for(lambda: server.log().count(" ready.") >= 2, 30, 0.2, "the new worker to be ready")

    reply = server.post(f"/v1/pets?key={unique}", make_token(), json=PET)
    assert reply.status_code == 200, reply.text
    ran_in = reports.one(f"{unique}:call", timeout=30)["ppid"]
    assert ran_in != first and ran_in in server.started_workers()

    everything = server.processes()
    assert server.stop(signal.SIGINT) == 0
    assert not [pid for pid in everything if alive(pid)]
    assert "Stopping Celery worker" in server.log()


def test_a_killed_servers_worker_stops_and_a_restart_runs_one_worker(servers):
    server = servers.start("--no-debug")
    worker = server.one_worker()
    assert server.workers() == [worker]

    os.kill(server.pid, signal.SIGKILL)  # no atexit, no cleanup: the worker notices by itself
    server.proc.wait()
    wait_for(lambda: not alive(worker), 30, 0.2, f"the orphaned worker {worker} to stop")

    again = servers.start("--no-debug")
    assert again.one_worker() != worker


def test_sigterm_stops_the_worker_with_the_server(servers):
    server = servers.start()
    worker = server.one_worker()
    everything = server.processes()
    server.stop(signal.SIGTERM)
    assert not alive(worker)
    assert not [pid for pid in everything if alive(pid)]
