"""One exception tree for all of warmstart.

Every error the library raises on purpose is a `WarmstartError`. Leaves also inherit the
builtin a caller would already catch (`NotFound` is a `FileNotFoundError`, `AccessDenied` a
`PermissionError`), so code written against plain Python keeps working. Whether an error is
worth retrying is decided by its class (`Retryable`), never by matching message text.
"""

from __future__ import annotations


class WarmstartError(Exception):
    """Root of every error warmstart raises on purpose."""


class ConfigError(WarmstartError, ValueError):
    """A configuration value or key is invalid."""


class MissingDependency(WarmstartError, ImportError):
    """An optional package or tool this feature needs is not installed; the message names
    how to install it."""


class OperationTimeout(WarmstartError, TimeoutError):
    """A synchronous call ran past its timeout; the operation was cancelled."""


# --- bad checkpoint files -------------------------------------------------------------


class FormatError(WarmstartError, ValueError):
    """A file does not follow the format it claims (safetensors header, shard index)."""


class TruncatedFile(FormatError):
    """The file ends before its header or data does."""


class HeaderTooLarge(FormatError):
    """The declared header length exceeds the file or the safety cap."""


class InvalidHeader(FormatError):
    """The header is not UTF-8, not JSON, or not shaped like a safetensors header."""


class UnknownDtype(FormatError):
    """A tensor declares a dtype warmstart does not know."""


class ShapeMismatch(FormatError):
    """A tensor's shape and dtype disagree with its byte length."""


class BadOffsets(FormatError):
    """Tensor offsets are out of range, overlap, leave holes, or do not end with the data."""


class ShardIndexError(FormatError):
    """A sharded checkpoint index is malformed or disagrees with its shards."""


class DuplicateTensor(FormatError):
    """The same tensor name appears twice across a checkpoint's files."""


class MissingTensor(WarmstartError, KeyError):
    """A tensor that was asked for is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


# --- storage ----------------------------------------------------------------------------


class SourceError(WarmstartError, OSError):
    """Reading from a storage backend failed."""


class NotFound(SourceError, FileNotFoundError):
    """A file, bucket, key or prefix does not exist."""


class AccessDenied(SourceError, PermissionError):
    """Credentials are missing, wrong, or not allowed to read the object."""


class EndpointUnreachable(SourceError, ConnectionError):
    """The storage endpoint cannot be reached at all."""


class RangeNotSatisfiable(SourceError):
    """A read asked for bytes past the end of an object (HTTP 416)."""


class Retryable(SourceError):
    """A transient failure (5xx, throttling, reset, short body); the same read may succeed."""


class RetriesExhausted(SourceError):
    """A transient failure kept happening past the retry bound."""


class IntegrityError(WarmstartError):
    """Bytes do not match the digest they were promised to have."""


class CorruptRead(Retryable, IntegrityError):
    """Bytes read do not match their block sum (`verify=True`); reading again may fix it."""


# --- native and device ------------------------------------------------------------------


class NativeError(WarmstartError, RuntimeError):
    """The native core reported a failure (allocation, CUDA call)."""


class CudaUnavailable(NativeError):
    """A CUDA device was asked for but no CUDA driver/runtime is usable."""


# --- container images (imageformat/) ----------------------------------------------------


class ImageFormatError(FormatError):
    """An image manifest, TOC, chunk index, profile or layer tar is malformed."""


class UnsupportedVersion(ImageFormatError):
    """An image document declares a version or media type warmstart does not know."""


class UnsafeEntry(ImageFormatError):
    """An entry's path or link target is absolute, has `..`, or escapes the image root."""


class DuplicateEntry(ImageFormatError):
    """The same path appears twice in a TOC (or entries are out of order)."""


class SizeMismatch(ImageFormatError):
    """A file's size disagrees with the sum of its chunk sizes."""


class FieldTooLarge(ImageFormatError):
    """A document or one of its fields exceeds its safety cap."""


class LayerTooLarge(FieldTooLarge):
    """A layer decompresses past the image's uncompressed-bytes limit or its ratio bound."""


class DigestMismatch(IntegrityError):
    """A chunk, blob, TOC or manifest does not hash to the digest that names it."""
