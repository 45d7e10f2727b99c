"""MicroBatcher: pairs from concurrent HTTP requests scored together in one forward, and
taken from every waiting request in turn, so one large request cannot starve the others.

Each request's documents are cut into chunks of `chunk_pairs`. One worker task builds each
forward round-robin, one chunk from each waiting request in turn, up to a size measured to
take about `max_forward_s` (never more than `max_pairs` pairs), and runs it as a single
`score_pairs(queries, documents)` call on a one-thread executor (the device is used by one
forward at a time). A request that arrives while a 1,000-document one is being scored joins
the next forward: it waits about one forward, not the whole large request. After the first
job arrives the worker waits `max_wait_s` for others to join a forward that is not full.

A job may name a precision (`score(..., precision="bfloat16")`, exact mode's phases): one
forward holds jobs of one precision, and when jobs of another wait, the next forward is
theirs, so neither kind waits more than a forward for the other. Its forward calls
`score_pairs(queries, documents, precision=...)`; jobs that name none call it with two
arguments, as before.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

ScorePairs = Callable[[Sequence[str], Sequence[Any]], torch.Tensor]


@dataclass
class BatchStats:
    """Counters read by `GET /health` (and by the tests, to see batching happen)."""

    forward_calls: int = 0  # score_pairs calls, failed ones included
    failed_forwards: int = 0
    jobs: int = 0  # chunks of requests scored (a request over max_pairs is several)
    pairs: int = 0
    largest_forward_pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Job:
    query: str
    documents: Sequence[Any]  # a tensor [k, m, d] or a list, k <= max_pairs
    future: asyncio.Future = field(repr=False)
    precision: str | None = None  # None: score_pairs' own


class MicroBatcher:
    """Batch `score_pairs` calls across concurrent requests, fairly; `start()` inside the event
    loop."""

    def __init__(
        self,
        score_pairs: ScorePairs,
        *,
        max_pairs: int = 512,
        max_wait_s: float = 0.005,
        max_forward_s: float = 0.25,
        chunk_pairs: int = 8,
    ) -> None:
        if max_pairs < 1 or chunk_pairs < 1:
            raise ValueError(
                f"MicroBatcher: max_pairs and chunk_pairs must be >= 1, got {max_pairs}, "
                f"{chunk_pairs}."
            )
        if not max_forward_s > 0:
            raise ValueError(f"MicroBatcher: max_forward_s must be > 0, got {max_forward_s}.")
        self.max_pairs, self.max_wait_s = max_pairs, max_wait_s
        self.max_forward_s, self.chunk_pairs = max_forward_s, min(chunk_pairs, max_pairs)
        self.stats = BatchStats()
        self._score_pairs = score_pairs
        self._executor: Executor | None = None  # given by start()
        self._waiting: deque[deque[_Job]] = deque()  # per request, its chunks not yet taken
        self._arrived: asyncio.Event | None = None
        # Per precision (bf16 runs several times fp32's speed), over the last forwards.
        self._seconds_per_pair: dict[str | None, float] = {}
        self._task: asyncio.Task | None = None

    def start(self, executor: Executor) -> None:
        """Begin taking jobs (inside the running event loop); forwards run on `executor`."""
        self._executor, self._arrived = executor, asyncio.Event()
        self._waiting.clear()
        self._task = asyncio.create_task(self._work(), name="edje-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for chunks in self._waiting:
            for job in chunks:
                _fail(job, RuntimeError("the server is shutting down"))
        self._waiting.clear()

    async def score(
        self, query: str, documents: Sequence[Any], precision: str | None = None
    ) -> torch.Tensor:
        """Logits `[K]` (float32, CPU) of `query` against its K documents, scored in
        `precision` (None: `score_pairs`' own)."""
        if self._arrived is None:
            raise RuntimeError("MicroBatcher.score called before start().")
        if not len(documents):
            return torch.zeros(0)
        loop = asyncio.get_running_loop()
        chunks: deque[_Job] = deque()
        for start in range(0, len(documents), self.chunk_pairs):
            chunk = documents[start : start + self.chunk_pairs]
            chunks.append(_Job(query, chunk, loop.create_future(), precision))
        futures = [job.future for job in chunks]
        self._waiting.append(chunks)
        self._arrived.set()
        return torch.cat(await asyncio.gather(*futures))

    def forward_pairs(self, precision: str | None = None) -> int:
        """Pairs in the next forward: what takes about `max_forward_s` at the measured speed
        of `precision` (one chunk until it is measured), within `chunk_pairs`..`max_pairs`."""
        seconds = self._seconds_per_pair.get(precision)
        if seconds is None:
            return self.chunk_pairs
        fits = int(self.max_forward_s / seconds)
        return max(self.chunk_pairs, min(self.max_pairs, fits))

    async def _work(self) -> None:
        while True:
            jobs = await self._next_batch()
            try:
                await self._run(jobs)
            except Exception as error:  # never let the worker die: fail the batch, go on
                logger.exception("edje serve: batch failed")
                for job in jobs:
                    _fail(job, error)

    async def _next_batch(self) -> list[_Job]:
        assert self._arrived is not None
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        precision = self._waiting[0][0].precision
        limit = self.forward_pairs(precision)
        waiting_pairs = sum(len(job.documents) for chunks in self._waiting for job in chunks)
        if waiting_pairs < limit and self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)  # let concurrent requests join this forward
        jobs, pairs = [], 0
        others: deque[deque[_Job]] = deque()  # requests waiting for another precision
        while self._waiting:  # round robin: a chunk from each waiting request in turn
            chunks = self._waiting[0]
            if chunks[0].precision != precision:
                others.append(self._waiting.popleft())
                continue
            if jobs and pairs + len(chunks[0].documents) > limit:
                break
            job = chunks.popleft()
            jobs.append(job)
            pairs += len(job.documents)
            if chunks:
                self._waiting.rotate(-1)  # its next chunk after the other requests' ones
            else:
                self._waiting.popleft()
        self._waiting.extendleft(reversed(others))  # first in line: the next forward is theirs
        return jobs

    async def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # cancelled by its request
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, self._forward, jobs)
        except Exception as error:
            if len(jobs) == 1:
                _fail(jobs[0], error)
                return
            # One bad request must not fail the others batched with it: score them one by one.
            for job in jobs:
                await self._run([job])
            return
        for job, part in zip(jobs, logits.split([len(j.documents) for j in jobs]), strict=True):
            if not job.future.done():
                job.future.set_result(part)

    def _forward(self, jobs: list[_Job]) -> torch.Tensor:
        """On the executor's thread: one score_pairs call over every job's pairs."""
        queries = [job.query for job in jobs for _ in range(len(job.documents))]
        documents = jobs[0].documents if len(jobs) == 1 else _concat([j.documents for j in jobs])
        precision = jobs[0].precision  # one forward, one precision (`_next_batch`)
        self.stats.forward_calls += 1
        started = time.perf_counter()
        try:
            if precision is None:
                logits = self._score_pairs(queries, documents)
            else:
                logits = self._score_pairs(queries, documents, precision=precision)
        except Exception:
            self.stats.failed_forwards += 1
            raise
        per_pair = (time.perf_counter() - started) / len(queries)
        last = self._seconds_per_pair.get(precision)
        self._seconds_per_pair[precision] = per_pair if last is None else 0.5 * (last + per_pair)
        self.stats.jobs += len(jobs)
        self.stats.pairs += len(queries)
        self.stats.largest_forward_pairs = max(self.stats.largest_forward_pairs, len(queries))
        if logits.shape != (len(queries),):
            raise RuntimeError(
                f"score_pairs returned shape {list(logits.shape)} for {len(queries)} pairs."
            )
        return logits.detach().float().cpu()


def _concat(parts: list[Sequence[Any]]) -> Sequence[Any]:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return list(itertools.chain.from_iterable(parts))


def _fail(job: _Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)
