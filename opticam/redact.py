"""Credentials out of URLs: before a URL is stored, hashed into a name, printed or logged.

A shard URL may carry a secret: ``https://user:password@host/shard.tar``, or a signed
URL's query (``?X-Amz-Signature=...``, an Azure SAS ``sig=...``, ``token=...``). The
library keeps the real URL only where it reads the data; everything that leaves the
process (``run.json``, the Parquet ``shard`` column, file names and run ids, error
messages, logs, progress lines, Prefect names) goes through :func:`redact_url` or
:func:`redact_text` first. The redacted spelling is stable, so names and run ids hashed
from it do not depend on the password.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "is_secret_parameter", "redact_text", "redact_url"]

#: What a secret is replaced with.
REDACTED = "***"

# Query parameters that carry a credential: AWS SigV4 presigned URLs, Azure SAS, GCS
# signed URLs, and the usual token/key/password names.
_SECRET_PARAMETER = re.compile(
    r"(^|[-_.])(signature|sig|token|access[-_]?token|password|passwd|pwd|secret|"
    r"credential|api[-_]?key|apikey|key|auth|session[-_]?token|security[-_]?token)$",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def is_secret_parameter(name: str) -> bool:
    """Whether a query parameter name carries a credential (``X-Amz-Signature``, ``sig``...)."""
    return bool(_SECRET_PARAMETER.search(name))


def redact_url(url: str) -> str:
    """``url`` without credentials: userinfo and secret query values become ``***``.

    ``https://ann:pw@host/a.tar?sig=abc&v=1`` -> ``https://***@host/a.tar?sig=***&v=1``.
    Local paths and URLs without credentials come back unchanged (same string).
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: leave nothing that looks like userinfo
        return re.sub(r"//[^/@]*@", f"//{REDACTED}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_parameter(k) for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if is_secret_parameter(k) else v) for k, v in pairs], safe="*"
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (error messages, log lines)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
