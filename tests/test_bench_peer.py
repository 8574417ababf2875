"""`flashllm bench-peer`'s parts that run without llama.cpp: budgets, the memory-cgroup runner
(runtime/tools/memory_cgroup.py), the report.

The head-to-head itself needs a llama-bench binary and minutes; it is a program (docs/benchmarks.md), not a test.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from flashllm.runtime.clients.cli import EXIT_USER_ERROR, main
from flashllm.runtime.tools.bench_peer import (
    LLAMA_BENCH_ENV, PeerBenchError, format_table, parse_budgets, parse_llama_bench_json, summarize_budgets,
    write_report)
from flashllm.runtime.tools.memory_cgroup import (
    CGROUP_NAME_PREFIX, candidate_parents, cgroup_available, drop_page_cache, measure_command)

MIB = 2**20
NO_CGROUP = cgroup_available()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"no writable memory cgroup: {NO_CGROUP}")


def _touch_bytes_program(size_bytes: int) -> list[str]:
    """A Python process that allocates and writes size_bytes, so every page is resident."""
    return [sys.executable, "-c", f"b = bytearray({size_bytes}); b[::4096] = b'x' * len(b[::4096]); print('done')"]


def _my_cgroups() -> list[str]:
    return [os.path.join(parent, n) for parent, _ in candidate_parents() if os.path.isdir(parent)
            for n in os.listdir(parent) if n.startswith(f"{CGROUP_NAME_PREFIX}{os.getpid()}-")]


def test_budgets_are_fractions_of_the_gguf_in_the_order_given():
    assert parse_budgets("100%,80%,60%") == [1.0, 0.8, 0.6]
    assert parse_budgets("1, 0.8,,0.6,80%") == [1.0, 0.8, 0.6]


@pytest.mark.parametrize("text", ["", "abc", "0%", "-10%", "60MiB"])
def test_a_bad_budget_says_how_to_write_one(text):
    with pytest.raises(PeerBenchError, match="100%,80%,60%"):
        parse_budgets(text)


def test_flashllm_runs_its_own_threads_for_each_mode_unless_told():
    from flashllm.runtime.tools.bench_peer import PeerBenchOptions, flashllm_generate_argv, parse_flashllm_threads

    def argv(threads_text):
        options = PeerBenchOptions(gguf="m.gguf", store="s", llama_bench="llama-bench", budget_fractions=[0.6],
                                   threads=2, flashllm_threads=parse_flashllm_threads(threads_text), rounds=1,
                                   tokens=8, llama_repetitions=1, runtime="auto", timeout_s=60.0)
        return flashllm_generate_argv(options, "auto", 1 << 20)

    assert "--threads" not in argv(None) and "--threads" not in argv("default")  # llama.cpp's -t is not torch's
    told = argv("3")
    assert told[told.index("--threads") + 1] == "3"
    with pytest.raises(PeerBenchError, match="'default'"):
        parse_flashllm_threads("two")


def test_without_llama_bench_the_command_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(LLAMA_BENCH_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench on PATH
    out = tmp_path / "peer.json"
    code = main(["bench-peer", "--gguf", str(tmp_path), "--store", str(tmp_path), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "no llama-bench found" in err and "--llama-bench PATH" in err and LLAMA_BENCH_ENV in err
    assert "cmake" in err  # how to build one
    assert not out.exists()


def test_a_llama_bench_that_is_not_a_program_is_refused(tmp_path, capsys):
    not_a_program = tmp_path / "llama-bench"
    not_a_program.write_text("text")
    code = main(["bench-peer", "--gguf", str(tmp_path), "--store", str(tmp_path), "--llama-bench", str(not_a_program),
                 "--json", str(tmp_path / "peer.json")])
    assert code == EXIT_USER_ERROR
    assert "is not an executable file" in capsys.readouterr().err


@needs_cgroup
def test_cgroup_runner_reports_the_peak_of_what_a_command_touched():
    run = measure_command(_touch_bytes_program(64 * MIB), method="cgroup")
    assert run.ok and run.stdout.strip() == "done" and run.method.startswith("cgroup-v")
    assert 64 * MIB <= run.peak_bytes < 256 * MIB
    assert run.oom_kills == 0 and run.failure() is None
    assert _my_cgroups() == []  # the group is removed


@needs_cgroup
def test_cgroup_runner_reports_the_page_cache_a_command_read(tmp_path):
    """A file read from a cold cache stays charged to the group after exit (bench-peer subtracts it)."""
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(32 * MIB))
        os.fsync(f.fileno())  # written back: only clean pages can be dropped
    drop_page_cache([str(path)])
    run = measure_command(["dd", f"if={path}", "of=/dev/null", "bs=1M"], method="cgroup")
    assert run.ok and run.cache_bytes_after_exit >= 30 * MIB  # a few pages may be reclaimed meanwhile
    assert run.peak_bytes >= run.cache_bytes_after_exit


@needs_cgroup
def test_cgroup_runner_shows_an_oom_kill_as_a_failure():
    run = measure_command(_touch_bytes_program(128 * MIB), limit_bytes=48 * MIB)
    assert not run.ok and run.oom_killed
    assert run.peak_bytes <= 48 * MIB
    assert "OOM-killed under a cap of 48.0 MiB" in run.failure()
    assert _my_cgroups() == []


@needs_cgroup
def test_cgroup_runner_kills_a_command_and_its_children_at_the_timeout():
    run = measure_command(["bash", "-c", "sleep 60 & sleep 60"], timeout_s=0.5, method="cgroup")
    assert run.timed_out and run.failure() == "timed out"
    assert run.wall_s < 15
    assert _my_cgroups() == []  # removable only once the background sleep is gone too


def test_a_failed_run_says_its_error_line_not_the_hints_after_it(tiny_stores):
    """A refused `flashllm generate` prints its error and then hints, one a line; the failure a bench-peer
    table shows is the error (cut to 120 characters there), not the last hint."""
    store = tiny_stores("llama")
    argv = [sys.executable, "-m", "flashllm", "generate", "--store", store, "--mode", "naive", "--memory", "1KiB", "Hi"]
    run = measure_command(argv, method="pss", timeout_s=120)
    assert run.returncode == EXIT_USER_ERROR and len(run.stderr.strip().splitlines()) > 1
    assert run.failure().startswith(f"exit {EXIT_USER_ERROR}: flashllm generate: error: --memory 0.0 MiB is too small")
    record = _record("flashllm", "naive", 0.6, 0, None, run.peak_bytes / MIB, failure=run.failure())
    table = format_table({"budgets": summarize_budgets([record], [0.6], 100 * MIB)})
    assert "error: --memory 0.0 MiB is too small" in table and len(run.failure()) > 120
    assert run.failure() not in table and run.failure()[:117] + "..." in table


LLAMA_BENCH_OUTPUT = """[
  {
    "build_commit": "unknown", "build_number": 0, "cpu_info": "AMD EPYC", "backends": "CPU",
    "model_filename": "m.gguf", "n_threads": 2, "n_prompt": 0, "n_gen": 32, "type_k": "f16", "type_v": "f16",
    "avg_ns": 195000000, "stddev_ns": 1000000, "avg_ts": 164.1, "stddev_ts": 0.8,
    "samples_ns": [ 194000000, 196000000 ],
    "samples_ts": [ 164.9, 163.3 ]
  }
]
"""


def test_llama_bench_json_gives_the_generation_speed():
    test = parse_llama_bench_json("load logs\n" + LLAMA_BENCH_OUTPUT)
    assert test["avg_ts"] == 164.1 and test["samples_ts"] == [164.9, 163.3]
    with pytest.raises(ValueError, match="no JSON"):
        parse_llama_bench_json("error: failed to load model")


def _record(system, mode, fraction, round_index, tok_per_s, peak_mib, cap_mib=None, failure=None):
    return {"system": system, "mode": mode, "budget_fraction": fraction, "round": round_index,
            "cap_bytes": None if cap_mib is None else cap_mib * MIB, "peak_bytes": peak_mib * MIB,
            "oom_kills": 1 if failure else 0, "returncode": -9 if failure else 0, "timed_out": False, "wall_s": 1.0,
            "failure": failure, "tok_per_s": None if failure else tok_per_s}


def test_report_holds_medians_ranges_and_failures_and_plots_both_systems(tmp_path):
    gguf_bytes = 100 * MIB
    records = []
    for round_index, (llama_speed, flash_speed) in enumerate([(4.0, 12.0), (3.0, 10.0), (5.0, 11.0)]):
        records.append(_record("llama.cpp", "llama-bench tg", None, round_index, 160.0 + round_index, 110))
        records.append(_record("flashllm", "dense", None, round_index, 30.0, 600))
        records.append(_record("llama.cpp", "llama-bench tg", 0.6, round_index, llama_speed, 75, cap_mib=76))
        records.append(_record("flashllm", "sparse", 0.6, round_index, flash_speed, 500, cap_mib=520,
                               failure="OOM-killed under a cap of 520.0 MiB" if round_index == 2 else None))
    budgets = summarize_budgets(records, [0.6], gguf_bytes)
    assert [b["label"] for b in budgets] == ["uncapped", "60%"]
    llama, sparse = budgets[1]["systems"]["llama.cpp llama-bench tg"], budgets[1]["systems"]["flashllm sparse"]
    assert (llama["tok_per_s_median"], llama["tok_per_s_min"], llama["tok_per_s_max"]) == (4.0, 3.0, 5.0)
    assert sparse["ok_runs"] == 2 and sparse["tok_per_s_median"] == 11.0  # the OOM-killed round has no speed
    assert sparse["failures"] == ["OOM-killed under a cap of 520.0 MiB"]
    assert budgets[1]["weight_budget_bytes"] == 60 * MIB

    report = {"gguf": {"path": "/models/m.gguf", "bytes": gguf_bytes}, "options": {"threads": 2},
              "budgets": budgets, "runs": records}
    table = format_table(report)
    assert "11.00 (10.00-12.00)" in table and "OOM-killed" in table
    out_json, out_png = tmp_path / "peer.json", tmp_path / "peer.png"
    write_report(report, str(out_json), str(out_png))
    written = json.loads(out_json.read_text())
    assert written["budgets"][1]["systems"]["flashllm sparse"]["tok_per_s_median"] == 11.0
    assert len(written["runs"]) == 12 and written["plot"] == str(out_png)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("runtime", ["inproc", "workers"])
def test_under_one_whole_process_cap_flashllm_gets_the_largest_memory_whose_bound_fits(runtime):
    from flashllm.runtime.tools.bench_peer import PeerBenchOptions, whole_process_runs
    from flashllm.runtime.tools.memory_cgroup import ProcessBaselines, memory_bound_bytes

    options = PeerBenchOptions(gguf="m.gguf", store="s", llama_bench="llama-bench", budget_fractions=[0.5], threads=2,
                               flashllm_threads=None, rounds=1, tokens=8, llama_repetitions=1, runtime=runtime,
                               timeout_s=60, trace="paper", cap_extra_bytes=1024 * MIB)
    baselines = {"flashllm_process": {"baseline_bytes": 230 * MIB, "light_baseline_bytes": 20 * MIB,
                                      "method": "cgroup-v1"}, "flashllm_kv_cache_bytes": 64 * MIB}
    per_process = ProcessBaselines(230 * MIB, 20 * MIB, "cgroup-v1")
    runs = whole_process_runs(options, baselines, 1800 * MIB)
    assert [mode for mode, _, _ in runs] == ["sparse"]  # with a trace: auto would refuse it for dense or naive
    for _, memory, cap in runs:
        assert cap == 2824 * MIB
        assert memory_bound_bytes(memory, 64 * MIB, per_process, runtime) <= cap
        assert memory_bound_bytes(memory + MIB, 64 * MIB, per_process, runtime) > cap


def test_llama_cpps_baseline_is_the_median_of_its_runs():
    """llama.cpp's cap at every budget is its weights' budget plus this baseline: one run's outlier (a 42 MB
    baseline among 28-30 MB ones, measured) must not move them all."""
    from flashllm.runtime.tools.bench_peer import llama_baseline_of

    file_bytes = 98 * MIB
    records = [{"peak_bytes": (98 + extra) * MIB, "cache_bytes_after_exit": cached * MIB, "tok_per_s": 130.0}
               for extra, cached in ((28, 98), (42, 98), (30, 120))]  # the last charged more than the file
    baseline = llama_baseline_of(records, file_bytes)
    assert baseline["baseline_bytes"] == 30 * MIB and baseline["file_cache_bytes_charged"] == 98 * MIB
    assert [run["baseline_bytes"] for run in baseline["runs"]] == [28 * MIB, 42 * MIB, 30 * MIB]
