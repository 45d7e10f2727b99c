"""MicroBatcher: pairs from concurrent HTTP requests scored together in one forward.

Each request puts its `(query, documents)` on an asyncio queue (documents: image tokens
`[K, m, d]`, or a list the backend resolves itself). One worker task takes the first job, waits
`max_wait_s` for others to arrive (and, while a forward runs, new jobs pile up on their own),
then scores up to `max_pairs` pairs from several requests in a single
`score_pairs(queries, documents)` call on a one-thread executor (the device is used by one
forward at a time) and hands each request its slice of the logits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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


class MicroBatcher:
    """Batch `score_pairs` calls across concurrent requests; `start()` inside the event loop."""

    def __init__(
        self,
        score_pairs: ScorePairs,
        *,
        max_pairs: int = 512,
        max_wait_s: float = 0.005,
    ) -> None:
        if max_pairs < 1:
            raise ValueError(f"MicroBatcher: max_pairs must be >= 1, got {max_pairs}.")
        self.max_pairs, self.max_wait_s = max_pairs, max_wait_s
        self.stats = BatchStats()
        self._score_pairs = score_pairs
        self._executor: Executor | None = None  # given by start()
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job that did not fit the last forward
        self._task: asyncio.Task | None = None

    def start(self, executor: Executor) -> None:
        """Begin taking jobs (inside the running event loop); forwards run on `executor`."""
        self._executor, self._queue = executor, asyncio.Queue()
        self._carry = None
        self._task = asyncio.create_task(self._work(), name="edje-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        waiting = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            _fail(job, RuntimeError("the server is shutting down"))

    async def score(self, query: str, documents: Sequence[Any]) -> torch.Tensor:
        """Logits `[K]` (float32, CPU) of `query` against its K documents."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.score called before start().")
        if not len(documents):
            return torch.zeros(0)
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(documents), self.max_pairs):  # bounded forwards, whatever K
            futures.append(loop.create_future())
            chunk = documents[start : start + self.max_pairs]
            self._queue.put_nowait(_Job(query, chunk, futures[-1]))
        return torch.cat(await asyncio.gather(*futures))

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
        assert self._queue is not None
        first, self._carry = self._carry or await self._queue.get(), None
        jobs, pairs = [first], len(first.documents)
        if pairs < self.max_pairs and self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)  # let concurrent requests join this forward
        while pairs < self.max_pairs and not self._queue.empty():
            job = self._queue.get_nowait()
            if pairs + len(job.documents) > self.max_pairs:
                self._carry = job
                break
            jobs.append(job)
            pairs += len(job.documents)
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
        self.stats.forward_calls += 1
        try:
            logits = self._score_pairs(queries, documents)
        except Exception:
            self.stats.failed_forwards += 1
            raise
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
