"""Task ids and delivery tags: what ``str(uuid.uuid4())`` writes, never the same twice, not across a fork."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from flask_pymacaron_async import _ids as ids


def test_ids_are_random_uuid4_text() -> None:
    # More than one read from the kernel.
    made = [ids.uuid4() for _ in range(3 * ids._IDS_PER_READ + 1)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_threads_never_share_an_id() -> None:
    taken: list[list[str]] = [[] for _ in range(4)]

    def take(into: list[str]) -> None:
        for _ in range(2 * ids._IDS_PER_READ):
            into.append(ids.uuid4())

    threads = [threading.Thread(target=take, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [text for into in taken for text in into]
    assert len(set(everything)) == len(everything) == 8 * ids._IDS_PER_READ


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_process_does_not_hand_out_its_parents_ids() -> None:
    ids.uuid4()  # the parent holds ids read and not handed out yet
    assert ids._ready
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(writer, " ".join(ids.uuid4() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [ids.uuid4() for _ in range(10)]
    assert len(child) == 10
    assert not set(child) & set(parent)
