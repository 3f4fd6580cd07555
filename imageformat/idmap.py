"""Owner mapping for a lazy mount shown to rootless containers (pure).

Rootless podman runs a container in a user namespace: container uid 0 is the user's own uid
and container uids 1.. are the user's subordinate range (`/etc/subuid`). Layers podman
unpacks itself are chowned that way; a lazy mount must show its owners the same way, or the
container's root finds the image's root-owned folders belonging to an unmapped `nobody`.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from warmstart.errors import ConfigError


@dataclass(frozen=True)
class IdMap:
    uids: tuple[tuple[int, int, int], ...] = ()  # (inside, outside, count)
    gids: tuple[tuple[int, int, int], ...] = ()

    @staticmethod
    def _one(ranges, i: int) -> int:
        for inside, outside, count in ranges:
            if inside <= i < inside + count:
                return outside + (i - inside)
        return 65534  # unmapped: the kernel's overflow id

    def owner(self, uid: int, gid: int) -> tuple[int, int]:
        if not self.uids and not self.gids:
            return uid, gid
        return self._one(self.uids, uid), self._one(self.gids, gid)


def _subid(path: str, user: str, uid: int) -> tuple[int, int]:
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    return int(parts[1]), int(parts[2])
    except FileNotFoundError:
        pass
    raise ConfigError(f"{path} has no range for {user} (warmstart ray-node setup adds one)")


def rootless_map(user: str, subuid: str = "/etc/subuid",
                 subgid: str = "/etc/subgid") -> IdMap:
    """The mapping rootless podman uses for `user`: 0 -> the user, 1.. -> its sub-ranges."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user {user!r} does not exist") from None
    us, un = _subid(subuid, user, pw.pw_uid)
    gs, gn = _subid(subgid, user, pw.pw_uid)
    return IdMap(((0, pw.pw_uid, 1), (1, us, un)), ((0, pw.pw_gid, 1), (1, gs, gn)))
