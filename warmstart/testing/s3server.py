"""Start an S3-compatible server on 127.0.0.1 for tests and benchmarks.

Three servers from PyPI run here: `localbucket` (fast ranged GETs, no auth), `nanio` (checks
SigV4 signatures) and `moto` (whole API, but reads the whole object on each ranged GET, so
small objects only). Each runs as a child process on a free port and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = ("localbucket", "nanio", "moto")
ACCESS_KEY = "warmstart-test-key"
SECRET_KEY = "warmstart-test-secret-0123456789"


def stop_process(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Terminates a server child, killing it if it has not exited after `grace` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class S3Server:
    kind: str
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: str | None = None
    data_dir: str | None = None
    """The folder the server keeps objects in, as `bucket/key` (localbucket and nanio)."""

    def env(self) -> dict[str, str]:
        """Environment variables that point the AWS credential chain at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        """A plain (sync) botocore S3 client for setting up buckets and objects."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, bucket: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {
                "BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    def upload_file(self, path: str | os.PathLike, bucket: str, key: str) -> None:
        client = self.client()
        size = os.path.getsize(path)
        part = 64 << 20
        with open(path, "rb") as f:
            if size <= part:
                client.put_object(Bucket=bucket, Key=key, Body=f.read())
                return
            upload = client.create_multipart_upload(Bucket=bucket, Key=key)
            parts = []
            for number in range(1, (size + part - 1) // part + 1):
                resp = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                    PartNumber=number, Body=f.read(part),
                )
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                MultipartUpload={"Parts": parts},
            )

    def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_tree(self, folder: str | os.PathLike, bucket: str, prefix: str) -> None:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                self.upload_file(path, bucket, f"{prefix.rstrip('/')}/{path.name}".lstrip("/"))

    def stop(self) -> None:
        stop_process(self.process)
        if self.log_path:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(kind: str, port: int, data_dir: str,
             host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if kind == "localbucket":
        return [sys.executable, "-m", "localbucket", "--host", host, "--port", str(port),
                data_dir], env
    if kind == "nanio":
        env.update(NANIO_ACCESS_KEY=ACCESS_KEY, NANIO_SECRET_KEY=SECRET_KEY)
        return [sys.executable, "-m", "nanio", "serve", "--host", host, "--port",
                str(port), "--data-dir", data_dir, "--no-access-log", "--log-level",
                "warning"], env
    if kind == "moto":
        return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], env
    raise ValueError(f"unknown S3 server kind {kind!r}; choose one of {SERVERS}")


def start_server(kind: str = "localbucket", data_dir: str | None = None,
                 timeout: float = 30.0) -> S3Server:
    """Starts `kind` on a free 127.0.0.1 port and waits until it answers HTTP."""
    data_dir = data_dir or tempfile.mkdtemp(prefix=f"warmstart-{kind}-")
    port = free_port()
    cmd, env = _command(kind, port, data_dir)
    # The servers log every request: to a file, never to a pipe nobody drains (a full pipe
    # blocks the server mid-request).
    log = tempfile.NamedTemporaryFile(prefix=f"warmstart-{kind}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = S3Server(kind=kind, endpoint=f"http://127.0.0.1:{port}", process=proc,
                      log_path=log.name, data_dir=data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = Path(log.name).read_text(errors="replace")
            raise RuntimeError(f"{kind} exited with {proc.returncode} at start: {err[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=1).close()
            return server
        except urllib.error.HTTPError:
            return server  # any HTTP answer (403 without auth) means it is up
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{kind} did not answer on {server.endpoint} within {timeout:.0f}s")


@contextlib.contextmanager
def running_server(kind: str = "localbucket", data_dir: str | None = None):
    server = start_server(kind, data_dir)
    try:
        yield server
    finally:
        server.stop()
