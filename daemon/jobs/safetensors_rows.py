"""Each FSDP rank reads and writes only its own rows of a Hugging Face safetensors checkpoint.

Why: FSDP2 shards every parameter on dim 0, and safetensors stores each tensor
row-major at an offset its header names, so a rank's shard is one contiguous
byte range of the file. Reading that range (plain reads, not a memory map, so
the file's pages never enter the rank's resident set) lets a rank load its
shard of the parent holding nothing more than one tensor's slice at a time;
writing it at its offset lets every rank write its part of the consolidated
weights in parallel, with no gather and no second pass over the files. Tried
first: DCP's HuggingFaceStorageReader and HuggingFaceStorageWriter with
consolidation. They load and write the same bytes, but at 2 gloo ranks on a
136 MB (fp32) model they held 1.07x the model at load (the slices through a
memory map, DCP's planning) and 0.75x on rank 0 at export (a bf16 copy of the
shard, its serialised file, then rank 0 alone re-reading every shard to
consolidate, with a second copy of the weights on disk meanwhile), against the
0.6x issue 23 asks for.

The written files mirror the parent's: the same file names, the same tensor
names, shapes and dtypes, the same `model.safetensors.index.json` weight map;
only the bytes differ. That is what the swap's validate_checkpoint compares.
Needs a directory every rank sees, as the DCP shards beside it already do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX = "model.safetensors.index.json"
# safetensors' dtype names
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    file: str  # the file's name, in the checkpoint directory
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's first byte in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def layout(ckpt: Path) -> tuple[dict[str, Entry], dict]:
    """Every tensor of a checkpoint directory (one model.safetensors or the files its index names), in file and
    header order; and the index (empty for one file)."""
    index: dict = json.loads((ckpt / INDEX).read_text()) if (ckpt / INDEX).exists() else {}
    files = list(dict.fromkeys(index["weight_map"].values())) if index else ["model.safetensors"]
    out: dict[str, Entry] = {}
    for name in files:
        header, data = read_header(ckpt / name)
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = Entry(name, v["dtype"], tuple(v["shape"]), data + v["data_offsets"][0])
    return out, index


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of a parameter and the global row it starts at: an FSDP2 DTensor's local shard (dim 0),
    or a plain tensor whole."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, 0
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"row-wise IO needs tensors sharded on dim 0 over one mesh dimension, got {t.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0]) if t.dim() else 0


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied one once, under its first name, as Hugging Face saves it) and persistent buffers."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    non_persistent = {f"{m}.{b}".lstrip(".") for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    out.update({n: b for n, b in model.named_buffers() if n not in non_persistent})
    return out


def load_rows(model: torch.nn.Module, ckpt: Path) -> None:
    """Fill every parameter and persistent buffer of a sharded model with its rows from `ckpt`, converted to the
    tensor's dtype. A tensor the checkpoint lacks, or one it has in another shape, is refused with its name."""
    entries, _ = layout(ckpt)
    tensors = named_tensors(model)
    missing = sorted(set(tensors) - set(entries))
    extra = sorted(set(entries) - set(tensors))
    if missing or extra:
        raise ValueError(f"{ckpt}: lacks {len(missing)} of the model's tensors {missing[:3]}, has {len(extra)} it lacks {extra[:3]}")
    handles: dict[str, Any] = {}  # open files by name
    try:
        with torch.no_grad():
            for name, t in tensors.items():
                e = entries[name]
                if tuple(t.shape) != e.shape:
                    raise ValueError(f"{ckpt}: {name} is {e.shape} in the checkpoint, {tuple(t.shape)} in the model")
                local, row = local_rows(t)
                if local.numel() == 0:
                    continue
                f = handles.get(e.file) or handles.setdefault(e.file, open(ckpt / e.file, "rb"))  # noqa: SIM115 - closed below
                buf = bytearray(local.shape[0] * e.row_bytes if local.dim() else local.element_size())
                f.seek(e.start + row * e.row_bytes)
                f.readinto(buf)
                src = torch.frombuffer(buf, dtype=DTYPES[e.dtype]).view(local.shape) if buf else torch.empty(0)
                local.copy_(src)
    finally:
        for h in handles.values():
            h.close()


def write_headers(dst: Path, like: Path) -> dict[str, Entry]:
    """Create `dst`'s safetensors files with `like`'s headers, byte for byte (names, shapes, dtypes, offsets), and
    `like`'s index, each file at its full size with its data still zero; every rank then writes its rows. Rank 0 only."""
    entries, index = layout(like)
    dst.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(e.file for e in entries.values()):
        header, data = read_header(like / name)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        with open(like / name, "rb") as src, open(dst / name, "wb") as f:
            f.write(src.read(data))
            f.truncate(data + end)
    if index:
        (dst / INDEX).write_text(json.dumps(index, indent=2))
    return entries


def write_rows(model: torch.nn.Module, dst: Path, entries: dict[str, Entry]) -> None:
    """Write this rank's rows of every tensor into the files write_headers made, converted to each entry's dtype
    one tensor at a time (never the whole shard in a second dtype at once)."""
    tensors = named_tensors(model)
    missing = sorted(set(entries) - set(tensors))
    if missing:
        raise ValueError(f"the model has no tensor for {len(missing)} of the checkpoint's, e.g. {missing[:3]}")
    handles: dict[str, Any] = {}  # open files by name
    try:
        for name, e in entries.items():
            local, row = local_rows(tensors[name])
            if local.numel() == 0:
                continue
            data = local.detach().to("cpu", DTYPES[e.dtype]).contiguous()
            f = handles.get(e.file) or handles.setdefault(e.file, open(dst / e.file, "r+b"))  # noqa: SIM115 - closed below
            f.seek(e.start + row * e.row_bytes)
            f.write(data.reshape(-1).view(torch.uint8).numpy())  # no copy: numpy's view of the tensor
            del data
    finally:
        for h in handles.values():
            h.flush()
            os.fsync(h.fileno())
            h.close()
