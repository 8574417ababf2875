"""Continuous batching for the daemon: Engine.step() runs in one worker thread; requests join and leave between steps.

    submit() ─▶ pending (FIFO) ─admit─▶ engine: prefill + one batched decode per step ─▶ on_reply(chunk|final)
    cancel() ─▶ leaving ───────────────▶ engine.abort() before the next step

The event loop never touches the engine while a step runs (the engine is not
thread-safe): joins and leaves wait in `pending` / `leaving` and are applied
between steps, when the worker thread is idle. Prompts are tokenized in a
second thread so a long one stalls neither the loop nor the batch.

Fairness: every step decodes every running sequence, and a step admits new
prompts only up to the engine's `prefill_token_budget` while others are decoding (at
least one, so a long prompt is never starved either): a burst of arrivals
delays the running streams by a bounded amount instead of a whole queue's
prefill. The batch never exceeds the engine's `max_batch` (its KV-cache
slots, sized by the memory plan).

Replies are protocol messages (TokenChunk, Heartbeat, FinalMessage,
ErrorReply), handed to the request's `on_reply`, which returns False when the
client can no longer be reached: the request is then cancelled.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flashllm.protocol.client_api import (ErrorCode, ErrorReply, FinalMessage, Heartbeat, StatusReply, TokenChunk, Timings,
                                 Usage)

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0  # a request that was told nothing for this long gets a Heartbeat
METRICS_WINDOW_S = 10.0  # rates in status() are over this many recent seconds
DEFAULT_STEP_TIMEOUT_S = 30.0  # a step running longer than this makes the daemon unhealthy (the watchdog then fires)
DEFAULT_MAX_QUEUED = 1024
IDLE_CHECK_INTERVAL_S = 0.5  # while idle, how often the engine's workers are checked (and restarted if dead)


def step_failure_reply(error: Exception) -> tuple[str, str]:
    """(ErrorCode, message) for the requests of a step that failed with `error`."""
    kind = getattr(error, "client_error_code", None)  # errors that know what the client should do say so
    if kind == ErrorCode.WORKER_FAILED:
        return kind, f"a worker process failed during this request ({error}); send the request again"
    if kind == ErrorCode.STORE_CORRUPT:
        return kind, str(error)
    return ErrorCode.INTERNAL, f"the engine failed on this request ({type(error).__name__}: {error})"


class RequestRejected(Exception):
    """A request the scheduler will not run; `code` is a protocol ErrorCode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class ScheduledRequest:
    request_id: str  # the client's id, echoed in every reply
    engine_id: str  # unique inside the engine (clients may reuse each other's ids)
    prompt_ids: list[int]
    params: object  # runtime.sampling.SamplingParams
    stream: bool
    on_reply: Callable[[object], bool]
    arrival_s: float
    admitted_s: float | None = None
    first_token_s: float | None = None
    last_reply_s: float = 0.0
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _StepRecord:
    end_s: float
    tokens: int  # tokens produced by this step (prefill firsts + decodes)
    decode_batch: int
    decode_ms: float
    io_ms: float
    compute_ms: float
    flash_bytes: int
    cache_hits: int
    neurons_needed: int  # hits + reads; 0 when the FFN has no neuron cache


class Scheduler:
    def __init__(self, engine, max_queued: int = DEFAULT_MAX_QUEUED,
                 clock: Callable[[], float] = time.monotonic,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self.max_queued = max_queued
        self._clock = clock
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._tokenize_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._pending: collections.deque[ScheduledRequest] = collections.deque()
        self._in_engine: dict[str, ScheduledRequest] = {}  # engine_id → request
        self._leaving: list[str] = []  # engine ids to abort before the next step
        self._engine_ids = (str(n) for n in itertools.count())
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.accepting = True
        self.state = "ready"
        self.failure: BaseException | None = None
        self.fault: str | None = None  # a recovered step failure that says the daemon needs a look (corrupt store)
        self.step_failures = 0  # steps that failed and were recovered from
        self._step_started_s: float | None = None
        self._started_s = clock()
        self._window: collections.deque[_StepRecord] = collections.deque()
        self.requests_completed = 0
        self.requests_failed = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ requests

    async def submit(self, request_id: str, prompt, params, on_reply: Callable[[object], bool], chat: bool = False,
                     stream: bool = True) -> ScheduledRequest:
        """Queue a request; raises RequestRejected when it cannot run (bad prompt, full queue, shutting down).

        prompt: text, or a list of {"role", "content"} chat messages.
        """
        arrival_s = self._clock()
        self._check_accepting()
        try:
            params.validate()
        except ValueError as error:
            raise self._rejected(ErrorCode.INVALID_REQUEST, f"generate: {error}") from None
        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(self._tokenize_thread, self.engine.encode_prompt, prompt, chat)
        except ValueError as error:  # RequestError, ChatTemplateError
            raise self._rejected(ErrorCode.INVALID_REQUEST, f"generate: {error}") from None
        self._check_accepting()  # the daemon may have started draining meanwhile
        if not prompt_ids:
            raise self._rejected(ErrorCode.INVALID_REQUEST, "generate: the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.engine.max_context:
            raise self._rejected(
                ErrorCode.PROMPT_TOO_LONG,
                f"generate: the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{self.engine.max_context}; shorten it (or run with a larger --max-context)")
        if len(self._pending) >= self.max_queued:
            raise self._rejected(ErrorCode.OVERLOADED, f"the daemon already queues {len(self._pending)} requests; "
                                                       "retry later or send fewer at once")
        request = ScheduledRequest(request_id=request_id, engine_id=next(self._engine_ids), prompt_ids=prompt_ids,
                                   params=params, stream=stream, on_reply=on_reply, arrival_s=arrival_s,
                                   last_reply_s=arrival_s)
        self._pending.append(request)
        self._idle.clear()
        self._wake.set()
        return request

    def cancel(self, request: ScheduledRequest, reply: object | None = None) -> bool:
        """Take a request out (queued or running); `reply` (a final or an error), if given, is its last message.

        Returns False when it had already finished.
        """
        if request.done:
            return False
        if request in self._pending:
            self._pending.remove(request)
        elif self._in_engine.pop(request.engine_id, None) is not None:
            self._leaving.append(request.engine_id)
            self._wake.set()
        request.done = True
        if reply is not None:
            self._send(request, reply)
        self._update_idle()
        return True

    def record_refused(self) -> None:
        """A request refused before it reached submit() (unreadable frame, bad field) counts as failed."""
        self.requests_failed += 1

    def cancelled_final(self, request: ScheduledRequest) -> FinalMessage:
        return self._final(request, "cancelled", self._clock())

    @property
    def requests_running(self) -> int:
        return len(self._in_engine)

    @property
    def requests_queued(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Step the engine while there is work, until close(); an engine failure fails every request, then raises."""
        loop = asyncio.get_running_loop()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            while True:
                self._apply_leaving()
                self._admit()
                if not self._in_engine and not self.engine.has_unfinished():
                    if self._closing:
                        return
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_INTERVAL_S)
                    except TimeoutError:  # idle: a worker that died meanwhile is restarted now, not on a request
                        await self._check_idle_engine()
                    continue
                self._step_started_s = self._clock()
                try:
                    outputs, stats = await loop.run_in_executor(self._step_thread, self._step_in_thread)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    self._step_started_s = None
                    if await self._recover(error):
                        continue
                    raise
                except BaseException as error:
                    self._fail_everything(error)
                    raise
                finally:
                    self._step_started_s = None
                self._dispatch(outputs, stats)
        finally:
            heartbeat.cancel()

    def close(self) -> None:
        """Let run() return once the engine is empty (drain or cancel first)."""
        self._closing = True
        self.accepting = False
        self._wake.set()

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; wait up to timeout_s for running and queued requests; cancel the rest. Returns how many."""
        self.accepting = False
        self.state = "draining"
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return 0
        except TimeoutError:
            return self.cancel_all(lambda request: ErrorReply(
                request.request_id, ErrorCode.SHUTTING_DOWN,
                f"the daemon is shutting down and its {timeout_s:g} s drain ran out before this request "
                "finished; send it again when the daemon is back"))

    def cancel_all(self, last_reply: Callable[[ScheduledRequest], object] | None = None) -> int:
        """Cancel every queued and running request (last_reply(request), if given, is its last message)."""
        left = list(self._pending) + list(self._in_engine.values())
        for request in left:
            self.cancel(request, last_reply(request) if last_reply is not None else None)
        return len(left)

    def shutdown_threads(self) -> None:
        self._step_thread.shutdown(wait=True)
        self._tokenize_thread.shutdown(wait=True)

    def _step_in_thread(self):
        outputs = self.engine.step()
        stats = list(self.engine.token_stats)
        self.engine.token_stats.clear()  # the daemon runs for weeks: keep only what the window needs
        return outputs, stats

    def _apply_leaving(self) -> None:
        for engine_id in self._leaving:
            self.engine.abort(engine_id)
        self._leaving.clear()

    def _admit(self) -> None:
        free_slots = self.engine.max_batch - self.engine.num_running - self.engine.num_waiting
        # the engine's own admission budget: the scheduler hands it no more than one step will prefill
        budget = self.engine.prefill_token_budget if self._in_engine else math.inf
        admitted = 0
        while self._pending and free_slots > 0:
            request = self._pending[0]
            if admitted and len(request.prompt_ids) > budget:
                break
            self._pending.popleft()
            try:
                self.engine.add_request(request.prompt_ids, request.params, request_id=request.engine_id)
            except Exception as error:  # RequestError (ValueError) is the request's fault; anything else a bug
                request.done = True
                self.requests_failed += 1
                code = ErrorCode.INVALID_REQUEST if isinstance(error, ValueError) else ErrorCode.INTERNAL
                self._send(request, ErrorReply(request.request_id, code, f"generate: {error}"))
                continue
            request.admitted_s = self._clock()
            self._in_engine[request.engine_id] = request
            budget -= len(request.prompt_ids)
            free_slots -= 1
            admitted += 1

    def _dispatch(self, outputs, stats: list[dict]) -> None:
        now = self._clock()
        self._record_step(now, len(outputs), stats)
        for out in outputs:
            request = self._in_engine.get(out.request_id)
            if request is None:  # cancelled while the step ran
                continue
            if request.first_token_s is None:
                request.first_token_s = now
            request.token_ids.extend(out.new_token_ids)
            request.text_parts.append(out.new_text)
            self.tokens_generated += len(out.new_token_ids)
            if request.stream and not self._send(request, TokenChunk(request.request_id, out.new_text,
                                                                     list(out.new_token_ids))):
                continue
            if out.finished:
                del self._in_engine[out.request_id]
                request.done = True
                self.requests_completed += 1
                self._send(request, self._final(request, out.finish_reason, now))
        self._update_idle()

    def _send(self, request: ScheduledRequest, reply) -> bool:
        """Hand a reply to the client; a client that cannot be reached any more is cancelled silently."""
        request.last_reply_s = self._clock()
        try:
            delivered = request.on_reply(reply)
        except Exception:
            log.exception("delivering a reply to request %r failed; cancelling it", request.request_id)
            delivered = False
        if not delivered and not request.done:
            log.info("client of request %r is gone; cancelling it", request.request_id)
            self.cancel(request)
        return delivered

    def _final(self, request: ScheduledRequest, finish_reason: str, now: float) -> FinalMessage:
        first = request.first_token_s
        decode_ms = (now - first) * 1e3 if first is not None else 0.0
        decode_tokens = max(len(request.token_ids) - 1, 0)
        started = request.admitted_s if request.admitted_s is not None else now
        return FinalMessage(
            id=request.request_id, text="".join(request.text_parts), token_ids=list(request.token_ids),
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.token_ids)),
            timings=Timings(queued_ms=(started - request.arrival_s) * 1e3,
                            time_to_first_token_ms=((first or now) - request.arrival_s) * 1e3,
                            decode_ms=decode_ms, total_ms=(now - request.arrival_s) * 1e3,
                            decode_tokens_per_s=decode_tokens / (decode_ms / 1e3) if decode_ms > 0 else 0.0))

    async def _recover(self, error: Exception) -> bool:
        """A step failed: fail the requests in it with an error saying what to do, let the engine recover
        (restart its workers), and go on with the queued ones. False (everything failed) when it cannot."""
        code, message = step_failure_reply(error)
        log.error("a step failed (%s: %s); failing its %d requests", type(error).__name__, error,
                  len(self._in_engine))
        failed = list(self._in_engine.values())
        for request in failed:
            self.cancel(request, ErrorReply(request.request_id, code, message))
        self.requests_failed += len(failed)
        self._apply_leaving()
        if code == ErrorCode.STORE_CORRUPT:
            self.fault = message
        if self._closing:  # shutting down (maybe a stuck step we interrupted): nothing to recover for
            self.engine.abort_all()
            return True
        self.state = "recovering"
        try:
            recovered = await asyncio.get_running_loop().run_in_executor(self._step_thread, self.engine.recover,
                                                                         error)
        except Exception as recover_error:
            log.error("recovering from the failed step failed: %s", recover_error)
            self._fail_everything(recover_error)
            raise recover_error from error
        finally:
            if self.state == "recovering":
                self.state = "ready" if self.accepting else "draining"
        if not recovered:
            self._fail_everything(error)
            return False
        self.step_failures += 1
        log.warning("recovered from the failed step; serving the %d queued requests", len(self._pending))
        return True

    async def _check_idle_engine(self) -> None:
        check = getattr(self.engine, "check_workers", None)
        if check is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._step_thread, check)
        except Exception as error:  # the restart failed or its budget is spent
            self._fail_everything(error)
            raise

    def interrupt_step(self) -> bool:
        """Make a running step fail now (workers killed) when it is stuck; True if one was running."""
        if self._step_started_s is None:
            return False
        self.engine.interrupt()
        return True

    def _fail_everything(self, error: BaseException) -> None:
        log.error("engine step failed; failing every request", exc_info=error)
        self.failure = error
        self.accepting = False
        self.requests_failed += self.cancel_all(lambda request: ErrorReply(
            request.request_id, ErrorCode.INTERNAL,
            f"the engine failed ({type(error).__name__}: {error}); the daemon is restarting, send the request again"))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S / 2)
            quiet_since = self._clock() - HEARTBEAT_INTERVAL_S
            for request in list(self._pending) + list(self._in_engine.values()):
                if request.last_reply_s < quiet_since and not request.done:
                    self._send(request, Heartbeat(request.request_id))

    def _check_accepting(self) -> None:
        if self.failure is not None:
            raise self._rejected(ErrorCode.INTERNAL, f"the engine failed ({self.failure}); the daemon is restarting")
        if not self.accepting:
            raise self._rejected(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down and takes no new requests; "
                                                          "send it again once it is back")

    def _rejected(self, code: str, message: str) -> RequestRejected:
        self.requests_failed += 1
        return RequestRejected(code, message)

    def _update_idle(self) -> None:
        if not self._pending and not self._in_engine:
            self._idle.set()

    # ------------------------------------------------------------------ metrics

    def _record_step(self, now: float, outputs: int, stats: list[dict]) -> None:
        record = _StepRecord(end_s=now, tokens=outputs, decode_batch=0, decode_ms=0.0, io_ms=0.0, compute_ms=0.0,
                             flash_bytes=0, cache_hits=0, neurons_needed=0)
        for s in stats:  # one per decode step; engine.step() makes at most one
            record.decode_batch += s["batch"]
            record.decode_ms += s["ms"]
            record.io_ms += s.get("io_ms", 0.0)
            record.compute_ms += s.get("ffn_compute_ms", 0.0)
            record.flash_bytes += s.get("flash_read_bytes", 0)
            record.cache_hits += s.get("cache_hits", 0)
            record.neurons_needed += s.get("cache_hits", 0) + s.get("neurons_read", 0)
        self._window.append(record)
        while self._window and self._window[0].end_s < now - METRICS_WINDOW_S:
            self._window.popleft()

    def healthy(self) -> bool:
        """Answers from state at hand (the watchdog calls it on the loop): not failed, and no step is stuck."""
        if self.failure is not None or self.state == "loading":
            return False
        return not self.step_stuck()

    def step_stuck(self) -> bool:
        started = self._step_started_s
        return started is not None and self._clock() - started >= self.step_timeout_s

    def status(self, request_id: str, model: str, mode: str) -> StatusReply:
        now = self._clock()
        while self._window and self._window[0].end_s < now - METRICS_WINDOW_S:
            self._window.popleft()
        records = list(self._window)
        window_s = min(METRICS_WINDOW_S, now - self._started_s)
        tokens = sum(r.tokens for r in records)
        decode_steps = [r for r in records if r.decode_batch]
        decoded = sum(r.decode_batch for r in decode_steps)
        needed = sum(r.neurons_needed for r in records)
        per_step = (lambda total: total / len(decode_steps)) if decode_steps else (lambda total: 0.0)
        return StatusReply(
            id=request_id, state=self.state, ok=self.healthy() and self.fault is None, model=model, mode=mode,
            max_batch=self.engine.max_batch, requests_running=self.requests_running,
            requests_queued=self.requests_queued, requests_completed=self.requests_completed,
            requests_failed=self.requests_failed, tokens_generated=self.tokens_generated,
            uptime_s=now - self._started_s, window_s=window_s,
            tokens_per_s=tokens / window_s if window_s > 0 else 0.0,
            steps_per_s=len(records) / window_s if window_s > 0 else 0.0,
            mean_batch=decoded / len(decode_steps) if decode_steps else 0.0,
            step_ms=per_step(sum(r.decode_ms for r in decode_steps)),
            io_ms_per_step=per_step(sum(r.io_ms for r in decode_steps)),
            compute_ms_per_step=per_step(sum(r.compute_ms for r in decode_steps)),
            flash_bytes_per_token=sum(r.flash_bytes for r in decode_steps) / decoded if decoded else 0.0,
            cache_hit_rate=sum(r.cache_hits for r in records) / needed if needed else None,
            head_precision=self.engine.config.head_precision)
