"""``lora-llava data generate``: LLaVA-format instruction data written by a text-only teacher from annotations.

One request per (image, kind). Records are appended to OUT one complete line at a time and fsync'd by a single
writer, so a run killed at any moment (kill -9 included) loses only its in-flight requests; a torn last line (a
write cut by the kill) is cut off on the next run, which skips every id already in OUT or in the rejects file.
Randomness (image before or after the question, which detailed instruction) is drawn from ``(seed, record id)``,
so the records do not depend on concurrency or on the order replies arrive in.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import DataError
from ..files import BadLine, iter_jsonl
from .annotations import Annotation
from .parse import Reject, parse_description, parse_pairs
from .prompts import DETAIL_INSTRUCTIONS, Prompts, context_of, messages_for
from .teacher import Reply, Teacher, TeacherError

__all__ = ["Job", "Summary", "build_record", "generate", "make_jobs", "read_done"]

log = logging.getLogger(__name__)

IMAGE_TAG = "<image>"


@dataclasses.dataclass
class Job:
    id: str
    kind: str
    annotation: Annotation


@dataclasses.dataclass
class Summary:
    requested: int = 0
    skipped: int = 0
    """Already in OUT or the rejects file from an earlier run."""
    written: int = 0
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed: int = 0
    """Requests that still failed after every retry (not written anywhere: the next run asks again)."""
    tokens_in: int = 0
    tokens_out: int = 0
    retries: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "-"
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return "\n".join([
            f"requested   {self.requested} (image, kind) pairs; {self.skipped} done by an earlier run",
            f"written     {self.written} records ({rate:.2f}/s)",
            f"rejected    {rejected} ({reasons})",
            f"failed      {self.failed} (kept for the next run)",
            f"tokens      {self.tokens_in} in, {self.tokens_out} out; {self.retries} retries; {self.seconds:.1f} s",
        ])


def make_jobs(annotations: Iterable[Annotation], kinds: Iterable[str]) -> list[Job]:
    """One job per (image, kind), in a fixed order; a record id is ``<image>:<kind>``."""
    kinds = list(kinds)
    return [Job(f"{a.image}:{k}", k, a) for a in annotations for k in kinds]


def _rng(seed: int, job_id: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{job_id}".encode()))


def build_record(job: Job, text: str, finish_reason: str | None, seed: int) -> dict[str, Any]:
    """The LLaVA record of one reply (raises :class:`Reject` if the reply cannot be read)."""
    rng = _rng(seed, job.id)
    if job.kind == "detail":
        pairs = [(rng.choice(DETAIL_INSTRUCTIONS), parse_description(text, finish_reason))]
    else:
        pairs = parse_pairs(text, expect_one=job.kind == "reasoning", finish_reason=finish_reason)
    first = pairs[0][0]
    # LLaVA: the image goes before or after the first question at random.
    pairs[0] = (f"{first}\n{IMAGE_TAG}" if rng.random() < 0.5 else f"{IMAGE_TAG}\n{first}", pairs[0][1])
    conversations = []
    for q, a in pairs:
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": job.id, "image": job.annotation.image, "conversations": conversations}


def _repair_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write cut short by a kill): it is not a complete record."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: cut an incomplete last line (%d bytes) left by an interrupted run", path, len(data) - keep)


def read_done(path: Path) -> set[str]:
    """Ids of the records of an existing output (or rejects) file, after repairing its tail."""
    _repair_tail(path)
    done: set[str] = set()
    if not path.exists():
        return done
    for number, rec in iter_jsonl(path, strict=False):
        if isinstance(rec, BadLine) or not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            what = rec.message if isinstance(rec, BadLine) else "it has no string 'id'"
            raise DataError(f"{path}: line {number}: {what}; this is not an output of 'data generate' (give "
                            "another --out, or remove the line)")
        done.add(rec["id"])
    return done


class _Appender:
    """Appends complete JSON lines and makes each durable before the next (one writer thread: the caller's)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def generate(jobs: list[Job], prompts: dict[str, Prompts], teacher: Teacher, out: str | Path,
             rejects: str | Path | None = None, concurrency: int = 4, seed: int = 0, retry_rejected: bool = False,
             progress: bool = True, on_record: Callable[[dict], None] | None = None,
             system_in_user: bool = False) -> Summary:
    """Ask the teacher for every job not already done, append records to ``out`` and rejects to ``rejects``
    (default ``<out>.rejects.jsonl``); returns the :class:`Summary`. A teacher error that retries cannot fix (a bad
    key, a wrong URL or model), or the first requests all refused the same way (400: a request the endpoint does
    not take), stops the run with :class:`TeacherError`; what was written stays."""
    out = Path(out)
    rejects = Path(rejects) if rejects else out.with_name(out.name + ".rejects.jsonl")
    done = read_done(out)
    rejected_before = read_done(rejects)
    if not retry_rejected:
        done |= rejected_before
    summary = Summary(requested=len(jobs))
    todo = [j for j in jobs if j.id not in done]
    summary.skipped = len(jobs) - len(todo)
    start = time.monotonic()
    writer, reject_writer = _Appender(out), _Appender(rejects)
    bar = tqdm(total=len(todo), unit="rec", desc="generate", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)

    def ask(job: Job):
        context = context_of(job.annotation, job.kind)
        return teacher.chat(messages_for(prompts[job.kind], context, system_in_user),
                            seed=zlib.crc32(f"{seed}:{job.id}".encode()))

    refused: list[str] = []
    """Requests refused without a retry (HTTP 4xx) while none has been answered yet."""

    def finish(job: Job, reply: Reply | None, error: BaseException | None) -> None:
        if error is not None:
            if not isinstance(error, TeacherError) or error.fatal:
                raise error
            summary.failed += 1
            log.warning("%s: %s", job.id, error)
            if not error.retryable and summary.tokens_in + summary.tokens_out + summary.written == 0:
                refused.append(str(error))
                if len(refused) >= max(4, concurrency):
                    raise TeacherError(f"the first {len(refused)} requests were all refused, the last with: "
                                       f"{refused[-1]}", fatal=True)
            return
        refused.clear()
        summary.tokens_in += reply.prompt_tokens
        summary.tokens_out += reply.completion_tokens
        summary.retries += reply.attempts - 1
        try:
            record = build_record(job, reply.text, reply.finish_reason, seed)
        except Reject as r:
            summary.rejected[r.reason] += 1
            if job.id not in rejected_before:
                reject_writer.write({"id": job.id, "kind": job.kind, "image": job.annotation.image,
                                     "reason": r.reason, "message": str(r), "reply": reply.text})
            return
        writer.write(record)
        summary.written += 1
        if on_record:
            on_record(record)

    # Daemon worker threads (not a ThreadPoolExecutor, whose threads the interpreter waits for at exit): Ctrl-C
    # stops at once, dropping only the requests in flight. The writer is this thread alone.
    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def worker() -> None:
        while (job := tasks.get()) is not None:
            try:
                results.put((job, ask(job), None))
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread, which decides
                results.put((job, None, e))

    workers = [threading.Thread(target=worker, name=f"teacher-{i}", daemon=True)
               for i in range(min(concurrency, len(todo)))]
    for w in workers:
        w.start()
    jobs_left = iter(todo)
    in_flight = 0
    try:
        while True:
            # A bounded queue: at most 2 x concurrency requests handed out and not yet written.
            while in_flight < 2 * concurrency and (job := next(jobs_left, None)) is not None:
                tasks.put(job)
                in_flight += 1
            if not in_flight:
                break
            finish(*results.get())
            in_flight -= 1
            bar.update(1)
            bar.set_postfix_str(f"tok in {summary.tokens_in} out {summary.tokens_out}, "
                                f"rejected {sum(summary.rejected.values())}, failed {summary.failed}", refresh=False)
    finally:
        while not tasks.empty():  # drop what no worker has started
            try:
                tasks.get_nowait()
            except queue.Empty:
                break
        for _ in workers:
            tasks.put(None)
        bar.close()
        writer.close()
        reject_writer.close()
        summary.seconds = time.monotonic() - start
    return summary
