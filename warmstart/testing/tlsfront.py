"""An https:// endpoint for tests and benchmarks: nginx (Debian's) on 127.0.0.1 terminating TLS
in front of a local S3 server, with a CA generated for it.

Two shapes, as real object storage has them:

  static=True   nginx serves GET/HEAD (with ranges) of `bucket/key` straight from the S3
                server's data folder and proxies everything else (requests with a query
                string, such as ListObjectsV2, and writes) to the S3 server. Authentication is
                not checked on the static path; this is the fast rig the benchmark uses.
  static=False  nginx proxies every request, so the S3 server (nanio checks SigV4) answers
                all of them, errors included.

    front = start_tls_front(server, workdir)            # server: an S3Server
    front.env()   # AWS_ENDPOINT_URL=https://localhost:PORT, AWS_CA_BUNDLE=<the CA>, keys
    front.stop()

The certificate names `localhost` and 127.0.0.1; clients connect to `localhost`, so SNI and
host-name checks are exercised. `nginx_missing()` says why it cannot run, or None.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.testing.s3server import S3Server, free_port, stop_process

NGINX = "/usr/sbin/nginx"

CONF = """\
daemon off;
worker_processes {workers};
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    types {{ }}
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_max_body_size 0;
    output_buffers 2 1m;
    # everything but a plain GET/HEAD (a query string: listings, uploads) goes to the S3 server
    map "$request_method:$args" $to_upstream {{ default 1; "~^(GET|HEAD):$" {static_flag}; }}
    upstream s3 {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/server.pem;
        ssl_certificate_key {dir}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:warmstart:4m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 300s;
        location / {{
            if ($to_upstream) {{ proxy_pass http://s3; }}
            root {data};
        }}
    }}
}}
"""


def nginx_missing() -> str | None:
    if not os.path.exists(NGINX) and not shutil.which("nginx"):
        return "nginx is not installed (Debian package nginx)"
    return None


def make_ca(folder: str | os.PathLike, names: tuple[str, ...] = ("localhost",),
            ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str, str]:
    """A fresh CA and a server certificate it signed: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("warmstart test CA"))
          .issuer_name(name("warmstart test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i))
                                               for i in ips]
    cert = (x509.CertificateBuilder().subject_name(name(names[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


@dataclass
class TlsFront:
    endpoint: str
    ca_bundle: str
    upstream: S3Server
    static: bool
    folder: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {**self.upstream.env(), "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_CA_BUNDLE": self.ca_bundle}

    def url(self, bucket: str, key: str) -> str:
        """The plain https URL of an object (static fronts serve it without signing)."""
        return f"{self.endpoint}/{bucket}/{key}"

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_tls_front(upstream: S3Server | str, folder: str | os.PathLike, *, static: bool = True,
                    data_dir: str | None = None, workers: int = 2,
                    timeout: float = 20.0) -> TlsFront:
    """nginx on a free port in front of `upstream` (an S3Server, or an http:// endpoint with
    `data_dir` given); waits until TLS handshakes succeed."""
    why = nginx_missing()
    if why:
        raise RuntimeError(why)
    if isinstance(upstream, str):
        upstream = S3Server(kind="external", endpoint=upstream, data_dir=data_dir)
    data = data_dir or upstream.data_dir
    if static and not data:
        raise ValueError("a static TLS front needs the S3 server's data folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, _, _ = make_ca(folder)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(CONF.format(
        workers=workers, dir=folder, port=port, upstream=upstream.endpoint.split("://", 1)[1],
        data=data or folder, static_flag=0 if static else 1,
        # the S3 servers write objects mode 600: workers must read them as their owner
        user="user root;" if os.geteuid() == 0 else ""))
    log = open(folder / "stderr.log", "wb")
    proc = subprocess.Popen([shutil.which("nginx") or NGINX, "-p", str(folder), "-c", str(conf),
                             "-e", str(folder / "error.log")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    front = TlsFront(f"https://localhost:{port}", ca, upstream, static, str(folder), proc)
    ctx = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (folder / "stderr.log").read_text(errors="replace")
            err += (folder / "error.log").read_text(errors="replace") \
                if (folder / "error.log").exists() else ""
            raise RuntimeError(f"nginx exited with {proc.returncode}: {err[-2000:]}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost"):
                    return front
        time.sleep(0.05)
    front.stop()
    raise RuntimeError(f"nginx did not answer TLS on port {port} within {timeout:.0f}s")
