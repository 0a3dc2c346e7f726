"""Task ids and delivery tags: random UUIDs (version 4) as text, as ``str(uuid.uuid4())`` writes them.

A batch makes two per message (the task id and kombu's delivery tag).
``str(uuid.uuid4())`` asks the kernel for 16 random bytes each time and
formats them in Python: ~1.5 µs, far more inside a request on a virtual
machine, where a system call also costs the caches. Here the bytes of 256
ids come from one ``os.urandom`` read and their text is made at once
(~0.25 µs an id); every thread takes from that one list (``list.pop`` is
atomic). A child process forgets what its parent read, so no two processes
hand out the same ids.
"""

from __future__ import annotations

import os

#: Ids read from the kernel at once.
_IDS_PER_READ = 256
# The version (4) in the high nibble of byte 6, the variant (RFC 4122: 0b10) in the top bits of byte 8.
_VERSION = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT = bytes(b & 0x3F | 0x80 for b in range(256))
# Where the j-th hex digit of a UUID goes in its text (the dashes after the 8th, 12th, 16th and 20th).
_PLACES = [j + (j >= 8) + (j >= 12) + (j >= 16) + (j >= 20) for j in range(32)]
_BLANK = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx "

_ready: list[str] = []


def uuid4() -> str:
    """A random UUID, version 4, variant RFC 4122, as ``str(uuid.uuid4())`` writes it."""
    try:
        return _ready.pop()
    except IndexError:
        _ready.extend(_read())
        return _ready.pop()


def _read() -> list[str]:
    """``_IDS_PER_READ`` new random ids."""
    raw = bytearray(os.urandom(16 * _IDS_PER_READ))
    raw[6::16] = raw[6::16].translate(_VERSION)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    digits = raw.hex().encode("ascii")
    text = bytearray(_BLANK * _IDS_PER_READ)
    for j, place in enumerate(_PLACES):
        # The j-th digit of every id at once.
        text[place :: len(_BLANK)] = digits[j::32]
    return text.decode("ascii").split()


# In a child process, the ids its parent read are the parent's to hand out.
os.register_at_fork(after_in_child=_ready.clear)
