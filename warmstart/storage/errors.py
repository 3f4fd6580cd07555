"""The one error table: what an S3 or HTTP answer means, as warmstart's exception tree.

Every object-store path (the loader's sources, the image store, the Ray gateway, the ranged-GET
data path) maps failures here, so a 429 is retried everywhere and an expired token is an
`AccessDenied` everywhere.

| answer                                                      | raised            |
|-------------------------------------------------------------|-------------------|
| 404, NoSuchKey, NoSuchBucket, NoSuchUpload                  | NotFound          |
| 401, 403, AccessDenied, InvalidAccessKeyId,                 | AccessDenied      |
|   SignatureDoesNotMatch, ExpiredToken, InvalidToken, ...    |                   |
| 429, 500, 502, 503, 504, SlowDown, Throttling, ...          | Retryable         |
| resets, timeouts, bodies cut short                          | Retryable         |
| no connection to the endpoint: metadata calls (HEAD, LIST)  | EndpointUnreachable (not retried) |
| no connection on a data read (the server restarting)        | Retryable         |
| 3xx (redirects are refused: the signature names one host)   | SourceError       |
| 416, InvalidRange                                           | RangeNotSatisfiable |
| anything else (400, 405, ...)                               | SourceError       |
"""

from __future__ import annotations

import asyncio
import errno
import xml.etree.ElementTree as ET

from warmstart.errors import (AccessDenied, EndpointUnreachable, NotFound, RangeNotSatisfiable,
                              Retryable,
                              SourceError, WarmstartError)

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                          "ExpiredToken", "TokenRefreshRequired", "InvalidToken",
                          "AllAccessDisabled", "RequestTimeTooSkewed", "AuthorizationHeaderMalformed",
                          "AccountProblem", "InvalidObjectState", "401", "403"})
RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                         "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                         "TooManyRequests", "RequestThrottled", "BandwidthLimitExceeded",
                         "OperationAborted"})
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def s3_error_fields(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body; empty strings when there is none."""
    try:
        root = ET.fromstring(body) if body.strip() else None
    except ET.ParseError:
        return "", ""
    if root is None:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def error_for_answer(status: int, code: str, message: str, what: str) -> SourceError:
    """The exception for an HTTP status plus (when the server sent one) an S3 error code."""
    detail = f"HTTP {status}" if status else "error"
    detail += (f" {code}" if code and code != str(status) else "")
    detail += f": {message}" if message else ""
    if code in NOT_FOUND_CODES or (status == 404 and code not in DENIED_CODES):
        return NotFound(errno.ENOENT, f"{what}: not found ({detail})")
    if code in DENIED_CODES or status in (401, 403):
        return AccessDenied(errno.EACCES, f"{what}: access denied ({detail})")
    if code in RETRY_CODES or status in RETRY_STATUSES or status >= 500:
        return Retryable(errno.EAGAIN, f"{what}: transient server error ({detail})")
    if status == 416 or code == "InvalidRange":
        return RangeNotSatisfiable(errno.EINVAL, f"{what}: range past the end ({detail})")
    if 300 <= status < 400:
        return SourceError(errno.EPROTO, f"{what}: redirect refused ({detail}); point the "
                                         f"endpoint at the object's own host and region")
    return SourceError(errno.EIO, f"{what}: request failed ({detail})")


def error_for_body(status: int, body: bytes, what: str) -> SourceError:
    code, message = s3_error_fields(body)
    return error_for_answer(status, code, message, what)


def map_client_error(exc: BaseException, what: str) -> WarmstartError:
    """botocore/aiohttp/socket failures as warmstart's tree (already-mapped ones pass)."""
    if isinstance(exc, WarmstartError):
        return exc
    import botocore.exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return AccessDenied(errno.EACCES, f"{what}: no usable AWS credentials ({exc}; set "
                                          f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                                          f"or an instance role)")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return error_for_answer(status, str(err.get("Code", "")), str(err.get("Message", "")),
                                what)
    if isinstance(exc, bx.SSLError):
        return SourceError(errno.EPROTO, f"{what}: TLS failed ({exc}; set AWS_CA_BUNDLE to "
                                         f"the CA that signed the endpoint's certificate)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return EndpointUnreachable(errno.ECONNREFUSED, f"{what}: endpoint unreachable ({exc})")
    if isinstance(exc, (bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError,
                        bx.ConnectionClosedError, ConnectionError, asyncio.TimeoutError,
                        TimeoutError)):
        return Retryable(errno.EAGAIN, f"{what}: transient failure ({exc})")
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return Retryable(errno.EAGAIN, f"{what}: transient failure ({exc})")
    except ImportError:  # pragma: no cover - aiobotocore always brings aiohttp
        pass
    return SourceError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")
