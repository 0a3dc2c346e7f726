"""What logs and the dashboard show of client-controlled values: users, URLs, free text.

Every value a client controls (a user name, a URL, a request id, an
exception message quoting them) goes through here before it is logged or
shown, so that:

- a token never shows: users by a naming field only, URLs with secret-looking
  query values, path segments and userinfo masked (:data:`MASK`), JWT-shaped
  runs masked in any text;
- one value is one line: control characters are escaped as :func:`repr`
  escapes them (``\\n``, ``\\x1b``, ``\\u2028``), so no value forges a log line
  or a terminal escape;
- a value is cut at a bound.

The rules err on the side of masking: a harmless value shaped like a token
(a mixed-case identifier of 20 characters with digits) is masked too.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

#: What a masked value shows.
MASK = "***"
#: The longest user, URL and free text shown, in characters (escapes included).
USER_LIMIT = 100
URL_LIMIT = 500
TEXT_LIMIT = 500

#: Fields of a dict user that name it, tried in this order; no other field is ever shown.
USER_FIELDS = ("sub", "id", "user_id", "userId", "uid", "username", "login", "email", "name")

# A JWT, a JWE or an itsdangerous token: base64url JSON ('{"' is "eyJ") then a dot.
_JWT = re.compile(r"eyJ[A-Za-z0-9_=-]{2,}\.[A-Za-z0-9_.=-]*")
# Runs of a token alphabet (base64, base64url, hex); "/" and "." split them, so paths and host names do not match.
_RUN = re.compile(r"[A-Za-z0-9_+=~-]{20,}")
_HEX_LIKE = re.compile(r"[A-Za-z0-9]+=*")
# A whole value in standard base64 ("/" included), but not a path.
_BASE64 = re.compile(r"[A-Za-z0-9+][A-Za-z0-9+/]{19,}={0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Parts of names (query arguments, path parameters) whose values are secrets, anywhere in the name...
_SECRET_PART = re.compile(
    r"token|secret|passw|passcode|passphrase|pwd|jwt|credential|apikey|accesskey|privatekey|signature"
    r"|session|sessid|cookie|bearer|csrf|xsrf|saml",
    re.I,
)
# ... and whole words of a name ("api_key", "apiKey", "X-Auth": but not "keyword" nor "author").
_SECRET_WORDS = frozenset(
    "key auth authorization sig code sid otp pin nonce ticket hmac hash salt verifier assertion pass private".split()
)
# Between query arguments: "&", and ";" (which some servers still take).
_SEPARATOR = re.compile(r"([&;])")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")


def escaped(text: str) -> str:
    """``text`` with its JWT-shaped runs masked and its control characters escaped, on one line.

    Escapes as :func:`repr` does (``\\n``, ``\\x1b``, ``\\u202e``), but leaves
    printable characters, backslashes and quotes as they are.
    """
    text = _JWT.sub(MASK, text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown_text(value: Any, limit: int = TEXT_LIMIT) -> str:
    """``value`` as text (:func:`escaped`), cut at ``limit`` (its end then shows as ``...``)."""
    text = value if isinstance(value, str) else str(value)
    # Cut first (escaping only lengthens), with room for what masking shortens.
    shown = escaped(text[: limit * 4])
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def secret_name(name: str) -> bool:
    """Whether a query argument named ``name`` carries a secret (``token``, ``api_key``, ``X-Amz-Signature``...)."""
    if _SECRET_PART.search(name):
        return True
    words = _WORD_SPLIT.split(_CAMEL.sub(r"\1 \2", name).lower())
    return any(word in _SECRET_WORDS for word in words)


def secret_value(value: str) -> bool:
    """Whether ``value`` looks like a token, whatever it is named.

    JWT-shaped (``eyJ...`` with a dot), or with a run of 20 or more
    characters of a token alphabet (base64url, or the whole value in
    base64) that mixes upper case, lower case and digits, or 32 or more
    letters and digits of one case (a hex or base32 key). A UUID is an
    identifier, not a token: it shows. So does a path (``/Reports/2024``).
    """
    if _JWT.search(value):
        return True
    runs = _RUN.findall(value)
    if _BASE64.fullmatch(value):
        runs.append(value)
    for run in runs:
        if _UUID.fullmatch(run):
            continue
        lower = any(c.islower() for c in run)
        upper = any(c.isupper() for c in run)
        digit = any(c.isdigit() for c in run)
        if lower and upper and digit:
            return True
        if digit and (lower or upper) and len(run) >= 32 and _HEX_LIKE.fullmatch(run):
            return True
    return False


def shown_url(url: str | None, limit: int = URL_LIMIT) -> str | None:
    """``url`` with its secrets masked, on one line, cut at ``limit``.

    Masked: the userinfo (``user:password@``), the values of query (and
    fragment) arguments whose names look secret (:func:`secret_name`) or
    whose values look like tokens (:func:`secret_value`), and path segments
    that look like tokens. The rest shows as it was sent.
    """
    if not url:
        return url
    try:
        parts = urlsplit(escaped(url))  # escaped, not cut: masking may shorten it
    except ValueError:  # an unreadable netloc ("http://[x/"): nothing of it shows
        return "(unreadable)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    path = "/".join(MASK if secret_value(unquote(segment)) else segment for segment in parts.path.split("/"))
    query = _masked_pairs(parts.query)
    fragment = _masked_pairs(parts.fragment) if "=" in parts.fragment else _masked_segment(parts.fragment)
    shown = urlunsplit((parts.scheme, netloc, path, query, fragment))
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _masked_segment(segment: str) -> str:
    return MASK if segment and secret_value(unquote(segment)) else segment


def _masked_pairs(query: str) -> str:
    parts = _SEPARATOR.split(query)  # pairs, with the separators between them kept: ["a=1", "&", "b=2"]
    for i in range(0, len(parts), 2):
        name, equals, value = parts[i].partition("=")
        if equals and value and (secret_name(unquote(name.replace("+", " "))) or secret_value(unquote(value))):
            value = MASK
        elif not equals and secret_value(unquote(name)):  # a bare token: "?eyJ..." or "?<api key>"
            name = MASK
        parts[i] = f"{name}{equals}{value}"
    return "".join(parts)


def shown_user(value: Any, display: Callable[[Any], Any] | None = None) -> str | None:
    """What logs and the dashboard show of a dumped user: a name, never a token.

    ``display`` (the extension's user display hook), when given and it
    returns something other than ``None``, says what shows. Otherwise an int
    or a string shows as it is; a dict shows its first naming field
    (:data:`USER_FIELDS`: ``sub``, ``id``, ``username``, ``email``...) that
    holds an int or a string, and no other field; anything else shows as its
    type, ``<dict>``, ``<list>``. A JWT-shaped value shows as :data:`MASK`;
    every value is escaped and cut (:func:`shown_text`).
    """
    if value is None:
        return None
    if display is not None:
        try:
            shown = display(value)
            if shown is not None:
                return shown_text(shown, USER_LIMIT)
        except Exception as exc:  # the app's hook failed: its default, and a line saying so
            log.warning(
                "The user display hook failed (%s): showing the user by its naming field", shown_text(repr(exc))
            )
    if isinstance(value, dict):
        for field in USER_FIELDS:
            name = _scalar(value.get(field))
            if name is not None:
                return name
        return "<dict>"
    return _scalar(value) or f"<{type(value).__name__}>"


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return shown_text(value, USER_LIMIT)
