"""`warmstart image record --podman`: the start-up to profile is run by podman (and the OCI
runtime it is configured with) on the recording mount, exactly as a podman-started container
reads it: `podman run --rootfs MOUNT:O` puts a writable overlay over the read-only mount."""

from __future__ import annotations

import os
import subprocess

from warmstart.errors import ConfigError


def podman_command(mnt: str, cmd: list[str], podman_args: list[str], run_args: list[str],
                   name: str) -> list[str]:
    """The podman command line that runs `cmd` in the image shown at `mnt` (pure): global
    flags, then `run` flags; host networking, as Ray's workers use."""
    return ["podman", *podman_args, "run", "--rm", "--name", name, "--network", "host",
            *run_args, "--rootfs", f"{mnt}:O", *cmd]


def run_in_podman(mnt: str, cmd: list[str], podman_args: list[str], run_args: list[str],
                  timeout: float) -> int:
    if os.geteuid() != 0:
        raise ConfigError("record --podman needs root (the recording mount is served to "
                          "podman's overlay with allow_other)")
    full = podman_command(mnt, cmd, podman_args, run_args, f"warmstart-record-{os.getpid()}")
    return subprocess.run(full, timeout=timeout).returncode
