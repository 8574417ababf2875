"""The in-process engine: a continuous-batching generation core over one store.

Requests join with `add_request()` and leave when finished or `abort()`ed; each
`step()` prefills newly admitted prompts and runs one batched decode step for
every running sequence (each at its own position in its own KV-cache slot).
`generate()` drives steps until a list of prompts is done; the daemon's
scheduler calls `step()` itself. The FFN comes from an FFN provider (dense,
naive flash, sparse flash), the rest of the model is resident.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch

from flashllm.runtime.core.sampling import NonFiniteLogitsError, SamplingParams, sample_next_token
from flashllm.runtime.core.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from flashllm.workers.flash_io.integrity import BundleChecksumError
from flashllm.workers.malloc_tuning import limit_malloc_growth, release_free_memory
from flashllm.runtime.core.executors import executor_class
from flashllm.workers.engine_config import ANY_SPARSE_FLAG, EngineConfig, SparseOptions
from flashllm.workers.interfaces import Executor
from flashllm.workers.memory_plan import max_context_of
from flashllm.workers.store_reader import open_store

PREFILL_TOKEN_BUDGET = 2048  # prompt tokens prefilled per step, so decode is not starved
FLASH_MODES = ("naive", "sparse")
# a step that failed with one of these leaves the engine usable once its sequences are dropped
RECOVERABLE_STEP_ERRORS = (NonFiniteLogitsError, BundleChecksumError)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(mode: str) -> int | None:
    """torch threads for an engine of `mode`; None leaves the process's setting (torch: all cores, or OMP_NUM_THREADS).

    Modes that read flash leave one core to the reader threads (and, with --runtime workers, to the
    prefetch process): one decode token's products are memory-bound, so a last torch thread buys them
    little and slows the reads it competes with (docs/benchmarks.md, "Sparse mode on the float32 demo
    store", has the runs). An OMP_NUM_THREADS the user set is respected.
    """
    if mode not in FLASH_MODES or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, available_cores() - 1)


class RequestError(ValueError):
    """A request the engine refuses (too long, bad parameters); the message says what to change."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    ms_per_token: float  # decode steps only
    flash_read_bytes: int  # device reads during this generate() call (executor.flash_read_bytes(): /proc/<pid>/io)
    token_stats: list[dict] = field(default_factory=list)


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    next_input: int | None = None  # sampled but not yet fed back
    finished: bool = False
    finish_reason: str | None = None


_KEYWORD_DEFAULTS = dict(mode="dense", max_batch=8, max_context=None, device=None, verify=True, runtime="inproc",
                         resident_dtype=None, threads=None, worker_restarts=None, memory_budget_bytes=None,
                         sparse=None)  # Engine's keyword defaults, to tell keywords given from config=


def _config_from_keywords(keywords: dict, ffn_options: dict | None) -> EngineConfig:
    """Engine's keywords (and an older caller's ffn_options dict) as the EngineConfig they mean."""
    if ffn_options:
        options = dict(ffn_options)
        if "memory_budget_bytes" in options:
            keywords = {**keywords, "memory_budget_bytes": options.pop("memory_budget_bytes")}
        if options:
            if keywords["sparse"] is not None:
                raise ValueError("give the sparse options either as sparse=SparseOptions(...) or in ffn_options")
            keywords = {**keywords, "sparse": SparseOptions.from_dict(options)}
    return EngineConfig(**keywords)


class Engine:
    def __init__(self, store_dir: str, mode: str = "dense", max_batch: int = 8, max_context: int | None = None,
                 device: str | None = None, verify: bool = True, ffn_options: dict | None = None,
                 executor: Executor | None = None, runtime: str = "inproc", resident_dtype: str | None = None,
                 threads: int | None = None, worker_restarts: int | None = None, *,
                 memory_budget_bytes: int | None = None, sparse: SparseOptions | None = None,
                 config: EngineConfig | None = None):
        """An engine over the store in `store_dir`, set up by `config` (an EngineConfig) or, the same
        settings one by one, by the keywords (see EngineConfig for each; giving both is an error).

        threads: torch threads of the model's compute (this process, or the compute worker);
        None: `default_threads(mode)`. torch's thread count is per process, so this sets it for the process.
        ffn_options: the sparse options and memory_budget_bytes as one dict (older callers; the typed
        `sparse=` and `memory_budget_bytes=` say the same). executor: one already built, used as is."""
        keywords = dict(mode=mode, max_batch=max_batch, max_context=max_context, device=device, verify=verify,
                        runtime=runtime, resident_dtype=resident_dtype, threads=threads,
                        worker_restarts=worker_restarts, memory_budget_bytes=memory_budget_bytes, sparse=sparse)
        if config is None:
            config = _config_from_keywords(keywords, ffn_options)
        elif ffn_options is not None or keywords != _KEYWORD_DEFAULTS:
            raise ValueError("give the engine's settings either as config=EngineConfig(...) or as keywords, not both")
        limit_malloc_growth()  # before the store's tensors come and go (workers/malloc_tuning.py)
        self._open_store(store_dir)
        config = self._resolve_mode(self._resolve_context(config))
        config = self._resolve_runtime(config)
        self._set_threads(config)
        self.config = config  # every choice made: what the executor runs
        self.executor = executor if executor is not None else \
            executor_class(config.runtime).from_config(store_dir, self.manifest, config)
        release_free_memory()  # the load's temporaries
        self.runtime = self.executor.runtime  # where the model runs: "inproc" or "workers"
        self.device = "cpu"  # inputs are built on the CPU; the executor moves them
        self.prefill_token_budget = PREFILL_TOKEN_BUDGET  # the one admission budget (the daemon's scheduler asks)
        self._free_slots = list(range(config.max_batch))
        self._waiting: list[_Sequence] = []
        self._running: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.token_stats: list[dict] = []  # one entry per decode step
        self.logits_hook = None  # optional callable(request_id, logits (V,)) seeing every sampled position

    # ------------------------------------------------------------------ setting up

    def _open_store(self, store_dir: str) -> None:
        self.store_dir = store_dir
        self.manifest = open_store(store_dir)
        self.arch = self.manifest.arch
        self.tokenizer = Tokenizer.from_store(store_dir, self.manifest.tokenizer, self.arch.eos_token_ids)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.arch.eos_token_ids)

    def _resolve_context(self, config: EngineConfig) -> EngineConfig:
        self.max_context = max_context_of(self.manifest, config.max_context)
        self.max_batch = config.max_batch
        return replace(config, max_context=self.max_context)

    def _resolve_mode(self, config: EngineConfig) -> EngineConfig:
        """--mode auto decided, the memory plan made for the mode, the sparse caches sized by it."""
        mode, self.memory_plan, self.mode_reason = config.mode, None, f"--mode {config.mode}"
        config = self._resolve_head_precision(config)
        if mode == "auto" and config.memory_budget_bytes is None:  # nothing bounds memory: no plan to choose by
            mode, self.mode_reason = "dense", "--mode auto picked dense: no --memory given, the whole model in memory"
            self._refuse_sparse_options(config, mode, "give --mode sparse")
        if config.memory_budget_bytes is not None:
            plan = self._memory_planner(config)
            if mode == "auto":
                from flashllm.runtime.core.mode_choice import choose_mode

                choice = choose_mode(self.manifest, self.store_dir, config.memory_budget_bytes, plan,
                                     has_predictors=self.manifest.sparsity is not None
                                     or config.sparse_options.trace is not None,
                                     estimate_sparse=self._calibrated_sparse_estimate(config))
                mode, self.mode_reason = choice.mode, f"--mode auto picked {choice.mode}: {choice.reason}"
                self._refuse_sparse_options(config, mode, "give --mode sparse (and a --memory it fits)")
            self.memory_plan = plan(mode)
            if mode == "sparse":
                sparse = replace(config.sparse_options, capacity_rows=tuple(self.memory_plan.capacity_rows))
                config = replace(config, sparse=sparse)
        self.mode = mode
        if mode == "naive" and self.memory_plan is not None:  # the whole layers the budget holds beside its minimum
            return replace(config, mode=mode, naive_held_rows=tuple(self.memory_plan.capacity_rows))
        return replace(config, mode=mode)

    def _resolve_head_precision(self, config: EngineConfig) -> EngineConfig:
        """--head-precision auto decided by the budget (mode_choice.resolve_head_precision); head_reason says
        when it chose the 4-bit sketch."""
        from flashllm.runtime.core.mode_choice import resolve_head_precision
        from flashllm.workers.executor import default_device
        from flashllm.workers.memory_plan import MemoryPlanError, head_sketch_applies

        def fits_as_stored() -> bool:
            try:
                self._memory_planner(replace(config, head_precision="stored"))("dense")
                return True
            except MemoryPlanError:
                return False

        precision = resolve_head_precision(config.head_precision, config.memory_budget_bytes,
                                           head_sketch_applies(self.manifest, config.device or default_device()),
                                           fits_as_stored)
        self.head_reason = None
        if config.head_precision == "auto" and precision == "4bit":
            self.head_reason = ("--head-precision auto picked 4bit: the whole model does not fit --memory, so the "
                                "head is held as a 4-bit sketch (its top 32 logits exact) and the bytes it frees "
                                "hold FFN weights; --head-precision stored keeps it as stored")
        return replace(config, head_precision=precision)

    def _refuse_sparse_options(self, config: EngineConfig, mode: str, fix: str) -> None:
        if mode != "sparse" and config.sparse is not None:
            flag = (config.sparse.flags_set() or [ANY_SPARSE_FLAG])[0]
            raise ValueError(f"{flag} applies to --mode sparse, but {self.mode_reason}; {fix}")

    def _memory_planner(self, config: EngineConfig):
        """mode → the MemoryPlan of this store under config's budget (MemoryPlanError when it cannot fit)."""
        from flashllm.workers.memory_plan import MemoryInputs, plan_memory_for

        def plan(for_mode: str):
            return plan_memory_for(self.store_dir, self.manifest, MemoryInputs.from_config(self.manifest, config,
                                                                                           for_mode))

        return plan

    def _calibrated_sparse_estimate(self, config: EngineConfig):
        """() → sparse's plan on this store once calibrated with calibrate's defaults (estimated_sparse_plan)."""
        from flashllm.workers.memory_plan import MemoryInputs, estimated_sparse_plan

        return lambda: estimated_sparse_plan(self.store_dir, self.manifest,
                                             MemoryInputs.from_config(self.manifest, config, "sparse"))

    @staticmethod
    def _resolve_runtime(config: EngineConfig) -> EngineConfig:
        from flashllm.runtime.core.mode_choice import resolve_runtime

        return replace(config, runtime=resolve_runtime(config.runtime, config.mode, config.device))

    def _set_threads(self, config: EngineConfig) -> None:
        threads = config.threads if config.threads is not None else default_threads(config.mode)
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    # ------------------------------------------------------------------ model

    def forward(self, token_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                logit_steps: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids/positions (B, T), slots (B,) → logits float32: (B, T, V), or (B, V) at logit_steps (B,)."""
        return self.executor.forward(token_ids, slots, positions, logit_steps)

    # ------------------------------------------------------------------ requests

    def encode_prompt(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.arch.vocab_size - 1})")
            return ids
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None,
                    request_id: str | None = None, chat: bool = False) -> str:
        params = params or SamplingParams()
        params.validate()
        prompt_ids = self.encode_prompt(prompt, chat)
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token of text")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_context} "
                f"(model maximum {self.arch.max_position_embeddings}); shorten the prompt or raise --max-context"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._running or any(s.request_id == request_id for s in self._waiting):
            raise RequestError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else torch.seed() % (2**63)
        generator = torch.Generator().manual_seed(seed)
        self._waiting.append(_Sequence(
            request_id=request_id, prompt_ids=prompt_ids, params=params, slot=-1,
            detokenizer=IncrementalDetokenizer(self.tokenizer), stop_matcher=StopStringMatcher(params.stop),
            generator=generator))
        return request_id

    def abort(self, request_id: str) -> bool:
        for i, seq in enumerate(self._waiting):
            if seq.request_id == request_id:
                del self._waiting[i]
                return True
        seq = self._running.pop(request_id, None)
        if seq is None:
            return False
        self._release(seq)
        return True

    def _release(self, seq: _Sequence) -> None:
        self._free_slots.append(seq.slot)
        self.executor.release_slot(seq.slot)

    def abort_all(self) -> None:
        """Drop every sequence (after a failed step: their KV caches and sampling state are not to be trusted)."""
        for request_id in [s.request_id for s in self._waiting] + list(self._running):
            self.abort(request_id)

    def recover(self, error: BaseException) -> bool:
        """After a step raised `error`: drop every sequence, and say whether the engine can serve again
        (a worker crash: after restarting the workers; a model fault on one step's data: as is; anything
        else, a bug, is not trusted). Raises when the restart itself fails or its budget is spent."""
        self.abort_all()
        return self.executor.recover(error) or isinstance(error, RECOVERABLE_STEP_ERRORS)

    def check_workers(self) -> bool:
        """Between steps: restart worker processes that died meanwhile; True if it did (no-op in-process)."""
        return self.executor.check_workers()

    def interrupt(self) -> None:
        """From another thread: make a step that is stuck on a worker fail now (no-op in-process)."""
        self.executor.interrupt()

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        prefilled = set()
        budget = PREFILL_TOKEN_BUDGET
        admitted: list[_Sequence] = []
        while self._waiting and self._free_slots and (budget > 0 or not self._running):
            seq = self._waiting.pop(0)
            seq.slot = self._free_slots.pop(0)
            self._running[seq.request_id] = seq
            budget -= len(seq.prompt_ids)
            admitted.append(seq)
            prefilled.add(seq.request_id)
        for group in self._prefill_groups(admitted):
            outputs.extend(self._prefill(group))
        decoding = [s for s in self._running.values() if s.request_id not in prefilled and not s.finished]
        if decoding:
            outputs.extend(self._decode(decoding))
        for out in outputs:
            if out.finished:
                seq = self._running.pop(out.request_id, None)
                if seq is not None:
                    self._release(seq)
        return outputs

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Consecutive groups prefilled in one forward each, at most max_context padded tokens per group.

        One forward for several prompts reads a flash FFN once instead of once per prompt; a batch-invariant
        sparse engine (EngineConfig.batch_invariant, the default in --mode sparse) prefills each prompt alone."""
        if self.config.batch_invariant:
            return [[seq] for seq in seqs]
        groups: list[list[_Sequence]] = []
        for seq in seqs:
            if groups:
                steps = max(len(s.prompt_ids) for s in [*groups[-1], seq])
                if (len(groups[-1]) + 1) * steps <= self.max_context:
                    groups[-1].append(seq)
                    continue
            groups.append([seq])
        return groups

    def _prefill(self, seqs: list[_Sequence]) -> list[RequestOutput]:
        lengths = [len(s.prompt_ids) for s in seqs]
        steps = max(lengths)
        # right padding repeats each prompt's last token at the positions that follow it: those KV entries
        # lie beyond the prompt, where no real token looks (attention masks keys above the query's
        # position) and decoding overwrites them before it gets there
        ids = torch.tensor([s.prompt_ids + s.prompt_ids[-1:] * (steps - n) for s, n in zip(seqs, lengths)],
                           device=self.device)  # (B, T)
        positions = torch.arange(steps, device=self.device).repeat(len(seqs), 1)  # (B, T)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)  # (B,)
        last_steps = torch.tensor([n - 1 for n in lengths], device=self.device)  # (B,) each prompt's last token
        logits = self.forward(ids, slots, positions, last_steps)  # (B, V)
        return [self._accept(seq, logits[i]) for i, seq in enumerate(seqs)]

    def _decode(self, seqs: list[_Sequence]) -> list[RequestOutput]:
        ids = torch.tensor([[s.next_input] for s in seqs])  # (B, 1)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.generated) - 1] for s in seqs])  # (B, 1)
        slots = torch.tensor([s.slot for s in seqs])  # (B,)
        logits = self._timed_decode_forward(ids, slots, positions)  # (B, V)
        return [self._accept(seq, logits[i]) for i, seq in enumerate(seqs)]

    def _timed_decode_forward(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step (B, 1) → logits (B, V), appending its accounting to token_stats.

        flash_read_bytes: what the reading process (this one, or the prefetch worker) got from the
        device; compute_ms: the computing thread's or process's busy time, measured where it runs; io_ms: the
        reads' own time, overlapped or not; wait_ms: what compute waited on them."""
        self.executor.ffn_stats.reset()
        read_before = self.executor.flash_read_bytes()
        start = time.perf_counter()
        logits = self.forward(ids, slots, positions)[:, -1]  # (B, V)
        elapsed_s = time.perf_counter() - start
        stats = self.executor.ffn_stats
        self.token_stats.append({
            "batch": int(ids.shape[0]), "ms": elapsed_s * 1e3,
            "flash_read_bytes": self.executor.flash_read_bytes() - read_before,
            "reader_read_bytes": stats.read_bytes, "io_ms": stats.io_s * 1e3, "ffn_compute_ms": stats.compute_s * 1e3,
            "compute_ms": stats.compute_busy_s(elapsed_s) * 1e3, "wait_ms": stats.wait_time_s() * 1e3,
            "neurons_computed": stats.neurons_computed, "neurons_predicted": stats.neurons_predicted,
            "cache_hits": stats.cache_hits, "neurons_read": stats.neurons_read,
        })
        return logits

    def teacher_forced(self, token_ids: list[int]) -> tuple[float, int, list[int]]:
        """Feed token_ids one decode step at a time (the real decode path: predictor, window, cache).

        Returns (sum of -log p(next token), tokens predicted, argmax prediction at each position);
        every step's accounting lands in token_stats.
        """
        if not self._free_slots:
            raise RequestError("no free KV slot; wait for running requests to finish")
        length = min(len(token_ids), self.max_context)
        slot = torch.tensor([self._free_slots[0]])
        nll, argmax = 0.0, []
        for position in range(length - 1):
            logits = self._timed_decode_forward(torch.tensor([[token_ids[position]]]), slot,
                                                torch.tensor([[position]]))[0]  # (V,)
            nll -= float(torch.log_softmax(logits, dim=-1)[token_ids[position + 1]])
            argmax.append(int(logits.argmax()))
        self.executor.release_slot(int(slot[0]))
        return nll, length - 1, argmax

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> RequestOutput:
        if self.logits_hook is not None:
            self.logits_hook(seq.request_id, logits)
        token = sample_next_token(logits, seq.params, seq.generator)
        seq.generated.append(token)
        seq.next_input = token
        new_text, reason = "", None
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        else:
            emitted, hit = seq.stop_matcher.feed(seq.detokenizer.push(token))
            new_text = emitted
            if hit:
                reason = "stop"
        if reason is None and len(seq.generated) >= seq.params.max_tokens:
            reason = "length"
        if reason is None and len(seq.prompt_ids) + len(seq.generated) >= self.max_context:
            reason = "length"
        if reason is not None:
            seq.finished, seq.finish_reason = True, reason
            if reason == "length":
                new_text += seq.stop_matcher.flush()
        return RequestOutput(seq.request_id, [token], new_text, seq.finished, reason,
                             len(seq.prompt_ids), len(seq.generated))

    # ------------------------------------------------------------------ conveniences

    def generate(self, prompts: list, params: SamplingParams | None = None, chat: bool = False,
                 on_output=None) -> list[GenerationResult]:
        """Generate for every prompt (batched); on_output(index, RequestOutput) streams as tokens arrive."""
        params = params or SamplingParams()
        index_of, texts, tokens, reasons, prompt_lens = {}, {}, {}, {}, {}
        for i, prompt in enumerate(prompts):
            try:
                rid = self.add_request(prompt, params, chat=chat)
            except Exception:
                for queued in index_of:  # a refused prompt refuses the whole call: queue none of it
                    self.abort(queued)
                raise
            index_of[rid], texts[i], tokens[i] = i, [], []
        first_stat = len(self.token_stats)
        read_before = self.executor.flash_read_bytes()
        while any(rid in self._running or any(s.request_id == rid for s in self._waiting) for rid in index_of):
            for out in self.step():
                i = index_of.get(out.request_id)
                if i is None:
                    continue
                texts[i].append(out.new_text)
                tokens[i].extend(out.new_token_ids)
                prompt_lens[i] = out.prompt_tokens
                if out.finished:
                    reasons[i] = out.finish_reason
                if on_output:
                    on_output(i, out)
        stats = self.token_stats[first_stat:]
        decode_ms = sorted(s["ms"] for s in stats)
        ms_per_token = decode_ms[len(decode_ms) // 2] if decode_ms else math.nan
        read_bytes = self.executor.flash_read_bytes() - read_before
        return [GenerationResult(text="".join(texts[i]), tokens=tokens[i], finish_reason=reasons[i],
                                 prompt_tokens=prompt_lens[i], ms_per_token=ms_per_token,
                                 flash_read_bytes=read_bytes, token_stats=stats)
                for i in range(len(prompts))]

    def score(self, token_ids: list[int], window_tokens: int = 1024) -> tuple[float, int]:
        """Negative log-likelihood sum and count of predicted tokens over non-overlapping windows."""
        nll, count = 0.0, 0
        slot = self._free_slots[0] if self._free_slots else None
        if slot is None:
            raise RequestError("no free KV slot for scoring; wait for running requests to finish")
        window_tokens = min(window_tokens, self.max_context)
        for start in range(0, len(token_ids) - 1, window_tokens):
            window = token_ids[start:start + window_tokens]
            if len(window) < 2:
                break
            ids = torch.tensor([window], device=self.device)
            positions = torch.arange(len(window), device=self.device)[None]
            logits = self.forward(ids, torch.tensor([slot], device=self.device), positions)[0]  # (T, V)
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = ids[0, 1:]
            nll -= float(logprobs.gather(1, targets[:, None]).sum())
            count += len(window) - 1
        return nll, count

    def perplexity(self, text: str, window_tokens: int = 1024) -> tuple[float, int]:
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise RequestError("the evaluation text has fewer than 2 tokens")
        nll, count = self.score(ids, window_tokens)
        return math.exp(nll / count), count

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

