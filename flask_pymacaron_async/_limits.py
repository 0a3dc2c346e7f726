"""How big a task message may be at each step, checked before the step expands it.

``PYMACARON_ASYNC_MAX_MESSAGE_BYTES`` bounds a task's encoded arguments. A
message from the broker is bounded before it is read, then before it is
inflated, then before it is decoded:

- the raw queue item (Redis): :func:`item_bytes`, before it is parsed as JSON;
- its headers: :func:`headers_problem`, each one and all of them;
- a compressed body: kombu decompresses a body in ``Message.__init__``,
  before any consumer sees it, and with no limit (a 785-byte bz2 body can
  inflate to gigabytes). :func:`bound_decompression` replaces, through
  kombu's own registry (:func:`kombu.compression.register`), the decoder of
  every compression it knows with one that stops past the limit: zlib,
  gzip, bz2 and lzma inflate at most ``limit + 1`` bytes; a compression
  that cannot be inflated with a limit (brotli, zstd) is refused. A refused
  body makes kombu's message carry the error, and the worker's consumer
  dead-letters the message as it came (compressed).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any, Callable, Mapping

from kombu import compression

from .errors import MessageTooLarge

#: Room for Celery's own part of a body (callbacks, errbacks, chain) beyond the arguments.
EMBED_ROOM = 64 * 1024
#: Bytes one header may take (its text, or its JSON for a list or mapping).
HEADER_BYTES = 64 * 1024
#: Bytes the context header may take (the snapshot: allowed request headers, the user's value).
CONTEXT_HEADER_BYTES = 256 * 1024
#: Bytes all headers together may take.
HEADERS_BYTES = 512 * 1024

_SCALARS = (str, int, float, bool, type(None))


def body_bytes(max_message_bytes: int) -> int:
    """The most a (decompressed) body may take: the arguments' limit and room for Celery's part."""
    return max_message_bytes + EMBED_ROOM


def item_bytes(max_message_bytes: int) -> int:
    """The most a raw queue item may take: a body written as a JSON string in its envelope, and the headers.

    A JSON string escapes a quote or a ``\\uXXXX`` once more (at most
    twice the body's text); an item past this bound cannot be a message the
    extension sent, and is not parsed.
    """
    return 2 * body_bytes(max_message_bytes) + HEADERS_BYTES + 64 * 1024


def headers_problem(headers: Mapping[str, Any], context_header: str) -> str | None:
    """Why the headers of a message are too big (each one, and all of them), or None."""
    total = 0
    for name, value in headers.items():
        size = len(value) if isinstance(value, str) else _size(value)
        limit = CONTEXT_HEADER_BYTES if name == context_header else HEADER_BYTES
        if size > limit:
            return f"its {_name(name)} header takes {size} bytes, over {limit}"
        total += size + len(name) if isinstance(name, str) else size
    if total > HEADERS_BYTES:
        return f"its headers take {total} bytes, over {HEADERS_BYTES}"
    return None


def _size(value: Any) -> int:
    """About the bytes ``value`` takes as JSON, without writing it: a deep structure counts past any limit."""
    if isinstance(value, _SCALARS):
        return len(value) if isinstance(value, str) else 8
    seen = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > 32:
            return HEADERS_BYTES + 1
        if isinstance(item, str):
            seen += len(item) + 2
        elif isinstance(item, Mapping):
            seen += 2
            for key, inner in item.items():
                seen += len(key) + 3 if isinstance(key, str) else 8
                stack.append((inner, depth + 1))
        elif isinstance(item, (list, tuple)):
            seen += 2 + len(item)
            stack.extend((inner, depth + 1) for inner in item)
        else:
            seen += 8
        if seen > HEADERS_BYTES:
            return seen
    return seen


def _name(name: Any) -> str:
    return repr(name[:40]) if isinstance(name, str) else "a non-text"


# -- bounded decompression -----------------------------------------------------------

_limit = body_bytes(1024 * 1024)
_bounds: list[int] = []
# Bytes inflated at a time.
_PIECE = 64 * 1024

#: kombu's names for the compressions it may know, by the inflater that reads them with a limit.
_INFLATERS: dict[str, Callable[[], Any]] = {
    "zlib": zlib.decompressobj,
    # Gzip's header (kombu 5.3+ writes it for "gzip"), or zlib's: wbits 32 + 15 reads either.
    "gzip": lambda: zlib.decompressobj(47),
    "bzip2": bz2.BZ2Decompressor,
    "lzma": lzma.LZMADecompressor,
}
#: Names kombu may know that no inflater here reads with a limit.
_REFUSED = ("brotli", "zstd")


def bound_decompression(limit: int) -> None:
    """Make kombu inflate a compressed body to at most ``limit`` bytes in this process.

    Called by the worker's consumer with the app's :func:`body_bytes`; the
    largest limit of the apps in a process wins. Compressing (the producer's
    side) is unchanged.
    """
    global _limit
    _bounds.append(limit)
    _limit = max(_bounds)
    for name in (*_INFLATERS, *_REFUSED):
        try:
            encoder, content_type = compression.get_encoder(name)
        except KeyError:  # not installed, or not known to this kombu
            continue
        inflater = _INFLATERS.get(name)
        decoder = _refusing(content_type) if inflater is None else _inflating(inflater, content_type)
        compression.register(encoder, decoder, content_type)


def _inflating(inflater: Callable[[], Any], content_type: str) -> Callable[[bytes], bytes]:
    def decode(body: bytes) -> bytes:
        inflated = _inflate(inflater(), bytes(body))
        # Raised here, not where the inflater lives: kombu keeps the error
        # (its traceback, frames and locals) on the message.
        if inflated is None:
            raise MessageTooLarge(f"its {content_type} body inflates past {_limit} bytes")
        if isinstance(inflated, list):
            raise ValueError(f"its {content_type} body is truncated or not {content_type}")
        return inflated

    return decode


def _inflate(reader: Any, data: bytes) -> bytes | list[bytes] | None:
    """``data`` inflated; None past the limit; a list when it ends before its end of stream."""
    pieces: list[bytes] = []
    size = 0
    # Small pieces: a refused body leaves no large block behind in the allocator.
    while True:
        piece = reader.decompress(data, _PIECE)
        # zlib hands back what it did not read; bz2 and lzma keep it.
        data = getattr(reader, "unconsumed_tail", b"")
        size += len(piece)
        if size > _limit:
            return None
        pieces.append(piece)
        if reader.eof:
            return b"".join(pieces)
        if not piece:
            return []


def _refusing(content_type: str) -> Callable[[bytes], bytes]:
    def decode(body: bytes) -> bytes:
        raise ValueError(f"its body is compressed with {content_type}, which this worker does not inflate")

    return decode
