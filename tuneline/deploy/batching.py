"""Dynamic batching and hot swapping for the inference server.

:class:`ServedModel` is what one request is answered with (model, tokenizer, registry info). A
:class:`ModelSlot` holds the current one and swaps it atomically: requests already in a batch finish on the
model they started with, the next batch takes the new one, so a promotion or a rollback fails no request.

:class:`Batcher` runs generation on one worker thread. The first queued request waits at most
``wait_ms`` for others to join; up to ``max_batch_size`` are then generated together with left padding
(:func:`tuneline.models.generation.generate_greedy`), each row cut at its own ``max_new_tokens`` and eos. A
batch is at least as fast per request as single generation, so under concurrency throughput rises with
the batch while a lone request waits only ``wait_ms`` more.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class ServedModel:
    model: Any
    tokenizer: Any
    info: Mapping[str, Any]  # registry name, version, alias (and local path)

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        from tuneline.models.generation import prompt_ids

        return prompt_ids(self.tokenizer, messages)


class ModelSlot:
    """The served model, swapped atomically by :meth:`swap`; ``current`` is read without a lock."""

    def __init__(self, served: ServedModel) -> None:
        self._current = served
        self._lock = threading.Lock()

    @property
    def current(self) -> ServedModel:
        return self._current

    def swap(self, served: ServedModel) -> ServedModel:
        with self._lock:
            old, self._current = self._current, served
        return old


class Follower:
    """Polls ``check(current_info)`` every ``seconds`` on a daemon thread; when it returns a new
    :class:`ServedModel` (the alias moved), swaps it into ``slot``. Errors are reported to ``on_error`` and
    the served model stays (a registry outage never takes serving down)."""

    def __init__(self, slot: ModelSlot, check: Callable[[Mapping[str, Any]], Optional[ServedModel]], seconds: float,
                 on_error: Callable[[BaseException], None] = lambda exc: None,
                 on_swap: Callable[[ServedModel, ServedModel], None] = lambda old, new: None) -> None:
        self.slot, self.check, self.seconds = slot, check, seconds
        self.on_error, self.on_swap = on_error, on_swap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuneline-follow", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def poll(self) -> bool:
        """One check; True when a new version was swapped in."""
        try:
            new = self.check(self.slot.current.info)
        except Exception as exc:  # noqa: BLE001 - keep serving the current version
            self.on_error(exc)
            return False
        if new is None:
            return False
        self.on_swap(self.slot.swap(new), new)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self.poll()


@dataclass
class _Job:
    messages: Sequence[Mapping[str, str]]
    max_new_tokens: int
    future: Future


class Batcher:
    """Generation on one worker thread, concurrent requests batched (see the module docstring)."""

    def __init__(self, slot: ModelSlot, *, max_batch_size: int = 16, wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.slot, self.max_batch_size, self.wait_s = slot, int(max_batch_size), max(0.0, wait_ms) / 1000.0
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tuneline-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # batches generated, and requests in them (for /health and the load drill)
        self.batched_requests = 0

    def submit(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Future:
        """A future of ``{text, ids, prompt_tokens, new_tokens, finish_reason, served}`` (``served``: the
        :class:`ServedModel` that generated it)."""
        job = _Job(messages, int(max_new_tokens), Future())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        from tuneline.models.generation import generate_greedy

        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            served = self.slot.current  # one batch, one model: a swap applies from the next batch
            try:
                prompts = [served.prompt_ids(job.messages) for job in batch]
                results = generate_greedy(served.model, served.tokenizer, prompts,
                                          max_new_tokens=[job.max_new_tokens for job in batch],
                                          batch_size=len(batch), warm_up=False)
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            for job, prompt, result in zip(batch, prompts, results):
                job.future.set_result({
                    "text": served.tokenizer.decode(result["ids"], skip_special_tokens=True),
                    "ids": result["ids"],
                    "prompt_tokens": len(prompt),
                    "new_tokens": result["new_tokens"],
                    "finish_reason": "stop" if result["hit_eos"] else "length",
                    "served": served,
                })
