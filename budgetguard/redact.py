"""Text from outside made safe to print: caller-controlled strings and URLs with secrets.

Two rules for every log line and every message budgetguard prints:

- **Caller text is escaped.** A model name, user id, path or header value comes from a
  caller and may hold a newline (which would forge a second log record), other control
  characters or megabytes. :func:`printable` escapes control characters the way
  ``repr`` does and cuts the text to a bounded length, saying how long it was.
- **URLs lose their credentials.** A ``redis://user:password@host`` URL, a Slack webhook
  (whose path is the secret) or a URL with a token in its query string is printed by
  :func:`redact_url`: scheme, host and port kept, password, secret path and query values
  replaced by ``***``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["printable", "redact_url"]

#: What :func:`printable` keeps of a long text by default.
MAX_PRINTED = 200

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators, which
# some log viewers break lines on.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})

# Hosts whose URL path is itself the credential (a webhook URL is a bearer token).
_SECRET_PATH_HOSTS = ("hooks.slack.com", "events.pagerduty.com")


def printable(text: object, limit: int = MAX_PRINTED) -> str:
    """``text`` as one line: control characters escaped, cut to ``limit`` characters."""
    s = text if isinstance(text, str) else str(text)
    cut = len(s) > limit
    if cut:
        s = s[:limit]
    # surrogateescape'd bytes and lone surrogates print as escapes too.
    s = s.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{s}... ({len(text) if isinstance(text, str) else 'more'} characters)" if cut else s


def redact_url(url: str) -> str:
    """``url`` without its secrets: the password, a webhook's path, query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.netloc:  # memory://, a path: nothing but a query can hold a secret
        return printable(url.partition("?")[0], 500)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = hosts  # host:port, or a cluster's host:port list
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    host = hosts.rsplit(":", 1)[0] if hosts.count(":") == 1 else hosts
    path = parts.path
    if host.lower() in _SECRET_PATH_HOSTS and path not in ("", "/"):
        path = "/***"
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return printable(urlunsplit((parts.scheme, netloc, path, query, "")), 500)
