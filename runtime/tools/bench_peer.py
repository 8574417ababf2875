"""`flashllm bench-peer`: flashllm beside llama.cpp on the same GGUF file, at the same memory for weights.

For each weight budget (a fraction of the GGUF file's bytes):
- llama.cpp's `llama-bench` (token generation: -p 0 -n TOKENS, the same
  threads) runs in a memory cgroup capped at the budget plus llama.cpp's own
  baseline. llama.cpp mmaps the file, so its weights are page cache charged to
  the cgroup: a cap below the model makes the kernel evict them and the next
  token read them again from disk. It runs a private copy of the file (pages
  another process maps can neither be dropped nor charged to this cgroup),
  whose page cache is dropped before each run.
- flashllm decodes the same number of tokens with `--memory` = the budget
  (`--mode auto`, what a user gets: dense, sparse or naive, the first whose
  plan fits; and `--mode sparse`; at budgets ≥ 100% also `--mode dense`) on
  the same cores, with its default threads for each mode: a mode that reads
  flash leaves one core to its reads and conversions (`--threads N` would give
  torch all N beside them). It runs from the store made from that GGUF, in a
  cgroup capped at the budget + each of its processes' baseline (Python +
  torch; the prefetcher's without torch) + its KV cache + 10%
  (memory_cgroup.memory_bound_bytes, the bound `flashllm bench` checks), so a run that overruns its
  budget is OOM-killed and shows up as a failure, not a silent pass.

llama.cpp's baseline is measured, not assumed: one uncapped run of the same
command on the same file, from a cold page cache; its peak
(cgroup v2 `memory.peak`, v1 `memory.max_usage_in_bytes`; runtime/tools/memory_cgroup.py)
minus the file's pages still charged after it
exits is what llama.cpp holds beside the weights (binary and libraries, KV
cache, compute buffers, any repacked weight copies). A tiny model's run would
miss the buffers that scale with this model, and the RSS before the weights
are touched would miss the compute buffers. flashllm's baseline is one process
that imported torch and the engine and ran a product, before any store is
opened; the worker runtime has one such process per role plus the parent.

Rounds interleave the two systems (the first system alternates), since this
machine's speed drifts over minutes; the report gives each run, the median and
range of tok/s and of each side's peak memory, machine info and the commit.
Not part of the test suite: it needs a llama-bench binary and minutes.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Callable

from flashllm.runtime.tools.memory_cgroup import (
    BOUND_SLACK, CgroupUnavailable, MeasuredRun, ProcessBaselines, drop_page_cache, measure_baselines, measure_command,
    memory_bound_bytes, store_has_compiled_loops,
)

LLAMA_BENCH_ENV = "FLASHLLM_LLAMA_BENCH"
BENCH_PROMPT = "The history of the printing press begins"
PROMPT_TOKEN_ALLOWANCE = 64  # context beyond the generated tokens: the prompt fits even a byte per token
DENSE_FROM_FRACTION = 1.0  # budgets at or above the whole file also run --mode dense
MIB = 2**20
UNCAPPED = "uncapped"


class PeerBenchError(ValueError):
    """Bad input to bench-peer; the message says what to do."""


@dataclass
class PeerBenchOptions:
    gguf: str
    store: str
    llama_bench: str
    budget_fractions: list[float]
    threads: int  # llama-bench -t: the cores both systems run on
    flashllm_threads: int | None  # None: flashllm's own default for each mode
    rounds: int
    tokens: int
    llama_repetitions: int  # llama-bench -r within one run
    runtime: str  # flashllm --runtime
    timeout_s: float
    trace: str | None = None  # flashllm --trace for its sparse and auto runs (a store without predictors)
    # both systems capped at budget + this many bytes for the whole process (else each at budget + its own
    # measured baseline)
    cap_extra_bytes: int | None = None
    llama_args: tuple[str, ...] = ()  # more llama-bench options, e.g. ("--repack", "0")

    @property
    def max_context(self) -> int:
        return self.tokens + PROMPT_TOKEN_ALLOWANCE


# ---------------------------------------------------------------------- inputs


def parse_budgets(text: str) -> list[float]:
    """'100%,80%,60%' (or '1,0.8,0.6') → [1.0, 0.8, 0.6]: fractions of the GGUF file's bytes, in order given."""
    fractions: list[float] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
        except ValueError:
            value = -1.0
        if not 0 < value <= 10:
            raise PeerBenchError(f"--budgets: {item!r} is not a fraction of the GGUF file; write e.g. 100%,80%,60% "
                                 "or 1,0.8,0.6 (each above 0)")
        if value not in fractions:
            fractions.append(value)
    if not fractions:
        raise PeerBenchError("--budgets is empty; write e.g. 100%,80%,60%")
    return fractions


def find_llama_bench(path: str | None) -> str:
    """The llama-bench binary: --llama-bench, else $FLASHLLM_LLAMA_BENCH, else `llama-bench` on PATH."""
    candidate = path or os.environ.get(LLAMA_BENCH_ENV) or shutil.which("llama-bench")
    how = ("build llama.cpp's llama-bench (https://github.com/ggml-org/llama.cpp: `cmake -B build && cmake --build "
           f"build --target llama-bench`; the binary is build/bin/llama-bench), then pass --llama-bench PATH or set "
           f"{LLAMA_BENCH_ENV}")
    if not candidate:
        raise PeerBenchError(f"no llama-bench found (no --llama-bench, no ${LLAMA_BENCH_ENV}, none on PATH): {how}")
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise PeerBenchError(f"llama-bench {candidate!r} is not an executable file: {how}")
    return candidate


# ---------------------------------------------------------------------- the two systems' commands


def llama_bench_argv(options: PeerBenchOptions) -> list[str]:
    return [options.llama_bench, "-m", options.gguf, "-t", str(options.threads), "-p", "0", "-n", str(options.tokens),
            "-r", str(options.llama_repetitions), "-o", "json", *options.llama_args]


def parse_llama_bench_json(stdout: str) -> dict:
    """llama-bench -o json → its tg test's record (avg_ts, samples_ts, build_commit, cpu_info, ...)."""
    start = stdout.find("[")
    if start < 0:
        raise ValueError("llama-bench printed no JSON")
    records = json.loads(stdout[start:])
    generation = [r for r in records if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    if not generation:
        raise ValueError("llama-bench's JSON holds no token-generation test")
    return generation[0]


def flashllm_generate_argv(options: PeerBenchOptions, mode: str, memory_bytes: int | None) -> list[str]:
    argv = [sys.executable, "-m", "flashllm", "generate", "--store", options.store, "--mode", mode,
            "--max-tokens", str(options.tokens), "--ignore-eos", "--max-context", str(options.max_context),
            "--runtime", options.runtime if mode in ("sparse", "auto") else "inproc", "--json"]
    if memory_bytes is not None:
        argv += ["--memory", str(memory_bytes)]
    if options.flashllm_threads is not None:
        argv += ["--threads", str(options.flashllm_threads)]
    if options.trace is not None and mode in ("sparse", "auto"):
        argv += ["--trace", options.trace]
    return argv + [BENCH_PROMPT]


def flashllm_kv_cache_bytes(store: str, max_context: int) -> int:
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.engine_config import EngineConfig
    from flashllm.workers.memory_plan import MemoryInputs

    manifest = read_manifest(store)
    return MemoryInputs.from_config(manifest, EngineConfig(max_batch=1, max_context=max_context)).kv_cache_bytes


def flashllm_cap_bytes(weight_budget_bytes: int, baselines: ProcessBaselines, kv_cache_bytes: int, runtime: str,
                       mode: str) -> int:
    """The issue's bound for a run at --memory weight_budget_bytes, over the processes its runtime runs
    (memory_cgroup.memory_bound_bytes, the same bound `flashllm bench` checks)."""
    from flashllm.runtime.core.mode_choice import resolve_runtime

    # auto can pick sparse, the mode with the most processes: bound it as sparse would be
    runtime_run = resolve_runtime(runtime, "sparse" if mode == "auto" else mode)
    return memory_bound_bytes(weight_budget_bytes, kv_cache_bytes, baselines, runtime_run)


def whole_process_runs(options: PeerBenchOptions, baselines: dict, weight_bytes: int) -> list[tuple[str, int, int]]:
    """(mode, --memory, cap) of each flashllm run under one whole-process cap of weight_bytes + --cap-extra:
    --memory is the largest whose bound (budget + a baseline per process + KV cache, + 10%) fits the cap, so
    the run cannot be OOM-killed by its own plan; the modes of flashllm_modes, as at other budgets."""
    from flashllm.runtime.core.mode_choice import resolve_runtime
    from flashllm.runtime.tools.memory_cgroup import budget_under_cap_bytes

    cap = weight_bytes + options.cap_extra_bytes
    return [(mode, budget_under_cap_bytes(cap, baselines["flashllm_kv_cache_bytes"], flashllm_process_baselines(
        baselines), resolve_runtime(options.runtime, "sparse")), cap) for mode in flashllm_modes(options)]


def flashllm_process_baselines(baselines: dict) -> ProcessBaselines:
    """The report's measured flashllm process baselines, as memory_cgroup's bounds take them."""
    process = baselines["flashllm_process"]
    return ProcessBaselines(process["baseline_bytes"], process["light_baseline_bytes"], process["method"],
                            process.get("compiled_loops_bytes", 0))


def flashllm_modes(options: PeerBenchOptions) -> list[str]:
    """auto (what a user gets) and sparse; with a trace only sparse: auto would refuse a trace whenever it
    picks dense or naive, and a store without predictors never picks sparse itself."""
    return ["sparse"] if options.trace is not None else ["auto", "sparse"]


# ---------------------------------------------------------------------- measuring


def _store_files(store: str) -> list[str]:
    return [os.path.join(store, name) for name in sorted(os.listdir(store))
            if os.path.isfile(os.path.join(store, name))]


def _run_record(run: MeasuredRun, system: str, mode: str, fraction: float | None, round_index: int) -> dict:
    return {"system": system, "mode": mode, "budget_fraction": fraction, "round": round_index,
            "cap_bytes": run.limit_bytes, "peak_bytes": run.peak_bytes, "oom_kills": run.oom_kills,
            "returncode": run.returncode, "timed_out": run.timed_out, "wall_s": round(run.wall_s, 3),
            "failure": run.failure(), "tok_per_s": None}


def run_llama(options: PeerBenchOptions, cap_bytes: int | None, fraction: float | None, round_index: int) -> dict:
    drop_page_cache([options.gguf])
    run = measure_command(llama_bench_argv(options), limit_bytes=cap_bytes, timeout_s=options.timeout_s,
                          method="cgroup")
    record = _run_record(run, "llama.cpp", "llama-bench tg", fraction, round_index)
    record["cache_bytes_after_exit"] = run.cache_bytes_after_exit
    if run.ok:
        try:
            test = parse_llama_bench_json(run.stdout)
        except ValueError as exc:
            record["failure"] = f"unreadable output: {exc}"
        else:
            record["tok_per_s"] = float(test["avg_ts"])
            record["samples_tok_per_s"] = [float(x) for x in test.get("samples_ts", [])]
            record["llama_build"] = {k: test.get(k) for k in ("build_commit", "build_number", "cpu_info",
                                                               "backends", "n_threads", "type_k", "type_v")}
    return record


def _sweep_instance_leftovers(pid: int, runtime_dir: str) -> None:
    """Shared-memory segments of a flashllm run that was killed before it could remove them."""
    from flashllm.protocol.shm import SHM_DIR, list_segments, parse_segment_name

    for _, path in list_segments():
        parsed = parse_segment_name(os.path.basename(path))
        if parsed is not None and parsed[1] == pid and os.path.dirname(path) == SHM_DIR:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    shutil.rmtree(runtime_dir, ignore_errors=True)


def run_flashllm(options: PeerBenchOptions, mode: str, memory_bytes: int | None, cap_bytes: int | None,
                 fraction: float | None, round_index: int) -> dict:
    drop_page_cache(_store_files(options.store))
    runtime_dir = tempfile.mkdtemp(prefix="flashllm-peer-run-")
    env = {**os.environ, "FLASHLLM_RUNTIME_DIR": runtime_dir}
    run = measure_command(flashllm_generate_argv(options, mode, memory_bytes), limit_bytes=cap_bytes,
                          timeout_s=options.timeout_s, env=env, method="cgroup")
    _sweep_instance_leftovers(run.pid, runtime_dir)
    record = _run_record(run, "flashllm", mode, fraction, round_index)
    record["memory_bytes"] = memory_bytes
    if run.ok:
        try:
            result = json.loads(run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            record["failure"] = f"unreadable output: {exc}"
        else:
            record["tok_per_s"] = 1e3 / result["ms_per_token"] if result["ms_per_token"] else None
            record["ms_per_token"] = result["ms_per_token"]
            record["runtime"] = result.get("runtime")
            record["picked_mode"] = result.get("mode")  # what --mode auto chose at this budget
            record["head_precision"] = result.get("head_precision")  # and how it held the head
            record["generated_tokens"] = len(result.get("tokens", []))
    return record


LLAMA_BASELINE_RUNS = 3  # one uncapped run's baseline measured 42 MB where four others gave 28-30 (stop 34)


def measure_llama_baseline(options: PeerBenchOptions) -> dict:
    """llama.cpp's memory beside its weights: the median over LLAMA_BASELINE_RUNS uncapped runs of the peak
    minus the file's pages it charged. It sets llama.cpp's cap at every budget, so one run's outlier would
    move all of them (a few MiB more cap is a large share of a 60% budget)."""
    records = [run_llama(options, None, None, -1) for _ in range(LLAMA_BASELINE_RUNS)]
    failed = next((r["failure"] for r in records if r["failure"]), None)
    if failed:
        raise PeerBenchError(f"llama-bench failed on {options.gguf} without a cap ({failed}); "
                             "check that the binary runs this file")
    return llama_baseline_of(records, os.path.getsize(options.gguf))


def llama_baseline_of(records: list[dict], file_bytes: int) -> dict:
    """The median baseline of uncapped llama-bench runs (each: peak_bytes, cache_bytes_after_exit, tok_per_s),
    with every run's figures beside it."""
    runs = []
    for record in records:
        charged_file_bytes = min(file_bytes, record["cache_bytes_after_exit"])
        runs.append({"baseline_bytes": max(0, record["peak_bytes"] - charged_file_bytes),
                     "peak_bytes": record["peak_bytes"], "file_cache_bytes_charged": charged_file_bytes,
                     "tok_per_s": record["tok_per_s"]})
    middle = sorted(runs, key=lambda run: run["baseline_bytes"])[(len(runs) - 1) // 2]
    return {**middle, "runs": runs,
            "how": f"median over {len(runs)} uncapped llama-bench runs from a cold page cache: peak (cgroup v2 "
                   "memory.peak, v1 memory.max_usage_in_bytes) minus the page cache still charged after it "
                   "exits (the GGUF's pages)"}


def measure_flashllm_process_baselines(store: str) -> dict:
    """flashllm's processes before they open a store, measured as `flashllm bench` measures them."""
    try:
        baselines = measure_baselines(compiled_loops=store_has_compiled_loops(store))
    except RuntimeError as exc:
        raise PeerBenchError(f"could not measure flashllm's process baselines: {exc}") from None
    return {"baseline_bytes": baselines.torch_process_bytes, "light_baseline_bytes": baselines.light_process_bytes,
            "compiled_loops_bytes": baselines.compiled_loops_bytes, "method": baselines.method,
            "how": "peak of a process that imported the engine (torch) and of the torch-free prefetcher's imports, "
                   "and what the kernel-row loops add to the process that loads them "
                   "(memory_cgroup.measure_baselines)"}


def summarize(records: list[dict]) -> dict:
    """Median and range of tok/s over the successful runs, peak memory over all, and each failure."""
    speeds = [r["tok_per_s"] for r in records if r["tok_per_s"] is not None]
    peaks = [r["peak_bytes"] for r in records]
    return {"runs": len(records), "ok_runs": len(speeds),
            "tok_per_s_median": statistics.median(speeds) if speeds else None,
            "tok_per_s_min": min(speeds) if speeds else None, "tok_per_s_max": max(speeds) if speeds else None,
            "peak_bytes_median": int(statistics.median(peaks)) if peaks else None,
            "peak_bytes_max": max(peaks) if peaks else None,
            "cap_bytes": records[0]["cap_bytes"] if records else None,
            "failures": [r["failure"] for r in records if r["failure"]]}


def _budget_rows(fractions: list[float]) -> list[tuple[str, float | None]]:
    """(label, fraction) per row; the uncapped row first measures both systems with nothing held back."""
    return [(UNCAPPED, None)] + [(f"{100 * f:g}%", f) for f in fractions]


def summarize_budgets(records: list[dict], fractions: list[float], gguf_bytes: int) -> list[dict]:
    """Run records → one row per budget (uncapped first), each system's summary under 'system mode'."""
    budgets = []
    for label, fraction in _budget_rows(fractions):
        row_records = [r for r in records if r["budget_fraction"] == fraction]
        systems = {}
        for system, mode in dict.fromkeys((r["system"], r["mode"]) for r in row_records):
            same = [r for r in row_records if (r["system"], r["mode"]) == (system, mode)]
            systems[f"{system} {mode}"] = summarize(same)
        budgets.append({"label": label, "fraction": fraction,
                        "weight_budget_bytes": None if fraction is None else int(fraction * gguf_bytes),
                        "systems": systems})
    return budgets


def _git_commit() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict:
    import torch

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            mem_total_bytes = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        mem_total_bytes = None
    return {"node": platform.node(), "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)), "mem_total_bytes": mem_total_bytes,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1_5_15": list(os.getloadavg())}  # a shared machine's load moves every speed here


def private_copy(path: str, folder: str) -> str:
    """A copy of the file that no other process has open: pages of a file another process maps cannot be dropped,
    and they stay charged to whoever read them first, so a cgroup cap would not count them."""
    copy = os.path.join(folder, os.path.basename(path))
    shutil.copyfile(path, copy)
    with open(copy, "rb+") as f:
        os.fsync(f.fileno())  # written back, so that dropping its pages really drops them
    drop_page_cache([copy])
    return copy


def run_peer_bench(options: PeerBenchOptions, command: list[str] | None = None,
                   after_round: Callable[[dict], None] | None = None) -> dict:
    """Both systems on a private copy of the GGUF, in a folder removed afterwards. after_round gets the report
    so far after each round (a long run on a busy machine keeps what it measured)."""
    from flashllm.protocol.store_format import read_manifest

    manifest = read_manifest(options.store)
    if manifest.sparsity is None and options.trace is None:
        raise PeerBenchError(f"store {options.store} is not calibrated, so it cannot run --mode sparse: run "
                             f"`flashllm calibrate --store {options.store} --text FILE` first (or, for a "
                             "`flashllm synth` store, give --trace paper)")
    gguf_bytes = os.path.getsize(options.gguf)
    report = {"command": command, **_git_commit(), "machine": machine_info(),
              "gguf": {"path": os.path.abspath(options.gguf), "bytes": gguf_bytes},
              "store": {"path": os.path.abspath(options.store), "ffn_dtype": manifest.ffn.dtype,
                        "bytes": sum(os.path.getsize(p) for p in _store_files(options.store))},
              "options": asdict(options)}
    store_parent = os.path.dirname(os.path.abspath(options.store))
    with tempfile.TemporaryDirectory(prefix="flashllm-peer-gguf-", dir=store_parent) as folder:
        options = replace(options, gguf=private_copy(options.gguf, folder))
        print("bench-peer: baselines ...", file=sys.stderr)
        report["baselines"] = {"llama.cpp": measure_llama_baseline(options),
                               "flashllm_process": measure_flashllm_process_baselines(options.store),
                               "flashllm_kv_cache_bytes": flashllm_kv_cache_bytes(options.store, options.max_context),
                               "flashllm_cap_margin": BOUND_SLACK}
        records: list[dict] = []
        for round_index in range(options.rounds):
            records.extend(_run_round(options, report["baselines"], gguf_bytes, round_index))
            report.update({"load_average_at_end": list(os.getloadavg()), "rounds_done": round_index + 1,
                           "llama_build": next((r["llama_build"] for r in records if r.get("llama_build")), None),
                           "budgets": summarize_budgets(records, options.budget_fractions, gguf_bytes),
                           "runs": records})
            if after_round is not None:
                after_round(report)
    return report


def _run_round(options: PeerBenchOptions, baselines: dict, gguf_bytes: int, round_index: int) -> list[dict]:
    """Every budget once on each system; the system that goes first alternates by round."""
    records: list[dict] = []
    for label, fraction in _budget_rows(options.budget_fractions):
        def llama_run() -> dict:
            extra = options.cap_extra_bytes if options.cap_extra_bytes is not None \
                else baselines["llama.cpp"]["baseline_bytes"]
            cap = None if fraction is None else int(fraction * gguf_bytes) + extra
            return run_llama(options, cap, fraction, round_index)

        def flashllm_runs() -> list[dict]:
            if fraction is None:
                return [run_flashllm(options, "dense", None, None, None, round_index)]
            if options.cap_extra_bytes is not None:  # one cap for the whole process: the --memory it leaves
                return [run_flashllm(options, mode, memory, cap, fraction, round_index)
                        for mode, memory, cap in whole_process_runs(options, baselines, int(fraction * gguf_bytes))]
            weight_bytes = int(fraction * gguf_bytes)
            # auto: what a user gets at this --memory (dense, sparse or naive, whichever the plan fits first)
            modes = flashllm_modes(options) + (["dense"] if fraction >= DENSE_FROM_FRACTION else [])
            return [run_flashllm(options, mode, weight_bytes,
                                 flashllm_cap_bytes(weight_bytes, flashllm_process_baselines(baselines),
                                                    baselines["flashllm_kv_cache_bytes"], options.runtime, mode),
                                 fraction, round_index) for mode in modes]

        print(f"bench-peer: round {round_index + 1}/{options.rounds}, budget {label} ...", file=sys.stderr)
        if round_index % 2 == 0:
            records.append(llama_run())
            records.extend(flashllm_runs())
        else:
            records.extend(flashllm_runs())
            records.append(llama_run())
    return records


# ---------------------------------------------------------------------- output


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _speed(summary: dict) -> str:
    if summary["tok_per_s_median"] is None:
        return "failed"
    return f"{summary['tok_per_s_median']:.2f} ({summary['tok_per_s_min']:.2f}-{summary['tok_per_s_max']:.2f})"


def _gist(failure: str, max_chars: int = 120) -> str:
    """A failure as the table shows it: its first max_chars characters (the JSON keeps it whole)."""
    return failure if len(failure) <= max_chars else failure[: max_chars - 3] + "..."


def format_table(report: dict) -> str:
    header = (f"{'budget':>9} {'weights MiB':>11}  {'system':<24} {'cap MiB':>8} {'tok/s median (range)':>22} "
              f"{'peak MiB (max)':>16}  ok/runs  failures")
    lines = [header]
    for budget in report["budgets"]:
        for name, summary in budget["systems"].items():
            failures = "; ".join(_gist(failure) for failure in sorted(set(summary["failures"])))
            lines.append(f"{budget['label']:>9} {_mib(budget['weight_budget_bytes']):>11}  {name:<24} "
                         f"{_mib(summary['cap_bytes']):>8} {_speed(summary):>22} "
                         f"{_mib(summary['peak_bytes_median']) + ' (' + _mib(summary['peak_bytes_max']) + ')':>16}  "
                         f"{summary['ok_runs']}/{summary['runs']:<5}  {failures}")
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> str:
    """tok/s vs weight budget (% of the GGUF file), one line per system, bars from the slowest to the fastest run;
    the uncapped speeds as dashed lines; budgets where a system never finished marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4))
    capped = [b for b in report["budgets"] if b["fraction"] is not None]
    names = list(dict.fromkeys(name for b in capped for name in b["systems"]))
    failed_at: dict[float, int] = {}  # budget % → failure labels already stacked there
    for name in names:
        points = [(100 * b["fraction"], b["systems"][name]) for b in capped if name in b["systems"]]
        good = [(x, s) for x, s in points if s["tok_per_s_median"] is not None]
        medians = [s["tok_per_s_median"] for _, s in good]
        errors = [[m - s["tok_per_s_min"] for m, (_, s) in zip(medians, good)],
                  [s["tok_per_s_max"] - m for m, (_, s) in zip(medians, good)]]
        line = ax.errorbar([x for x, _ in good], medians, yerr=errors, marker="o", capsize=3, label=name)
        color = line.lines[0].get_color()
        for x, summary in points:
            if summary["tok_per_s_median"] is None:  # never finished at this budget: marked on the x axis
                stacked = failed_at.get(x, 0)
                failed_at[x] = stacked + 1
                ax.plot([x], [0.0], marker="x", color=color, markersize=9, transform=ax.get_xaxis_transform(),
                        clip_on=False)
                ax.annotate(f"{name}: failed", (x, 0.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                            xytext=(-4, 6 + 10 * stacked), fontsize=7, color=color, ha="right")
    uncapped = next((b for b in report["budgets"] if b["fraction"] is None), None)
    for name, summary in (uncapped or {}).get("systems", {}).items():
        if summary["tok_per_s_median"] is not None:
            ax.axhline(summary["tok_per_s_median"], linestyle="--", linewidth=1, color="gray")
            label = f"{name}, uncapped: {summary['tok_per_s_median']:.1f} tok/s"
            ax.annotate(label, (0.01, summary["tok_per_s_median"]),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(2, 2), fontsize=7,
                        color="gray")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if capped:
        xs = [100 * b["fraction"] for b in capped]
        ax.set_xlim(max(xs) + 5, min(xs) - 5)  # larger budgets on the left
    ax.set_xlabel("weight budget (% of the GGUF file's bytes)")
    ax.set_ylabel("decode tok/s (median, range)")
    gguf_mib = report["gguf"]["bytes"] / MIB
    ax.set_title(f"{os.path.basename(report['gguf']['path'])} ({gguf_mib:.0f} MiB), "
                 f"{report['options']['threads']} threads", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, json_path: str, plot_path: str | None) -> None:
    if plot_path:
        report["plot"] = plot_report(report, plot_path)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def parse_flashllm_threads(text: str | None) -> int | None:
    """--flashllm-threads: None (not given, or 'default') leaves flashllm its own threads for each mode."""
    if text is None or text == "default":
        return None
    if not text.isdigit() or int(text) < 1:
        raise PeerBenchError(f"--flashllm-threads takes a number of threads (1 or more) or 'default', got {text!r}")
    return int(text)


def cmd_bench_peer(args) -> int:
    from flashllm.runtime.clients.cli import CliError
    from flashllm.runtime.core.engine_config import parse_size

    try:
        options = PeerBenchOptions(
            gguf=args.gguf, store=args.store, llama_bench=find_llama_bench(args.llama_bench),
            budget_fractions=parse_budgets(args.budgets), threads=args.threads,
            flashllm_threads=parse_flashllm_threads(args.flashllm_threads),
            rounds=args.rounds, tokens=args.tokens, llama_repetitions=args.llama_repetitions, runtime=args.runtime,
            timeout_s=args.timeout_s, trace=str(args.trace) if args.trace is not None else None,
            cap_extra_bytes=parse_size(args.cap_extra) if args.cap_extra else None,
            llama_args=tuple(shlex.split(args.llama_args)))
    except (PeerBenchError, ValueError) as exc:
        raise CliError(str(exc)) from None
    for path, what in ((options.gguf, "--gguf"), (options.store, "--store")):
        if not os.path.exists(path):
            raise CliError(f"{what} {path!r} does not exist")
    try:
        report = run_peer_bench(options, command=["flashllm", "bench-peer", *sys.argv[2:]],
                                after_round=lambda so_far: write_report(so_far, args.json, None))
    except (PeerBenchError, CgroupUnavailable) as exc:  # no cgroup: the message says what is needed
        raise CliError(str(exc)) from None
    print(format_table(report))
    write_report(report, args.json, args.plot)
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def positive_int(text: str) -> int:
    from flashllm.runtime.clients.cli import positive_int as positive

    return positive(text)


def register_cli(sub) -> None:
    from flashllm.runtime.clients.cli import trace_arg

    p = sub.add_parser("bench-peer", help="flashllm beside llama.cpp's llama-bench on the same GGUF under memory caps")
    p.add_argument("--gguf", required=True, help="the GGUF file both systems run")
    p.add_argument("--store", required=True, help="flashllm's store made from that file (convert, calibrate)")
    p.add_argument("--llama-bench", default=None,
                   help=f"path of llama.cpp's llama-bench binary (default: ${LLAMA_BENCH_ENV}, or llama-bench on PATH)")
    p.add_argument("--budgets", default="100%,80%,60%", help="weight budgets as fractions of the GGUF file's bytes")
    p.add_argument("--threads", type=positive_int, default=2, help="llama-bench -t: the cores both systems use")
    p.add_argument("--flashllm-threads", default=None,
                   help="flashllm --threads (default: flashllm's own choice per mode, what a user gets: all cores "
                        "for dense, one fewer for torch when reading flash, its reads and conversions take the "
                        "other)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds of both systems")
    p.add_argument("--tokens", type=positive_int, default=32, help="tokens decoded per run (llama-bench -n)")
    p.add_argument("--llama-repetitions", type=positive_int, default=2, help="llama-bench -r within a run")
    p.add_argument("--runtime", default="auto", choices=["auto", "inproc", "workers"],
                   help="flashllm --runtime for --mode sparse (dense runs in-process)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="a run still going after this is killed (a failure)")
    p.add_argument("--trace", type=trace_arg, default=None, metavar="SOURCE",
                   help="flashllm's sparse and auto runs replay this activation trace (see `flashllm generate "
                        "--help`): for a `flashllm synth` store, which has no predictors")
    p.add_argument("--cap-extra", default=None, metavar="SIZE",
                   help="cap each system's whole process at the weight budget + SIZE (e.g. 1GiB), the same for "
                        "both, instead of the budget + each one's measured baseline")
    p.add_argument("--llama-args", default="", metavar="ARGS",
                   help="more llama-bench options, e.g. '--repack 0' (weights stay mapped from the file rather than "
                        "copied into repacked buffers, which a cap below the model cannot hold)")
    p.add_argument("--json", required=True, help="output JSON path")
    p.add_argument("--plot", default=None, help="output PNG: tok/s vs budget, both systems")
    p.set_defaults(func=cmd_bench_peer)
