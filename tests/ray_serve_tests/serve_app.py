"""A Serve deployment whose replicas load their weights with warmstart's hook.

Imported by the replicas (tests put this folder on PYTHONPATH through the job's runtime_env).
Each answer is computed from the loaded tensors: per-tensor SHA-256 of the raw bytes, and the
sum of one tensor for the HTTP route.
"""

from __future__ import annotations

import hashlib
import os

from ray import serve
from starlette.requests import Request

from warmstart.ray_serve import preload


def digests_of(tensors) -> dict[str, str]:
    import torch

    out = {}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


class Model:
    def __init__(self, weights, label: str = "model"):
        self.weights = weights
        self.label = label
        report = os.environ.get("SERVE_APP_REPORT_DIR")
        if report:  # each replica says what it loaded, so a test needs no routing luck
            import json

            path = os.path.join(report, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.digests(), f)
            os.replace(path + ".tmp", path)

    def digests(self) -> dict[str, str]:
        return digests_of(self.weights)

    async def answer(self) -> tuple[int, dict[str, str]]:
        return os.getpid(), self.digests()

    async def __call__(self, request: Request) -> dict:
        name = request.query_params["tensor"]
        return {"label": self.label, "sum": float(self.weights[name].float().sum())}


def build(uri: str, sharing: dict, replicas: int):
    cls = serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})(
        preload(uri, sharing=sharing)(Model))
    return cls.bind(label="warmstart")
