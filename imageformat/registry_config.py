"""Registry settings: where credentials come from and how an image reference is spelled.

`RegistryOptions.from_env` is the one place that reads the environment for registries: the
auth file is `REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json` (docker and podman/skopeo write the same `auths` format).
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field

from warmstart.errors import ConfigError, NotFound

_REF = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                  r"[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DOCKER_HUB = ("index.docker.io", "registry-1.docker.io", "docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None


@dataclass(frozen=True)
class RegistryOptions:
    plain_http: bool = False  # http:// instead of https:// (local registries)
    auths: dict = field(default_factory=dict)  # host -> Credentials
    timeout: float = 60.0
    attempts: int = 4
    ca_file: str | None = None

    @classmethod
    def from_env(cls, env: dict | None = None, *, plain_http: bool = False,
                 auth_file: str | None = None) -> "RegistryOptions":
        env = os.environ if env is None else env
        path = auth_file or env.get("REGISTRY_AUTH_FILE")
        if path is None:
            base = env.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
            path = os.path.join(base, "config.json")
            if not os.path.isfile(path):
                return cls(plain_http)
        return cls(plain_http, load_auth_file(path))


def load_auth_file(path: str) -> dict[str, Credentials]:
    """Reads the `auths` of a docker config.json / containers auth.json: host -> credentials.
    Credential helpers (`credsStore`, `credHelpers`) are not run."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        raise NotFound(f"{path}: no such registry auth file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable auth file ({exc})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    out = {}
    for key, entry in (auths or {}).items():
        if not isinstance(entry, dict):
            continue
        host = urllib.parse.urlsplit(key).netloc if "://" in key else key.split("/")[0]
        user = entry.get("username")
        password = entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                raw = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raw = ""
            if ":" not in raw:
                raise ConfigError(f"{path}: auth of {key!r} is not base64 user:password")
            user, _, password = raw.partition(":")
        creds = Credentials(user, password, entry.get("identitytoken") or None)
        out[host] = creds
        if host in DOCKER_HUB:  # `docker login` files Docker Hub under its old index URL
            for alias in DOCKER_HUB:
                out.setdefault(alias, creds)
    return out


@dataclass(frozen=True)
class Reference:
    """`[docker://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]`."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, need_host: bool = True) -> "Reference":
        rest = text.removeprefix("docker://")
        host, _, path = rest.partition("/")
        if not host or not path or ("." not in host and ":" not in host
                                    and host != "localhost"):
            raise ConfigError(f"{text!r}: expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
        path, _, digest = path.partition("@")
        repo, tag = path, None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            repo, _, tag = path.rpartition(":")
        if not _REF.match(repo) or (tag is not None and not _TAG.match(tag)):
            raise ConfigError(f"{text!r}: repository or tag is not valid")
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ConfigError(f"{text!r}: digest must be sha256:<64 hex>")
        if host in DOCKER_HUB:  # Docker Hub's API host; its official images live in library/
            host = "registry-1.docker.io"
            repo = repo if "/" in repo else f"library/{repo}"
        return cls(host, repo, tag, digest or None)

    @property
    def ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return (f"docker://{self.host}/{self.repo}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))
