"""Task ids and delivery tags: random UUIDs (version 4) as text, at half ``str(uuid.uuid4())``'s cost.

A batch makes two per message (the task id and kombu's delivery tag);
``uuid.UUID``'s checks on construction cost more than the random bytes.
"""

from __future__ import annotations

import os


def uuid4() -> str:
    """A random UUID, version 4, variant RFC 4122, as ``str(uuid.uuid4())`` writes it."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
