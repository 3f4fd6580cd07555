"""Generate transformer-shaped safetensors checkpoints for tests, benchmarks and demos."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def llama_like_shapes(total_bytes: int, itemsize: int = 2,
                      vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-style decoder of roughly `total_bytes`."""
    params = max(total_bytes // itemsize, 1)
    hidden = 2048 if params > 400e6 else 1024 if params > 50e6 else 256
    vocab = min(vocab, max(1024, params // (8 * hidden)))
    inter = hidden * 8 // 3 // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_checkpoint(folder: str | os.PathLike, total_bytes: int, shards: int = 1,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Writes a random checkpoint; with shards > 1 also `model.safetensors.index.json`.

    Returns the path to load: the single file, or the folder of a sharded checkpoint.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes = llama_like_shapes(total_bytes, itemsize)
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    per_shard = math.ceil(sum(math.prod(s) for s in shapes.values()) / shards)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if size >= per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += math.prod(shapes[name])
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = ("model.safetensors" if shards == 1
                 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        tensors = {n: _random(shapes[n], dtype, gen) for n in group}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del tensors
    if shards == 1:
        return folder / "model.safetensors"
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return (torch.rand(shape, generator=gen, dtype=torch.float32) - 0.5).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)
