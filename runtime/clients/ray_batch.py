"""`flashllm batch ... --ray [ADDRESS|auto|local]`: the same resumable batch, fanned out to engines on a Ray cluster.

The driver (this process) reads IN, skips the ids already in OUT (batch.py's
rules), places N replicas with a placement group (one per node when the
cluster has that many nodes that fit one), and hands prompts to them; each
replica is a Ray actor holding batch.py's in-process backend (the daemon's
continuous-batching scheduler over an Engine) on the store at the same path
on its node. Only the driver writes OUT, one flushed line per id as results
arrive, so a killed driver resumes like the single-machine batch.

Faults: a replica that dies (kill -9, its node lost) fails the prompts it was
running; the driver puts them back at the head of the queue for the other
replicas or for the replica's restart (Ray restarts it up to
REPLICA_MAX_RESTARTS times). A prompt whose replica died under it
MAX_ATTEMPTS_PER_PROMPT times is recorded as an error line instead of being
retried forever; a prompt the model refuses is recorded as today.

Ray is imported here only, and this module only when --ray is given.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

from flashllm.protocol.client_api import ErrorCode, ErrorReply, FinalMessage, GenerateRequest
from flashllm.protocol.store_format import MANIFEST_FILE
from flashllm.runtime.clients.batch import (
    OVERLOADED_RETRY_S, PROMPT_ERRORS, BatchItem, InProcessBackend, RunStopped, result_line,
)
from flashllm.runtime.clients.cli import CliError
from flashllm.runtime.core.engine_config import parse_size

REPLICA_MAX_RESTARTS = 3  # Ray restarts a dead replica this often before the driver gives up on it
MAX_ATTEMPTS_PER_PROMPT = 3  # replica deaths under one prompt before it is recorded as an error
PLACEMENT_TIMEOUT_S = 120.0  # waiting for the cluster to have room for every replica
RESTART_TIMEOUT_S = 300.0  # waiting for a dead replica's restart (a lost node's replica may find no room)
RESTART_POLL_S = 0.5
STARTUP_TIMEOUT_S = 3600.0  # loading a large store from a slow disk takes long; a stuck start should not hang forever
CLOSE_TIMEOUT_S = 30.0
RAY_HINT = "pip install 'flashllm[ray]' on this machine and on every node"


# ---------------------------------------------------------------------- the replica (a Ray actor)


@dataclass
class ReplicaOptions:
    """What each replica builds its engine from: the engine flags of `flashllm batch`, one value per replica."""

    store: str
    mode: str
    max_batch: int
    threads: int
    max_context: int | None = None
    memory: str | None = None  # the budget of each replica's engine, e.g. "2GiB"
    keep_fraction: float | None = None
    neuron_window: int | None = None
    missing_policy: str | None = None
    compute_set: str | None = None
    resident_dtype: str | None = None
    runtime: str = "auto"


@dataclass
class ReplicaResources:
    """What Ray books on a node for each replica."""

    cpus: int  # the engine's torch threads, too
    gpus: float = 0.0
    memory_bytes: int = 0  # the engine's --memory budget; 0: none given, nothing booked

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.cpus)}
        if self.gpus > 0:
            bundle["GPU"] = float(self.gpus)
        if self.memory_bytes:
            bundle["memory"] = float(self.memory_bytes)
        return bundle


@dataclass
class ReplicaInfo:
    index: int
    node_id: str
    host: str
    ip: str
    pid: int
    threads: int = 0
    startup_error: str | None = None  # why the engine did not start (store mismatch, bad --memory, ...)

    def where(self) -> str:
        return f"replica {self.index} on node {self.node_id[:12]} ({self.host}, {self.ip})"


class ReplicaUnusable(Exception):
    """The replica's engine did not start; its ReplicaInfo says why."""


def manifest_checksum(store_dir: str) -> str:
    """sha256 of the store's manifest, which holds every region's checksum: equal manifests, equal stores."""
    with open(os.path.join(store_dir, MANIFEST_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class EngineReplica:
    """One engine on one node; wrapped by ray.remote() in the driver and run as an async actor.

    Ray re-runs __init__ when it restarts the actor, so a restarted replica builds its engine again.
    A user error (another store at the path, a --memory that does not fit) does not kill the actor:
    ready() reports it, so the driver can name the node."""

    def __init__(self, index: int, options: ReplicaOptions, driver_checksum: str):
        import ray

        self._backend = None
        self.info = ReplicaInfo(index=index, node_id=ray.get_runtime_context().get_node_id(),
                                host=socket.gethostname(), ip=ray.util.get_node_ip_address(), pid=os.getpid())
        try:
            try:
                checksum = manifest_checksum(options.store)
            except FileNotFoundError:
                raise CliError(f"there is no store at {options.store} on this node; copy the driver's store to the "
                               "same path here") from None
            if checksum != driver_checksum:
                raise CliError(f"the store at {options.store} here has manifest checksum {checksum[:16]}…, the "
                               f"driver's has {driver_checksum[:16]}…: it is another store (or another version of "
                               "it); copy the driver's store to the same path on this node")
            self._backend = InProcessBackend(options)  # the daemon's scheduler over an Engine, in this actor's loop
        except Exception as error:  # a missing store, a --memory that does not fit, ...: reported by node
            self.info.startup_error = str(error) if isinstance(error, CliError) else f"{type(error).__name__}: {error}"
            return
        import torch

        self.info.threads = torch.get_num_threads()  # what the engine set for this process

    async def ready(self) -> ReplicaInfo:
        return self.info

    async def generate(self, request: GenerateRequest) -> FinalMessage | ErrorReply:
        if self._backend is None:
            raise ReplicaUnusable(f"{self.info.where()}: {self.info.startup_error}")
        return await self._backend.generate(request)

    async def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()


# ---------------------------------------------------------------------- the driver


def _import_ray():
    try:
        import ray
    except ModuleNotFoundError as error:
        if error.name != "ray":
            raise
        raise CliError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


@dataclass
class ReplicaTally:
    info: ReplicaInfo
    prompts: int = 0
    tokens: int = 0
    restarts: int = 0  # deaths the driver saw (each followed by a restart, or by retiring it)
    requeued: int = 0  # prompts it was running when it died, handed back to the queue
    restarting: bool = False  # died; Ray is starting it again
    retired: bool = False  # gone for good (out of restarts, or its restart could not start the engine)


@dataclass
class RunSummary:
    replicas: int
    nodes: int
    prompts: int  # lines written in this run (errors included)
    failed: int
    tokens: int
    startup_s: float  # connecting, placing the replicas and loading their engines
    wall_s: float  # from the first prompt sent to the last line written
    tokens_per_s: float
    requeued: int
    per_replica: list[dict] = field(default_factory=list)


def run_on_ray(args, todo: list[BatchItem]) -> int:
    """`flashllm batch ... --ray`: returns the exit status; user errors are CliError."""
    if not args.store:
        raise CliError("--ray needs --store STORE: the store's path, the same on every node")
    if getattr(args, "threads", None) is not None:
        raise CliError("with --ray give --threads-per-replica T (the CPUs of each engine), not --threads")
    if args.max_batch < 1:
        raise CliError(f"--max-batch {args.max_batch} is invalid: give at least 1")
    resources = ReplicaResources(cpus=args.threads_per_replica or 1, gpus=args.gpus_per_replica or 0.0,
                                 memory_bytes=parse_size(args.memory) if args.memory else 0)
    if resources.gpus < 0:
        raise CliError(f"--gpus-per-replica {resources.gpus} is invalid: give 0 or more")
    store = os.path.abspath(args.store)  # the path every node opens: relative to here, not to each node
    from flashllm.workers.store_reader import open_store

    open_store(store)  # the driver's own store must be sound: it is what every replica is checked against
    concurrency = args.concurrency or 2 * args.max_batch  # per replica, as --store alone
    if concurrency < 1:
        raise CliError(f"--concurrency {concurrency} is invalid: give at least 1")
    options = ReplicaOptions(store=store, mode=args.mode, max_batch=args.max_batch, threads=resources.cpus,
                             max_context=args.max_context, memory=args.memory, keep_fraction=args.keep_fraction,
                             neuron_window=args.neuron_window, missing_policy=args.missing_policy,
                             compute_set=args.compute_set,
                             resident_dtype=args.resident_dtype, runtime=args.runtime)
    ray = _import_ray()
    started_s = time.monotonic()
    # Ray prints the cluster's error messages (a worker died, ...) on stdout; stdout is for --json alone
    with contextlib.redirect_stdout(sys.stderr):
        _connect(ray, args.ray)
        try:
            summary = asyncio.run(_run(ray, args, options, resources, manifest_checksum(store), concurrency,
                                       todo, started_s))
        except RunStopped as stop:
            raise CliError(f"{stop}; the finished prompts are in {args.out}, run the same command again to do "
                           "the rest") from None
        finally:
            ray.shutdown()
    _print_summary(args, summary)
    return 0


def _connect(ray, address: str) -> None:
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as error:
        raise CliError(f"no Ray cluster at --ray {address} ({error}); start one with `ray start --head` (and "
                       "`ray start --address HEAD:6379` on the other nodes), or give --ray local") from None


def _placement(ray, resources: ReplicaResources, replicas: int | None) -> tuple[int, int, str]:
    """(replicas, nodes that can hold one, placement strategy); one replica per node by default."""
    bundle = resources.bundle()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    roomy = [n for n in nodes if all(n["Resources"].get(k, 0.0) >= v for k, v in bundle.items())]
    if not roomy:
        raise CliError(f"no node of the Ray cluster can hold a replica asking for {_describe(bundle)} (nodes: "
                       + "; ".join(_describe(n["Resources"]) for n in nodes)
                       + "); lower --threads-per-replica, --gpus-per-replica or --memory")
    replicas = replicas or len(roomy)
    strategy = "STRICT_SPREAD" if len(roomy) >= replicas else "SPREAD"  # more replicas than nodes: pack some
    return replicas, len(roomy), strategy


def _describe(resources: dict) -> str:
    parts = []
    for key in ("CPU", "GPU", "memory"):
        if key in resources:
            value = resources[key]
            parts.append(f"{value / 2**30:.1f} GiB memory" if key == "memory" else f"{value:g} {key}")
    return ", ".join(parts) or "nothing"


async def _run(ray, args, options: ReplicaOptions, resources: ReplicaResources, checksum: str, concurrency: int,
               todo: list[BatchItem], started_s: float) -> RunSummary:
    from tqdm import tqdm

    replicas = ReplicaSet(ray)
    try:
        await replicas.start(args.replicas, resources, options, checksum, concurrency)
        infos = [tally.info for tally in replicas.tallies]
        nodes = len({info.node_id for info in infos})
        print(f"{len(infos)} replicas on {nodes} nodes: "
              + ", ".join(f"{info.index}@{info.node_id[:8]} ({info.host})" for info in infos), file=sys.stderr)
        progress = tqdm(total=len(todo), unit="prompt", desc="batch", disable=args.quiet, file=sys.stderr,
                        dynamic_ncols=True)
        try:
            run = BatchRun(ray, args.out, todo, replicas.actors, replicas.tallies, progress)
            await run.drive(concurrency)
        finally:
            progress.close()
    finally:
        await replicas.stop()
    wall_s = run.wall_s()

    def rate(tokens: int) -> float:
        return tokens / wall_s if wall_s > 0 else 0.0

    return RunSummary(
        replicas=len(infos), nodes=nodes, prompts=run.written, failed=run.failed, tokens=run.tokens,
        startup_s=run.first_sent_s - started_s, wall_s=wall_s, tokens_per_s=rate(run.tokens),
        requeued=sum(t.requeued for t in replicas.tallies),
        per_replica=[{**asdict(t.info), "prompts": t.prompts, "tokens": t.tokens, "restarts": t.restarts,
                      "requeued": t.requeued, "retired": t.retired, "tokens_per_s": rate(t.tokens)}
                     for t in replicas.tallies])


class ReplicaSet:
    """The run's placement group and its EngineReplica actors, from placing them to ending them."""

    def __init__(self, ray):
        self._ray = ray
        self._group = None
        self.actors: list = []
        self.tallies: list[ReplicaTally] = []
        self._started: set[int] = set()  # replicas whose __init__ is over (their engine is up, or failed)

    async def start(self, replicas: int | None, resources: ReplicaResources, options: ReplicaOptions, checksum: str,
                    concurrency: int) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        count, nodes, strategy = _placement(self._ray, resources, replicas)
        bundle = resources.bundle()
        self._group = placement_group([bundle] * count, strategy=strategy)
        try:
            await asyncio.wait_for(self._group.ready(), PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            raise CliError(f"the Ray cluster found no room for {count} replicas of {_describe(bundle)} within "
                           f"{PLACEMENT_TIMEOUT_S:g} s ({nodes} nodes have room for one each); ask for fewer "
                           "--replicas or less per replica, or free the cluster") from None
        remote_class = self._ray.remote(EngineReplica)
        for index in range(count):
            self.actors.append(remote_class.options(
                num_cpus=resources.cpus, num_gpus=resources.gpus,
                **({"memory": resources.memory_bytes} if resources.memory_bytes else {}),  # its --memory, booked
                max_restarts=REPLICA_MAX_RESTARTS, max_task_retries=0,  # the driver re-queues, not Ray
                max_concurrency=concurrency + 8,  # its slots, and ready()/close() beside them
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=index),
            ).remote(index, options, checksum))
        self.tallies = [ReplicaTally(info) for info in await self._await_ready()]

    async def _await_ready(self) -> list[ReplicaInfo]:
        """Every replica's ReplicaInfo once all have started; the first that cannot start stops the run at once."""
        waiting = {asyncio.ensure_future(ready_through_restarts(self._ray, actor, STARTUP_TIMEOUT_S)): index
                   for index, actor in enumerate(self.actors)}
        infos: dict[int, ReplicaInfo] = {}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = waiting.pop(future)
                    try:
                        info = future.result()
                    except self._ray.exceptions.RayActorError as error:  # out of restarts, or a bug in __init__
                        raise CliError(f"replica {index} died while starting: {error}") from None
                    except TimeoutError:
                        raise CliError(f"replica {index} did not start within {STARTUP_TIMEOUT_S:g} s") from None
                    self._started.add(index)
                    if info.startup_error:
                        raise CliError(f"{info.where()} did not start: {info.startup_error}")
                    infos[index] = info
        finally:
            for future in waiting:
                future.cancel()
        return [infos[index] for index in range(len(self.actors))]

    async def stop(self) -> None:
        """Close the running engines (their worker processes and shared memory go with them), end every actor."""
        from ray.util.placement_group import remove_placement_group

        # a replica still restarting would first load its engine again, only to close it
        gone = {index for index, tally in enumerate(self.tallies) if tally.restarting or tally.retired}
        closing = [self.actors[index].close.remote() for index in sorted(self._started - gone)]
        if closing:
            try:
                await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), CLOSE_TIMEOUT_S)
            except TimeoutError:
                pass
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        if self._group is not None:
            remove_placement_group(self._group)


async def ready_through_restarts(ray, actor, timeout_s: float) -> ReplicaInfo:
    """The replica's ReplicaInfo once it is up, waiting through Ray's restarts of it (killed while loading, by
    the user or by Ray's out-of-memory monitor); ActorDiedError when it is gone for good, TimeoutError."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(actor.ready.remote(), max(deadline_s - time.monotonic(), 0.0))
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again
            if time.monotonic() >= deadline_s:
                raise TimeoutError from None
            await asyncio.sleep(RESTART_POLL_S)


class BatchRun:
    """The driver's queue of prompts, the replicas' slots that take from it, and the one writer of OUT."""

    def __init__(self, ray, out_path: str, todo: list[BatchItem], actors: list, tallies: list[ReplicaTally],
                 progress):
        self._ray = ray
        self._out_path = out_path
        self._queue: collections.deque[BatchItem] = collections.deque(todo)
        self._remaining = len(todo)  # items not yet written
        self._changed = asyncio.Condition()
        self._written_keys: set[str] = set()
        self._attempts: collections.Counter[str] = collections.Counter()  # replica deaths under each prompt
        self._actors = actors
        self._tallies = tallies
        self._recovering: dict[int, asyncio.Future] = {}
        self._progress = progress
        self._out = None
        self.written = self.failed = self.tokens = 0
        self.first_sent_s = time.monotonic()
        self.last_written_s = self.first_sent_s

    def wall_s(self) -> float:
        return self.last_written_s - self.first_sent_s

    async def drive(self, concurrency: int) -> None:
        self._out = open(self._out_path, "a", encoding="utf-8")
        self.first_sent_s = self.last_written_s = time.monotonic()
        # slots in turns over the replicas, so the first prompts are dealt evenly (with fewer prompts than
        # slots, replica 0 taking them all would leave the others idle)
        slots = [asyncio.create_task(self._slot(index)) for _ in range(concurrency)
                 for index in range(len(self._actors))]
        slots_ended = asyncio.gather(*slots)
        all_written = asyncio.create_task(self._all_written())
        try:
            # all written: done, even while a dead replica's slots still wait on its restart
            await asyncio.wait([slots_ended, all_written], return_when=asyncio.FIRST_COMPLETED)
            if slots_ended.done():
                slots_ended.result()  # a slot's RunStopped
        finally:
            leftovers = [*slots, slots_ended, all_written, *self._recovering.values()]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            self._out.close()
        if self._remaining:
            raise RunStopped(f"every replica died ({self._remaining} prompts not done)")

    # ------------------------------------------------------------------ the queue

    async def _take(self) -> BatchItem | None:
        """The next prompt, or None when every prompt is written; waits while others are in flight."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._queue or self._remaining == 0)
            return self._queue.popleft() if self._queue else None

    async def _all_written(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._remaining == 0)

    async def _give_back(self, item: BatchItem) -> None:
        async with self._changed:
            self._queue.appendleft(item)  # first in line: it has waited longest
            self._changed.notify_all()

    async def _write(self, item: BatchItem, outcome: FinalMessage | ErrorReply, replica: int | None) -> None:
        if item.key not in self._written_keys:  # one line per id, whatever happened in between
            self._written_keys.add(item.key)
            self._out.write(json.dumps(result_line(item, outcome), ensure_ascii=False) + "\n")
            self._out.flush()  # one line at a time: a killed driver loses only the prompts in flight
            self.written += 1
            self.last_written_s = time.monotonic()
            if isinstance(outcome, ErrorReply):
                self.failed += 1
            else:
                self.tokens += outcome.usage.completion_tokens
                if replica is not None:
                    self._tallies[replica].tokens += outcome.usage.completion_tokens
            if replica is not None:
                self._tallies[replica].prompts += 1
            live = sum(not t.retired for t in self._tallies)
            elapsed_s = max(self.last_written_s - self.first_sent_s, 1e-9)
            self._progress.set_postfix_str(f"{self.tokens / elapsed_s:.1f} tok/s, {self.failed} failed, "
                                           f"{live}/{len(self._tallies)} replicas", refresh=False)
            self._progress.update(1)
        async with self._changed:
            self._remaining -= 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ one slot of one replica

    async def _slot(self, replica: int) -> None:
        tally = self._tallies[replica]
        while not tally.retired:
            item = await self._take()
            if item is None:
                return
            if tally.retired:  # it went while this slot waited for a prompt
                await self._give_back(item)
                return
            if item.request is None:  # a broken input line: its error is its output
                await self._write(item, item.error, None)
                continue
            try:
                outcome = await self._generate(replica, item.request)
            except self._ray.exceptions.RayActorError:
                await self._replica_died(replica, item)
                continue
            except ReplicaUnusable as error:  # its restart found no engine (the store changed under it)
                tally.retired = True
                await self._give_back(item)
                print(f"flashllm batch: {error}; its prompts go to the other replicas", file=sys.stderr)
                continue
            except RunStopped as stop:
                raise RunStopped(f"{tally.info.where()}: {stop}") from None
            if isinstance(outcome, ErrorReply) and outcome.code not in PROMPT_ERRORS:
                raise RunStopped(f"{tally.info.where()}'s engine failed a request: {outcome.message} [{outcome.code}]")
            await self._write(item, outcome, replica)

    async def _generate(self, replica: int, request: GenerateRequest) -> FinalMessage | ErrorReply:
        while True:
            outcome = await self._actors[replica].generate.remote(request)
            if isinstance(outcome, ErrorReply) and outcome.code == ErrorCode.OVERLOADED:
                await asyncio.sleep(OVERLOADED_RETRY_S)
                continue
            return outcome

    async def _replica_died(self, replica: int, item: BatchItem) -> None:
        """Hand the prompt back (or record it, after too many deaths), then wait for the replica's restart."""
        tally = self._tallies[replica]
        self._attempts[item.key] += 1
        if self._attempts[item.key] >= MAX_ATTEMPTS_PER_PROMPT:
            await self._write(item, ErrorReply(item.request.id, ErrorCode.INTERNAL,
                                               f"the replica running this prompt died {self._attempts[item.key]} "
                                               f"times (last: {tally.info.where()}); it is not retried again"), None)
        else:
            tally.requeued += 1
            await self._give_back(item)
        if replica not in self._recovering:  # the replica's other slots wait on the same probe
            tally.restarts += 1
            tally.restarting = True
            self._recovering[replica] = asyncio.ensure_future(self._await_restart(replica))
        await asyncio.shield(self._recovering[replica])

    async def _await_restart(self, replica: int) -> None:
        tally = self._tallies[replica]
        try:
            info = await ready_through_restarts(self._ray, self._actors[replica], RESTART_TIMEOUT_S)
            if info.startup_error:
                raise ReplicaUnusable(info.startup_error)
            tally.info, tally.restarting = info, False
        except (self._ray.exceptions.RayActorError, ReplicaUnusable, TimeoutError) as error:
            tally.retired = True
            print(f"flashllm batch: {tally.info.where()} is gone ({str(error).splitlines()[0]}); "
                  "its prompts go to the other replicas", file=sys.stderr)
        finally:
            self._recovering.pop(replica, None)


def _print_summary(args, summary: RunSummary) -> None:
    print(f"wrote {summary.prompts} lines to {args.out} ({summary.failed} failed), {summary.tokens} tokens in "
          f"{summary.wall_s:.1f} s = {summary.tokens_per_s:.1f} tokens/s over {summary.replicas} replicas on "
          f"{summary.nodes} nodes (started in {summary.startup_s:.1f} s, {summary.requeued} prompts re-queued)",
          file=sys.stderr)
    for replica in summary.per_replica:
        print(f"  replica {replica['index']} on node {replica['node_id'][:12]} ({replica['host']}): "
              f"{replica['prompts']} prompts, {replica['tokens']} tokens, {replica['tokens_per_s']:.1f} tokens/s"
              + (f", died {replica['restarts']} times" if replica["restarts"] else "")
              + (", gave up on it" if replica["retired"] else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(summary)))
