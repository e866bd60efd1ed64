"""Keep credentials inside the process: URLs without query strings, no secret GDAL keys.

Signed URLs (Planetary Computer SAS tokens, S3 presigned URLs) carry their credentials in
the query string, and GDAL options such as ``AWS_SECRET_ACCESS_KEY`` or
``GDAL_HTTP_HEADERS: "Authorization: Bearer …"`` are credentials themselves. Neither may
appear in a log line, an error message, or a file clc-dask writes (``run.yaml``, the
manifest, STAC provenance, reports). Everything that shows a URL goes through
:func:`public_url` or :func:`redact_text`; everything that stores options is checked with
:func:`credential_keys`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

#: Shown in place of a removed query string or credential.
REDACTED = "<redacted>"
#: Option names that carry credentials (matched case-insensitively anywhere in the name).
CREDENTIAL_KEY = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY|HEADERS|CREDENTIAL|SAS|SIGNATURE|AUTH",
                            re.IGNORECASE)
#: Names that match :data:`CREDENTIAL_KEY` but hold no secret.
NOT_CREDENTIALS = frozenset({"GDAL_HTTP_MAX_RETRY"})
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://|/vsi[a-z0-9_]+/)[^\s'\"<>]+")


def public_url(url: str) -> str:
    """``url`` as it may be shown: no query string, fragment or user info.

    ``https://acct.blob.core.windows.net/c/B04.tif?st=…&sig=…`` →
    ``https://acct.blob.core.windows.net/c/B04.tif?<redacted>``.
    """
    text = str(url)
    prefix = ""
    match = re.match(r"^(/vsi[a-z0-9_]+/)(.*)$", text)
    if match:
        prefix, text = match[1], match[2]
    try:
        parts = urlsplit(text)
    except ValueError:
        return prefix + text.split("?", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = REDACTED if parts.query else ""
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return prefix + shown + (f"?{query}" if query else "")


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`public_url`."""
    return _URL.sub(lambda m: public_url(m.group(0)), str(text))


def is_credential_key(name: str) -> bool:
    """True when an option called ``name`` may hold a credential."""
    return name.upper() not in NOT_CREDENTIALS and bool(CREDENTIAL_KEY.search(name))


def credential_keys(names: Iterable[str]) -> list[str]:
    """The credential-bearing names among ``names`` (in the order given)."""
    return [n for n in names if is_credential_key(str(n))]


class RedactingFilter(logging.Filter):
    """A logging filter that strips query strings from URLs in every record it passes.

    The message is formatted once (``record.getMessage()``) and stored without arguments,
    so a URL passed as an argument is redacted as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a :class:`RedactingFilter` to ``logger``'s handlers (default: the root logger's),
    once; returns the filter."""
    logger = logger or logging.getLogger()
    for existing in logger.filters:
        if isinstance(existing, RedactingFilter):
            return existing
    flt = RedactingFilter()
    logger.addFilter(flt)
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
