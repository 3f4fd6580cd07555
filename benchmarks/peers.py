"""One function per loader under test. Each loads the whole checkpoint described by `spec` onto
`spec["device"]` and returns `{name: tensor}`; `marks` records the first usable tensor and
any destination allocation the peer lets us do (and so time) ourselves.

`spec` keys: device, source ('local' or 's3'), files (local shard paths), uri (what warmstart
loads), s3 {endpoint, bucket, keys}, budget, concurrency (0: the peer's default), direct_io,
tmp (a folder for download-then-load).

These run inside `python -m warmstart.benchmarks.peer`, one process per run.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class Marks:
    """Times relative to the start of the peer's clock."""

    start: float = field(default_factory=time.perf_counter)
    first_tensor: float | None = None
    alloc: float | None = None

    def first(self) -> None:
        if self.first_tensor is None:
            self.first_tensor = time.perf_counter() - self.start

    def add_alloc(self, seconds: float) -> None:
        self.alloc = (self.alloc or 0.0) + seconds


def _warmstart_config(spec: dict):
    from warmstart.loader import LoaderConfig

    options = {}
    if spec.get("budget"):
        options["memory_budget"] = spec["budget"]
    if spec.get("concurrency"):
        options["concurrency"] = spec["concurrency"]
    if spec.get("direct_io") is not None:
        options["direct_io"] = spec["direct_io"]
    if spec["source"] == "s3":
        options["s3_endpoint_url"] = spec["s3"]["endpoint"]
    return LoaderConfig.from_mapping(options)


def warmstart(spec: dict, marks: Marks) -> Tensors:
    from warmstart.loader import load

    out = load(spec["uri"], spec["device"], config=_warmstart_config(spec))
    marks.first()  # load() hands every tensor over at once
    return out


def warmstart_stream(spec: dict, marks: Marks) -> Tensors:
    from warmstart.loader import stream

    out = {}
    for name, tensor in stream(spec["uri"], spec["device"], config=_warmstart_config(spec)):
        marks.first()
        out[name] = tensor
    return out


def safetensors(spec: dict, marks: Marks) -> Tensors:
    from safetensors.torch import load_file

    device = spec["device"]
    out = {}
    for path in spec["files"]:
        out.update(load_file(path, device=device))
    marks.first()
    return out


def runai(spec: dict, marks: Marks) -> Tensors:
    """Run:ai Model Streamer. Its tensors are views into a buffer it reuses (owned=False, as
    vLLM consumes them), so each is copied into a destination we allocate: the allocation
    (including faulting the pages in) is timed apart from the copy."""
    from runai_model_streamer import SafetensorsStreamer

    if spec["concurrency"]:
        os.environ["RUNAI_STREAMER_CONCURRENCY"] = str(spec["concurrency"])
    if spec["source"] == "s3":
        paths = [f"s3://{spec['s3']['bucket']}/{key}" for key in spec["s3"]["keys"]]
    else:
        paths = list(spec["files"])
    device = torch.device(spec["device"])
    out = {}
    with SafetensorsStreamer() as streamer:
        if "owned" in inspect.signature(streamer.stream_files).parameters:
            streamer.stream_files(paths, device="cpu", owned=False)
        else:  # releases before `owned` always yield views into the reused buffer
            streamer.stream_files(paths, device="cpu")
        for name, view in streamer.get_tensors():
            started = time.perf_counter()
            dest = torch.empty(view.shape, dtype=view.dtype, device=device)
            if device.type == "cpu" and dest.numel():
                dest.view(-1).view(torch.uint8)[::4096] = 0  # fault the fresh pages in
            marks.add_alloc(time.perf_counter() - started)
            dest.copy_(view)
            if device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # the view is reused next
            marks.first()
            out[name] = dest
    return out


def fastsafetensors(spec: dict, marks: Marks) -> Tensors:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    device = spec["device"]
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    # nogds: plain reads into host memory (GPUDirect Storage is not on these machines).
    loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True)
    try:
        loader.add_filenames({0: list(spec["files"])})
        buffers = loader.copy_files_to_device()
        try:
            out = {name: buffers.get_tensor(name) for name in loader.get_keys()}
        finally:
            buffers.close()  # the tensors keep their storage alive
    finally:
        loader.close()
    marks.first()
    return out


def download_then_load(spec: dict, marks: Marks) -> Tensors:
    """aiobotocore downloads every object to a temporary folder with concurrent ranged GETs,
    then safetensors loads the files. The folder is removed after the clock stops (by the
    caller deleting `spec['tmp']`)."""
    import asyncio

    from safetensors.torch import load_file

    folder = tempfile.mkdtemp(prefix="download-", dir=spec.get("tmp"))
    paths = asyncio.run(_download(spec, folder))
    out = {}
    try:
        for path in paths:
            out.update(load_file(path, device=spec["device"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded tensors do not map the files
    marks.first()
    return out


PART = 16 << 20


async def _download(spec: dict, folder: str) -> list[str]:
    import asyncio

    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    s3 = spec["s3"]
    concurrency = spec["concurrency"] or 16
    config = AioConfig(max_pool_connections=concurrency, s3={"addressing_style": "path"})
    session = get_session()
    async with session.create_client("s3", endpoint_url=s3["endpoint"], config=config) as client:
        sizes = {}
        for key in s3["keys"]:
            head = await client.head_object(Bucket=s3["bucket"], Key=key)
            sizes[key] = head["ContentLength"]
        gate = asyncio.Semaphore(concurrency)
        fds = {}
        paths = []
        for key in s3["keys"]:
            path = os.path.join(folder, os.path.basename(key))
            fds[key] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            paths.append(path)

        async def part(key: str, offset: int, length: int) -> None:
            async with gate:
                resp = await client.get_object(Bucket=s3["bucket"], Key=key,
                                               Range=f"bytes={offset}-{offset + length - 1}")
                async with resp["Body"] as body:
                    data = await body.read()
            if len(data) != length:
                raise IOError(f"{key}: got {len(data)} bytes at {offset}, expected {length}")
            await asyncio.to_thread(os.pwrite, fds[key], data, offset)

        try:
            await asyncio.gather(*(part(key, off, min(PART, size - off))
                                   for key, size in sizes.items()
                                   for off in range(0, size, PART)))
        finally:
            for fd in fds.values():
                os.close(fd)
        return paths


PEERS: dict[str, Callable[[dict, Marks], Tensors]] = {
    "warmstart": warmstart,
    "warmstart-stream": warmstart_stream,
    "safetensors": safetensors,
    "runai": runai,
    "fastsafetensors": fastsafetensors,
    "download-then-load": download_then_load,
}

# The modules each peer needs, per source: a missing one reports the peer "not installed".
REQUIRES: dict[str, dict[str, list[str]]] = {
    # the S3 client library is imported before the clock for every S3 peer alike (warmstart
    # imports it lazily, on the first s3:// load; download-then-load's list names it too)
    "warmstart": {"local": ["warmstart.loader"],
                  "s3": ["warmstart.loader", "aiobotocore.session", "botocore.auth"]},
    "warmstart-stream": {"local": ["warmstart.loader"],
                         "s3": ["warmstart.loader", "aiobotocore.session", "botocore.auth"]},
    "safetensors": {"local": ["safetensors.torch"]},
    "runai": {"local": ["runai_model_streamer"],
              "s3": ["runai_model_streamer", "runai_model_streamer_s3"]},
    "fastsafetensors": {"local": ["fastsafetensors"]},
    "download-then-load": {"s3": ["aiobotocore", "safetensors.torch"]},
}

# Peers the others are compared with (ratio columns).
BASELINES = ("safetensors", "runai", "fastsafetensors", "download-then-load")


def applies(peer: str, source: str) -> bool:
    return source in REQUIRES[peer]
