"""Keep credentials inside the process: URLs without query strings, no secret GDAL keys.

Signed URLs (Planetary Computer SAS tokens, S3 presigned URLs) carry their credentials in
the query string, and GDAL options such as ``AWS_SECRET_ACCESS_KEY`` or
``GDAL_HTTP_HEADERS: "Authorization: Bearer …"`` are credentials themselves. Neither may
appear in a log line, an error message, or a file clc-dask writes (``run.yaml``, the
manifest, STAC provenance, reports):

* everything that shows a URL goes through :func:`public_url` or :func:`redact_text`;
* everything that stores a URL (saved item collections) goes through :func:`unsigned_url`;
* options that would be recorded are checked with :func:`credential_options`, and refused
  with :func:`credential_advice`: credentials belong in environment variables, which GDAL
  reads and clc-dask never writes anywhere;
* :func:`install_log_redaction` passes every log record of the process through
  :class:`RedactingFilter` (the CLI and clc-dask's Dask workers install it), so that a
  library logging a signed URL (GDAL, rasterio, stackstac) is redacted too.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

#: Shown in place of a removed query string or credential.
REDACTED = "<redacted>"
#: Option names that carry credentials (matched case-insensitively anywhere in the name), e.g.
#: ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``GDAL_HTTP_HEADERS``, ``GDAL_HTTP_USERPWD``,
#: ``GDAL_HTTP_BEARER``, ``AZURE_STORAGE_CONNECTION_STRING``, ``AZURE_SAS``.
CREDENTIAL_KEY = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|USERPWD|KEY|HEADERS|CREDENTIAL|SAS|SIGNATURE|AUTH|BEARER|COOKIE"
    r"|CONNECTION_STRING",
    re.IGNORECASE,
)
#: Names that match :data:`CREDENTIAL_KEY` but hold no secret (``GDAL_HTTP_AUTH`` names an
#: authentication method: BASIC, BEARER …; the others are paths of the login session).
NOT_CREDENTIALS = frozenset({"GDAL_HTTP_AUTH", "SSH_AUTH_SOCK", "XAUTHORITY"})
#: Query parameters that make a URL signed (matched case-insensitively anywhere in the name):
#: ``sig`` (Azure SAS), ``X-Amz-Signature``/``X-Amz-Credential``/``X-Amz-Security-Token``
#: (S3), ``X-Goog-Signature`` (GCS), ``Signature``/``Key-Pair-Id``/``Policy`` (CloudFront),
#: ``token``, ``access_token``, ``key``, ``subscription-key``, ``password`` …
SIGNED_QUERY_KEY = re.compile(r"sig|token|key|secret|passw|pwd|credential|auth|policy|sas",
                              re.IGNORECASE)
#: Environment values shorter than this are not searched for in messages (``YES``, ``1`` …).
MIN_SECRET_LENGTH = 8

# a URL ends at a space, a quote, <, > or a closing bracket (``GetFileSize(https://…?sig=…)=42``)
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://|/vsi[a-z0-9_]+/)[^\s'\"<>)\]}]+")
_VSI_PREFIX = re.compile(r"^(/vsi[a-z0-9_]+/)(.*)$")
# a query string after a bare file name (GDAL says ``B04.tif?sig=…, band 1: …``)
_BARE_QUERY = re.compile(r"(?<=[^\s'\"?=&])\?[^\s'\"<>?]*=[^\s'\"<>]*")
# ``sig=…`` or ``X-Amz-Signature=…`` outside a URL (e.g. a SAS token quoted on its own)
_SECRET_PAIR = re.compile(
    r"(?i)\b((?:[\w-]*(?:sig|signature|token|credential|secret|password)[\w-]*"
    r"|subscription-key|api[_-]?key|accountkey)=)([^&;\s'\"<>]+)"
)
# a quoted name and value, as in JSON or a Python repr: ``'token': 'st=…&sig=…'``
_QUOTED_SECRET = re.compile(
    r"(?i)((['\"])[\w.-]*(?:sig|signature|token|credential|secret|passw|auth|[_-]key|apikey)[\w.-]*\2"
    r"\s*[:=]\s*)(['\"])[^'\"]*\3"
)
# ``Authorization: …`` (to the end of the line or quote) and ``Bearer …`` tokens
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization\s*:\s*)[^\r\n'\"]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{4,}")
_HEADER_LINE = re.compile(
    r"(?i)\b(?:(?:proxy-)?authorization|cookie|x-api-key|ocp-apim-subscription-key)\s*:|\bbearer\s+\S"
)


# --------------------------------------------------------------------------- URLs
def public_url(url: str) -> str:
    """``url`` as it may be shown: no query string, fragment or user info.

    ``https://acct.blob.core.windows.net/c/B04.tif?st=…&sig=…`` →
    ``https://acct.blob.core.windows.net/c/B04.tif?<redacted>``.
    """
    prefix, text = _split_vsi(str(url))
    try:
        parts = urlsplit(text)
    except ValueError:
        return prefix + text.split("?", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    shown = prefix + urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query:
        return f"{shown}?{REDACTED}"
    return shown + ("?" if "?" in text else "")  # so that redacting twice changes nothing


def is_signed_url(url: str) -> bool:
    """True when ``url`` carries a credential: user info with a password, or a query
    parameter named like a signature or token (:data:`SIGNED_QUERY_KEY`)."""
    _, text = _split_vsi(str(url))
    try:
        parts = urlsplit(text)
    except ValueError:
        return "?" in text
    if ":" in parts.netloc.rpartition("@")[0]:
        return True
    return any(SIGNED_QUERY_KEY.search(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True))


def unsigned_url(url: str) -> str:
    """``url`` as it may be stored: a signed query string (:func:`is_signed_url`) and user
    info removed, any other query kept (``…/B04.tif?st=…&sig=…`` → ``…/B04.tif``)."""
    prefix, text = _split_vsi(str(url))
    if not is_signed_url(url):
        return prefix + text
    try:
        parts = urlsplit(text)
    except ValueError:
        return prefix + text.split("?", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return prefix + urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))


def _split_vsi(text: str) -> tuple[str, str]:
    match = _VSI_PREFIX.match(text)
    return (match[1], match[2]) if match else ("", text)


# --------------------------------------------------------------------------- free text
def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`public_url`, the query strings GDAL
    appends to bare file names in its messages removed, ``sig=…``/``token=…``
    pairs, ``Authorization:`` values and ``Bearer`` tokens replaced, and the values of
    credential-bearing environment variables (:func:`environment_secrets`) removed."""
    clean = _URL.sub(lambda m: public_url(m.group(0)), str(text))
    clean = _BARE_QUERY.sub(f"?{REDACTED}", clean)
    clean = _SECRET_PAIR.sub(lambda m: m[1] + REDACTED, clean)
    clean = _QUOTED_SECRET.sub(lambda m: f"{m[1]}{m[3]}{REDACTED}{m[3]}", clean)
    clean = _AUTH_HEADER.sub(lambda m: m[1] + REDACTED, clean)
    clean = _BEARER.sub(lambda m: m[1] + REDACTED, clean)
    for secret in environment_secrets():
        clean = clean.replace(secret, REDACTED)
    return clean


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the credential-bearing variables (:func:`is_credential_key`) in the process
    environment (or ``environ``), longest first, ignoring those shorter than
    :data:`MIN_SECRET_LENGTH` characters."""
    env = os.environ if environ is None else environ
    values = {env.get(k, "") for k in list(env) if is_credential_key(k)}  # names first: cheaper
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


# --------------------------------------------------------------------------- options
@functools.lru_cache(maxsize=4096)  # asked for every environment variable of every log record
def is_credential_key(name: str) -> bool:
    """True when an option called ``name`` may hold a credential."""
    return name.upper() not in NOT_CREDENTIALS and bool(CREDENTIAL_KEY.search(name))


def credential_keys(names: Iterable[str]) -> list[str]:
    """The credential-bearing names among ``names`` (in the order given)."""
    return [n for n in names if is_credential_key(str(n))]


def looks_like_credential(value: object) -> bool:
    """True when an option value holds a credential whatever its name: an HTTP
    ``Authorization``/``Cookie`` header, a ``Bearer`` token, or a URL with a password or a
    signed query string (``GDAL_HTTP_PROXY=http://user:password@proxy:3128``)."""
    text = str(value)
    if _HEADER_LINE.search(text):
        return True
    return any(is_signed_url(m.group(0)) for m in _URL.finditer(text))


def credential_options(options: Mapping[str, object]) -> list[str]:
    """Names of the options that carry credentials, by name or by value (in the order given)."""
    return [str(k) for k, v in options.items() if is_credential_key(str(k)) or looks_like_credential(v)]


def credential_advice(names: Iterable[str]) -> str:
    """Why credential options are refused and what to do instead (names only, never values)."""
    names = list(names)
    example = names[0] if names else "AWS_SECRET_ACCESS_KEY"
    one = len(names) == 1
    return (
        f"{', '.join(names)} {'carries a credential' if one else 'carry credentials'}, and "
        "options given here are recorded (run.yaml, STAC provenance, logs): remove "
        f"{'it' if one else 'them'} and set {'it as an environment variable' if one else 'them as environment variables'} "
        f"instead (export {example}=…); GDAL reads credentials from the process environment, "
        "which clc-dask never writes anywhere"
    )


# --------------------------------------------------------------------------- logging
class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's text through :func:`redact_text`.

    The message is formatted once (``record.getMessage()``) and stored without arguments,
    so a URL passed as an argument is redacted as well; the traceback (``exc_info``) and
    ``stack_info`` are formatted and redacted too.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        if record.args is None and getattr(record, "_clc_dask_redacted", None) == record.msg:
            return True  # already done (records pass the factory, then the handlers)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep its parts, redacted
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record._clc_dask_redacted = record.msg  # type: ignore[attr-defined]
        return True


_REDACTING_FACTORY = "_clc_dask_redacting"


def install_log_redaction() -> RedactingFilter:
    """Redact every log record this process makes from now on; returns the filter.

    The :class:`RedactingFilter` runs where records are made (a wrapped log-record factory),
    so it reaches every handler — those added later (pytest's ``caplog``), those of loggers
    that do not propagate (``distributed``'s) and Python's last-resort handler — and it is
    also added to the root logger's handlers, for records made elsewhere and handed to them.
    Calling it again does nothing more.
    """
    factory = logging.getLogRecordFactory()
    flt: RedactingFilter | None = getattr(factory, _REDACTING_FACTORY, None)
    if flt is None:
        flt = RedactingFilter()
        logging.setLogRecordFactory(_redacting_factory(factory, flt))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt


def _redacting_factory(make: Callable[..., logging.LogRecord],
                       flt: RedactingFilter) -> Callable[..., logging.LogRecord]:
    def make_redacted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        flt.filter(record)
        return record

    setattr(make_redacted, _REDACTING_FACTORY, flt)
    return make_redacted
