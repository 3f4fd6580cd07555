"""Fixtures shared by all of warmstart's tests: local S3-compatible servers on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def _server(kind: str, tmp_path_factory):
    from warmstart.testing.s3server import start_server

    try:
        server = start_server(kind, str(tmp_path_factory.mktemp(kind)))
    except (RuntimeError, ModuleNotFoundError) as exc:  # pragma: no cover - install problem
        pytest.fail(f"could not start the {kind} S3 server: {exc}")
    return server


@pytest.fixture(scope="session")
def localbucket(tmp_path_factory):
    server = _server("localbucket", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nanio(tmp_path_factory):
    server = _server("nanio", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    server = _server("moto", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(params=["localbucket", "nanio"])
def s3(request, monkeypatch):
    """Each S3 test runs against two servers: one fast without auth, one checking SigV4."""
    server = request.getfixturevalue(request.param)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture(scope="session")
def tls_front(tmp_path_factory):
    """Starts nginx TLS fronts (127.0.0.1, a CA generated per front) on demand:
    `tls_front(server, static=True)`; skips the test when nginx is not installed."""
    from warmstart.testing.tlsfront import nginx_missing, start_tls_front

    fronts = []

    def start(upstream, static: bool = True, data_dir: str | None = None):
        why = nginx_missing()
        if why:
            pytest.skip(why)
        front = start_tls_front(upstream, tmp_path_factory.mktemp("tls"), static=static,
                                data_dir=data_dir)
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()
