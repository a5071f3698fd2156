"""Dynamic batching: a task's inputs from concurrent requests gathered into one ONNX Runtime call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from tessera.core.config import ServeConfig
from tessera.core.entry.predict import Predictor
from tessera.core.serve.metrics import Metrics


class Options(NamedTuple):
    """How a request's records are made: the `top_k` classes listed, the boxes scoring at least `threshold`."""

    top_k: int
    threshold: float


@dataclass
class Job:
    """One request's inputs waiting for a batch, and the future its records (one per input, in order) go to."""

    sources: list[str]
    items: list
    options: Options
    done: asyncio.Future


class Batcher:
    """A task's inputs gathered into ONNX Runtime calls of at most `max_batch`: the first waiting request opens a
    batch, which takes the requests that arrive within `max_wait_ms` or until it is full. One call runs at a time
    per task; requests that arrive meanwhile make the next batch."""

    def __init__(self, task: str, predictor: Predictor, cfg: ServeConfig, metrics: Metrics):
        self.task, self.predictor, self.cfg, self.metrics = task, predictor, cfg, metrics
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.runner: asyncio.Task | None = None
        self.coming = 0  # requests for the task still being read: what a batch may wait for

    @contextmanager
    def reading(self) -> Iterator[None]:
        """While a request for the task is being read: an open batch may wait for its inputs."""
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1

    async def predict(self, sources: list[str], items: list, options: Options) -> list[dict]:
        """The records of `items` (what the task's reader gave), once their batch has run."""
        if self.runner is None:
            self.runner = asyncio.create_task(self.run())
        done = asyncio.get_running_loop().create_future()
        self.metrics.queue.labels(self.task).inc(len(items))
        await self.queue.put(Job(sources, items, options, done))
        return await done

    async def run(self) -> None:
        """Batches until `close` queues its None, answering everything queued before it."""
        loop, stop = asyncio.get_running_loop(), False
        while not stop:
            first = await self.queue.get()
            if first is None:
                return
            jobs, n, deadline = [first], len(first.items), loop.time() + self.cfg.max_wait_ms / 1000
            while n < self.cfg.max_batch and (self.coming or not self.queue.empty()):  # alone: no wait, no latency
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        job = await self.queue.get()
                except TimeoutError:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                n += len(job.items)
            self.metrics.queue.labels(self.task).dec(n)
            await self._answer(jobs)

    async def _answer(self, jobs: list[Job]) -> None:
        try:
            answers = await asyncio.to_thread(self.records, jobs)
        except Exception as e:
            if len(jobs) > 1:  # each request again on its own: only the one the model fails on gets the error
                for job in jobs:
                    await self._answer([job])
                return
            if not jobs[0].done.done():
                jobs[0].done.set_exception(e)  # a 500, its traceback in the log under the request id
            return
        for job, records in zip(jobs, answers):
            if not job.done.done():  # a client that went away cancelled its future
                job.done.set_result(records)

    def records(self, jobs: list[Job]) -> list[list[dict]]:
        """Each job's records: the session run on parts of at most max_batch inputs (a batch request larger than
        that goes in parts), each input's record made with its own request's options."""
        flat = [(k, source, item) for k, job in enumerate(jobs) for source, item in zip(job.sources, job.items)]
        answers: list[list[dict]] = [[] for _ in jobs]
        for a in range(0, len(flat), self.cfg.max_batch):
            part = flat[a: a + self.cfg.max_batch]
            self.metrics.batch.labels(self.task).observe(len(part))
            sources, items = [s for _, s, _ in part], [item for _, _, item in part]
            outputs = self.predictor.outputs(items)
            for options in {jobs[k].options for k, _, _ in part}:  # one, unless requests set their own
                made = self.predictor.records(sources, items, outputs, options.top_k, options.threshold)
                for (k, _, _), record in zip(part, made):
                    if jobs[k].options == options:
                        answers[k].append(record)
        return answers

    async def close(self) -> None:
        """Answers what is queued, then stops."""
        if self.runner:
            await self.queue.put(None)
            await self.runner
