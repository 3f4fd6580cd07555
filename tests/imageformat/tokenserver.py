"""A minimal registry token server (the Docker token authentication protocol) for tests.

docker-registry, configured with `auth: token`, answers anonymous requests with a Bearer
challenge naming this server's realm; this server checks Basic credentials and issues an
RS256 JWT whose `x5c` header carries a self-signed certificate that the registry trusts
through `rootcertbundle`. The registry verifies every token for real.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ISSUER, SERVICE = "warmstart-test-issuer", "warmstart-test-registry"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, folder, users: dict[str, str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users, self.issued = users, 0
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warmstart test token")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = os.path.join(str(folder), "token-cert.pem")
        with open(self.bundle, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server._answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def registry_config(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.bundle}\n")

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        user = None
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                h.send_response(401)
                h.end_headers()
                return
            user = name
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            if kind == "repository" and user is not None:  # anonymous users get nothing
                access.append({"type": kind, "name": repo, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user or "", "aud": query.get("service", [""])[0],
                  "exp": now + 600, "nbf": now - 60, "iat": now, "jti": _b64(os.urandom(12)),
                  "access": access}
        token = self._sign(claims)
        self.issued += 1
        body = json.dumps({"token": token, "expires_in": 600}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
