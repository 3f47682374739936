"""Checkpoint tensors by name, one shard at a time: key names across layouts, streamed reading, sharded writing,
and a staging folder that becomes the output only when everything was written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .loading import ModelError

__all__ = ["MergeError", "ShardWriter", "iter_tensors", "largest_shard", "low_memory_allocator", "read_safetensors",
           "release_memory", "staging", "to_hf", "to_internal", "to_original", "write_safetensors"]


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, which doubles the memory of a
    shard while it is written; here each tensor's bytes go to the file directly.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def largest_shard(folder: Path) -> int:
    """Size in bytes of the largest weight file of a checkpoint folder."""
    return max(p.stat().st_size for p in shard_files(folder))


def low_memory_allocator() -> None:
    """Serve large allocations from mmap, so memory freed after each shard goes back to the system.

    glibc keeps freed heap memory for reuse; a merge that allocates tens of MB per merged weight would otherwise grow
    its resident size shard after shard. Best effort: only on glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim), best effort."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MergeError(ModelError):
    """A merge or export that cannot be done as asked; the message names the path, module or option."""


# --------------------------------------------------------------------------------------------------------------------
# Key names. Internally every tensor carries its transformers-5 module name (``model.language_model.layers.0...``,
# ``model.vision_tower.encoder...``, ``model.multi_modal_projector.linear_1...``, ``lm_head.weight``).

_CLIP_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def to_internal(key: str, source: str) -> str | None:
    """The internal name of a checkpoint key; None for tensors an export does not carry (CLIP's text half, ...).

    ``source``: ``llava-hf``, ``llava-original``, ``llama`` (a Vicuna / Llama checkpoint) or ``clip``.
    """
    if source == "clip":
        key = key.removeprefix("vision_model.")
        return f"model.vision_tower.{key}" if key.startswith(_CLIP_TOP) else None
    if source == "llama":
        return "lm_head.weight" if key == "lm_head.weight" else re.sub(r"^model\.", "model.language_model.", key)
    if source == "llava-original":
        for i, n in (("0", "1"), ("2", "2")):
            if key.startswith(f"model.mm_projector.{i}."):
                return f"model.multi_modal_projector.linear_{n}." + key.split(f"model.mm_projector.{i}.", 1)[1]
        if key.startswith("model.vision_tower."):  # some releases carry the tower: model.vision_tower.vision_tower.*
            rest = key.removeprefix("model.vision_tower.").removeprefix("vision_tower.").removeprefix("vision_model.")
            return f"model.vision_tower.{rest}"
        return to_internal(key, "llama")
    # llava-hf: the Hub layout (language_model.model.*, vision_tower.vision_model.*) or transformers 5's own names.
    if key.startswith("language_model.lm_head."):
        return "lm_head." + key.removeprefix("language_model.lm_head.")
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key.startswith("language_model."):
        return "model." + key
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix):
            return "model.vision_tower." + key.removeprefix(prefix).removeprefix("vision_model.")
    if key.startswith("multi_modal_projector."):
        return "model." + key
    return key


def to_hf(name: str) -> str:
    """Internal name -> the llava-hf Hub layout (what vLLM and transformers both load)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    return name.removeprefix("model.")


def to_original(name: str) -> str | None:
    """Internal name -> the original LLaVA layout (no vision tower there: ``mm_vision_tower`` names it)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.multi_modal_projector.linear_"):
        rest = name.removeprefix("model.multi_modal_projector.linear_")
        return f"model.mm_projector.{'0' if rest.startswith('1') else '2'}.{rest.split('.', 1)[1]}"
    if name.startswith("model.vision_tower."):
        return None
    return name


# --------------------------------------------------------------------------------------------------------------------
# Reading shards without loading a whole model.


def shard_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise MergeError(f"'{folder}' holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, each tensor read into memory of its own, in file order.

    Not memory-mapped on purpose: a mapped shard's pages stay resident while any tensor of it is alive, so a merge
    would hold a whole input shard on top of the output shard it is filling.
    """
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        start = 8 + n
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in dtypes:
                raise MergeError(f"{path}: tensor '{name}' has dtype {entry['dtype']}, which a merge does not handle")
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            buf = bytearray(f.read(end - begin))
            dtype = dtypes[entry["dtype"]]
            tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every weight in a checkpoint folder, one shard open at a time."""
    for path in shard_files(folder):
        if path.suffix == ".safetensors":
            yield from read_safetensors(path)
        else:
            # The reference's .bin shards: never unpickle arbitrary objects; mmap keeps one shard out of RAM.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


# --------------------------------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
    """Collect tensors into shards of at most ``max_bytes``; write each with safetensors when full."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        write_safetensors(path, self.buffer, metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0
        release_memory()

    def finish(self) -> None:
        """Name the shards ``model-0000i-of-0000n.safetensors`` and write the index."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = self.folder / ("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` only when the body finished."""
    if out.exists() and not overwrite:
        raise MergeError(f"--out '{out}' exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise MergeError(f"--out '{out}': folder '{out.parent}' does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


