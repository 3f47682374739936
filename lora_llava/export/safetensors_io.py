"""Checkpoint tensors one shard at a time: streamed reading, sharded writing, and a staging folder that becomes the
output only when everything was written. (Tensor names across layouts: :mod:`lora_llava.llava.layouts`.)"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, MergeError
from ..files import atomic_dir, read_json, read_tensors

__all__ = ["ShardWriter", "iter_tensors", "largest_shard", "low_memory_allocator", "read_safetensors",
           "release_memory", "shard_files", "staging", "write_safetensors"]


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


# --------------------------------------------------------------------------------------------------------------------
# Reading shards without loading a whole model.


def shard_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = read_json(folder / index, dict, "a shard index (a JSON object)")["weight_map"]
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
        try:
            header = json.loads(f.read(min(n, 100_000_000)))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise MergeError(f"{path}: not a readable safetensors file (its header is damaged)") from None
        header.pop("__metadata__", None)
        start = 8 + n
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in dtypes:
                raise MergeError(f"{path}: tensor '{name}' has dtype {entry['dtype']}, which a merge does not handle")
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            buf = bytearray(f.read(end - begin))
            if len(buf) != end - begin:
                raise MergeError(f"{path}: tensor '{name}' is cut short (the file was not written to the end)")
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
            try:
                state = read_tensors(path, mmap=True)
            except DataError as e:
                raise MergeError(str(e)) from None
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
    with atomic_dir(out, replace=overwrite) as tmp:
        yield tmp
