"""Storage URIs, chosen by scheme: a local path (`/path`, `file://path`), an S3 object or
prefix (`s3://bucket/key`), or a plain web URL (`https://host/path`, `http://...`)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from warmstart.errors import ConfigError, NotFound


@dataclass(frozen=True)
class LocalUri:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        return parse_s3(uri)

    def child(self, name: str) -> "S3Uri":
        return S3Uri(self.bucket, f"{self.key.rstrip('/')}/{name}".lstrip("/"))


@dataclass(frozen=True)
class HttpUri:
    """A plain web object (a presigned URL, any web server or CDN); the query is kept."""

    url: str

    def __str__(self) -> str:
        return self.url


Uri = LocalUri | S3Uri | HttpUri


def parse_s3(uri: str) -> S3Uri:
    if not uri.startswith("s3://"):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise NotFound(errno.ENOENT, f"{uri}: no bucket in the URI")
    return S3Uri(bucket, key)


def parse_uri(uri: str | os.PathLike) -> Uri:
    """One of LocalUri, S3Uri, HttpUri; an unknown scheme is a ConfigError naming it."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        return parse_s3(text)
    if text.startswith(("http://", "https://")):
        if not urlsplit(text).hostname:
            raise ConfigError(f"{text[:100]}: no host in the URL")
        return HttpUri(text)
    if text.startswith("file://"):
        return LocalUri(os.path.expanduser(unquote(text[len("file://"):])))
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme:
        raise ConfigError(f"{text[:100]}: unsupported scheme {scheme!r} (use a path, file://, "
                          f"s3://, http:// or https://)")
    return LocalUri(os.path.expanduser(text))
