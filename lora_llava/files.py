"""Files written so that a reader never sees half of one, the one JSON / JSONL reader whose errors name the line, and
the one reader of tensor files (safetensors, weights-only pickles).

Every file and folder lora-llava writes goes through :func:`write_atomic` or :func:`atomic_dir`: written under a
temporary name beside the target and renamed onto it at the end, so an interrupted command leaves the old file (or
nothing), never a partial one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["BadLine", "atomic_dir", "cache_root", "iter_jsonl", "read_json", "read_tensors", "write_atomic",
           "write_text_atomic"]


def cache_root() -> Path:
    """lora-llava's cache folder: ``$LORA_LLAVA_CACHE``, by default ``~/.cache/lora_llava``."""
    return Path(os.environ.get("LORA_LLAVA_CACHE", Path.home() / ".cache" / "lora_llava"))


def write_atomic(final: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename ``tmp`` onto ``final``; on any error (Ctrl-C included) ``tmp`` is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_text_atomic(final: str | Path, text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    return write_atomic(final, lambda p: p.write_text(text, encoding="utf-8"))


def _owner() -> str:
    """``PID@HOST``: who made a temporary folder (so a later process can tell a dead one's leftovers)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove the temporary folders that a killed (SIGKILL, power loss) writer of ``final`` on this machine left
    beside it: ``.NAME.partial-PID@HOST-*`` of a process that no longer runs, and ``.NAME.old-PID@HOST-*`` (an old
    copy already replaced) when ``final`` is in place. Folders of running processes and of other machines stay."""
    host = socket.gethostname()
    for kind in ("partial", "old"):
        prefix = f".{final.name}.{kind}-"
        for path in final.parent.glob(f"{glob.escape(prefix)}*@{glob.escape(host)}-*"):
            pid, _, rest = path.name[len(prefix):].partition("@")
            if not pid.isdigit() or not rest.startswith(f"{host}-") or _pid_alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                continue  # killed between the two renames: this is the only copy
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; it becomes ``final`` only if the block succeeds.

    An existing ``final`` is replaced only when ``replace`` (it is moved aside first and deleted after the rename, so
    ``final`` is never missing while the old one is still readable). Temporary folders that a killed earlier writer
    of ``final`` left are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{_owner()}-", dir=final.parent))
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            if not replace:
                raise FileExistsError(f"'{final}' exists")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{_owner()}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BadLine:
    """A line of a JSONL file that is not valid JSON (what :func:`iter_jsonl` yields with ``strict=False``)."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"BadLine({self.message!r})"


def iter_jsonl(path: str | Path, strict: bool = True) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSONL file, numbered from 1.

    A line that is not JSON raises :class:`DataError` naming the file, line and column; with ``strict=False`` it is
    yielded as a :class:`BadLine` instead, so a checker can go on. An unreadable file raises :class:`DataError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is read, not refused
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            message = f"line {number} is not valid JSON ({e.msg}, column {e.colno})"
            if strict:
                raise DataError(f"{path}: {message}") from None
            yield number, BadLine(message)


def read_json(path: str | Path, expect: type | None = None, what: str = "") -> Any:
    """The JSON value of a file; :class:`DataError` naming the file (and line, column) when it is not JSON, or not
    of type ``expect`` (``what`` describes what was expected)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise DataError(f"{path}: expected {what or expect.__name__}, got {type(value).__name__}")
    return value


def read_tensors(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, or of a weights-only ``.bin`` / ``.pt`` pickle.

    Nothing else is ever unpickled: a pickle holding Python objects beyond tensors raises :class:`DataError` saying
    so (torch's own message advises ``weights_only=False``, which would run the file's code). A damaged or truncated
    file raises :class:`DataError` naming it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is not readable safetensors
            raise DataError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); it is damaged "
                            "or was not written to the end") from None
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: a pickle that holds Python objects besides tensors; lora-llava never unpickles "
                        "those (it could run code): only safetensors files and weights-only .bin files are read. "
                        "Convert it to safetensors where it was made (or from a source you trust)") from None
    except Exception as e:  # noqa: BLE001 - zip / EOF / runtime errors: the file is damaged
        raise DataError(f"{path}: not a readable weights file ({str(e).splitlines()[0][:200]})") from None
