"""``flask async``: run a worker, check the broker and the workers, purge the queues.

Registered with Flask's CLI through the ``flask.commands`` entry point, so
every app that uses the extension has it:

.. code-block:: sh

    flask --app myapp async worker --loglevel=INFO   # celery -A myapp:celery worker ...
    flask --app myapp async status                   # broker, queue depths, live workers
    flask --app myapp async purge --yes              # drop the waiting tasks
    flask --app myapp async dead                     # what the workers refused, and tasks that failed for good
    flask --app myapp async requeue --all            # put the dead letters back on their queue
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

import click
from flask.cli import AppGroup, ScriptInfo, pass_script_info

from . import _compat, broker, spawn
from . import _deadletter as deadletter
from ._state import AsyncState, state_for
from ._status import collect_status
from .process import watch_parent

if TYPE_CHECKING:
    from flask import Flask

#: The ``flask async`` command group.
async_cli = AppGroup("async", help="Celery workers and queues of the app (flask-pymacaron-async).")


def _state(app: Flask) -> AsyncState:
    try:
        return state_for(app)
    except RuntimeError as exc:
        raise click.UsageError(str(exc)) from None


def _has_queue_option(args: Sequence[str]) -> bool:
    return any(a.startswith(("-Q", "--queues")) for a in args)


# The worker runs outside any app context: a task's context is pushed per
# task, and one pushed for the whole process would leak into chains.
@async_cli.command(
    "worker",
    with_appcontext=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_script_info
def worker_command(info: ScriptInfo, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for this app.

    Takes the options of ``celery worker`` (``--loglevel``, ``--concurrency``,
    ``--pool``, ``-n``, ...; put ``--`` before ``--help`` to see them). Without
    ``-Q`` it consumes the app's default queue and every queue named by
    ``@asynctask(queue=...)``.
    """
    app = info.load_app()
    state = _state(app)
    spawned = spawn.spawned_by()
    if spawned is not None and isinstance(spawned.get("parent"), int):
        watch_parent(spawned["parent"])
    argv = ["worker", *celery_args]
    if not _has_queue_option(celery_args):
        argv += ["-Q", ",".join(broker.queue_names(state.celery))]
    code = _compat.run_celery(state.celery, argv, "flask async")
    click.get_current_context().exit(code or 0)


_queue_option = click.option(
    "-Q",
    "--queue",
    "queues",
    multiple=True,
    help="A queue (repeat for more). Default: the app's queues.",
)


@async_cli.command("status", with_appcontext=False)
@_queue_option
@click.option(
    "--timeout",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to wait for the broker and for the workers' replies.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_script_info
def status_command(info: ScriptInfo, queues: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Show the broker, the tasks waiting in each queue, and the live workers of these queues with their running tasks.

    Exits with 1 when the broker does not answer.
    """
    state = _state(info.load_app())
    status = collect_status(state, list(queues) or None, timeout)
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
    else:
        _print_status(status)
    if not status["broker"]["ok"]:
        click.get_current_context().exit(1)


def _print_status(status: dict[str, Any]) -> None:
    b = status["broker"]
    if not b["ok"]:
        click.secho(f"Broker: {b['url']} is unreachable: {b['error']}", fg="red", err=True)
        return
    click.echo(f"Broker: {b['url']} (reachable)")
    click.echo("Queues:")
    for name, size in status["queues"].items():
        extra = ""
        oldest = status["oldest"].get(name)
        if oldest is not None:
            extra += f", the oldest for {_age(oldest)}"
        delayed = status["delayed"].get(name)
        if delayed:
            extra += f", {delayed} delayed"
        dead = status["dead_letters"].get(name)
        if dead:
            extra += f", {dead} dead letter{'s' if dead != 1 else ''} (flask async dead)"
        click.echo(f"  {name}: {size} waiting{extra}")
    workers = status["workers"]
    count = status["other_workers"]
    others = f" ({count} other worker{'s' if count > 1 else ''} answered)" if count else ""
    click.echo(f"Workers: {len(workers)} consuming these queues{others}")
    for worker, tasks in workers.items():
        click.echo(f"  {worker}: {len(tasks)} running")
        for task in tasks:
            who = "".join(f" {key}={task[key]}" for key in ("user", "url") if task.get(key))
            click.echo(f"    {task['name']}[{task['id']}] args={task['args']} kwargs={task['kwargs']}{who}")


@async_cli.command("purge", with_appcontext=False)
@_queue_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_script_info
def purge_command(info: ScriptInfo, queues: tuple[str, ...], yes: bool) -> None:
    """Remove every task waiting in the app's queues. There is no undo."""
    state = _state(info.load_app())
    celery = state.celery
    names = list(queues) or broker.queue_names(celery)
    url = broker.describe(celery.conf.broker_url)
    if not yes:
        click.confirm(f"Remove every task waiting in {', '.join(names)} on {url}? There is no undo", abort=True)
    _require_broker(celery)
    purged = broker.queue_sizes(celery, names, purge=True)
    for name, count in broker.delayed_sizes(celery, names, purge=True).items():
        purged[name] = purged.get(name, 0) + count
    total = sum(purged.values())
    details = ", ".join(f"{name}: {count}" for name, count in purged.items())
    click.echo(f"Purged {total} task{'s' if total != 1 else ''} ({details}).")


@async_cli.command("dead", with_appcontext=False)
@_queue_option
@click.option("--json", "as_json", is_flag=True, help="Print the dead letters as JSON.")
@click.option("--purge", is_flag=True, help="Delete them instead (with --yes, or after a confirmation).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (with --purge).")
@pass_script_info
def dead_command(info: ScriptInfo, queues: tuple[str, ...], as_json: bool, purge: bool, yes: bool) -> None:
    """List the dead letters: messages the workers refused, and tasks that failed for good.

    Each has an id (the task id when there is one), its queue, its age, the
    task and the reason. ``flask async requeue ID`` puts one back.
    """
    state = _state(info.load_app())
    celery = state.celery
    names = list(queues) or broker.queue_names(celery)
    _require_broker(celery)
    if purge:
        if not yes:
            click.confirm(f"Delete every dead letter of {', '.join(names)}? There is no undo", abort=True)
        purged = deadletter.purge(celery, names)
        total = sum(purged.values())
        click.echo(f"Deleted {total} dead letter{'s' if total != 1 else ''}.")
        return
    letters = deadletter.list_dead(celery, names)
    if as_json:
        click.echo(json.dumps([letter.describe() for letter in letters], indent=2))
        return
    if not letters:
        click.echo(f"No dead letters in {', '.join(names)}.")
        return
    click.echo(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}:")
    for letter in letters:
        task = letter.task or "-"
        click.echo(f"  {letter.id}  {letter.queue}  {_age(letter.age)} ago  {letter.kind}  {task}: {letter.reason}")


@async_cli.command("requeue", with_appcontext=False)
@_queue_option
@click.option("--all", "everything", is_flag=True, help="Requeue every dead letter.")
@click.argument("ids", nargs=-1)
@pass_script_info
def requeue_command(info: ScriptInfo, queues: tuple[str, ...], everything: bool, ids: tuple[str, ...]) -> None:
    """Put dead letters back on their queue (``--all``, or the given ids or task ids).

    The worker checks each again: one refused for its signature is refused again.
    """
    if everything == bool(ids):
        raise click.UsageError("Give the dead letters' ids, or --all")
    state = _state(info.load_app())
    celery = state.celery
    names = list(queues) or broker.queue_names(celery)
    _require_broker(celery)
    requeued = deadletter.requeue(celery, names, None if everything else list(ids))
    for letter in requeued:
        click.echo(f"Requeued {letter.id} ({letter.task or 'an item'}) on {letter.queue}")
    missing = set(ids) - {letter.id for letter in requeued} - {letter.task_id for letter in requeued}
    click.echo(f"Requeued {len(requeued)} dead letter{'s' if len(requeued) != 1 else ''}.")
    if missing:
        raise click.ClickException(f"no dead letter with id {', '.join(sorted(missing))} in {', '.join(names)}")


def _require_broker(celery: Any) -> None:
    url = celery.conf.broker_url
    error = broker.check(url, 2.0, dict(celery.conf.broker_transport_options or {}))
    if error is not None:
        raise click.ClickException(f"the broker {broker.describe(url)} is unreachable: {error}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
