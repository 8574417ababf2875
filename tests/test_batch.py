"""`flashllm batch`: a JSONL of prompts in, one result line per id out, resumable after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from daemon_process import TEST_ENV, running_daemon
from flashllm.runtime.clients.batch import read_done_keys
from flashllm.runtime.clients.cli import main as cli_main


@pytest.fixture(scope="module")
def daemon(tiny_stores):
    with running_daemon(tiny_stores("llama"), ["--max-batch", "8"]) as running:
        yield running


def write_prompts(path, count: int, max_tokens: int = 8) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Story number {i}:", "max_tokens": max_tokens}) + "\n")


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hundred_prompts_through_the_daemon_give_hundred_lines(daemon, tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 100)
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path]) == 0
    lines = read_lines(out)
    assert sorted(line["id"] for line in lines) == sorted(f"p{i}" for i in range(100))
    assert all(line["usage"]["completion_tokens"] >= 1 and "text" in line for line in lines)
    err = capsys.readouterr().err
    assert "wrote 100 lines" in err and "tok/s" in err  # the progress bar shows tokens/s


def test_killed_halfway_then_rerun_completes_without_duplicates(daemon, tiny_stores, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 100, max_tokens=40)
    command = ["flashllm", "batch", str(prompts), "--out", str(out), "--store", tiny_stores("llama"),
               "--max-batch", "2", "--quiet"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **TEST_ENV})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 10:
                break
            time.sleep(0.01)
        assert first.poll() is None, "the batch finished before it could be interrupted"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    done_before = len(read_done_keys(str(out)))
    assert 10 <= done_before < 100

    # the re-run may use the daemon instead: the lines are the same either way
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    ids = [line["id"] for line in read_lines(out)]
    assert len(ids) == 100 and set(ids) == {f"p{i}" for i in range(100)}
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    assert len(read_lines(out)) == 100  # a third run finds nothing to do


def test_a_failed_prompt_records_its_error_and_the_rest_go_on(daemon, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "ok1", "prompt": "The quick brown fox", "max_tokens": 4}),
        "this is not json",
        json.dumps({"id": "zero", "prompt": "hi", "max_tokens": 0}),
        json.dumps({"id": "long", "prompt": "the quick brown fox " * 200}),
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi"}]}),  # tiny model: no template
        json.dumps({"id": "typo", "prompt": "hi", "max_token": 3}),
        json.dumps({"id": "ok2", "prompt": "Paris is", "max_tokens": 4, "temperature": 0.8, "seed": 7}),
        json.dumps({"id": "ok1", "prompt": "a repeated id is skipped"}),
    ]) + "\n")
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    by_id = {line["id"]: line for line in read_lines(out)}
    assert len(read_lines(out)) == 7
    assert by_id["ok1"]["usage"]["completion_tokens"] == 4 and "text" in by_id["ok2"]
    assert by_id[None]["line"] == 2 and "not JSON" in by_id[None]["error"]["message"]
    assert by_id["zero"]["error"]["code"] == "invalid_request" and "max_tokens=0" in by_id["zero"]["error"]["message"]
    assert by_id["long"]["error"]["code"] == "prompt_too_long"
    assert "chat template" in by_id["chat"]["error"]["message"]
    assert "unknown field 'max_token'" in by_id["typo"]["error"]["message"]


def test_a_line_cut_short_by_a_kill_is_redone(daemon, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 3)
    out.write_text(json.dumps({"id": "p0", "line": 1, "text": "x"}) + "\n" + '{"id": "p1", "line": 2, "te')
    assert read_done_keys(str(out)) == {'"p0"'}
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines][0] == "p0" and sorted(line["id"] for line in lines) == ["p0", "p1", "p2"]


def test_exactly_one_of_socket_or_store(tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 1)
    assert cli_main(["batch", str(prompts), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "exactly one of --socket" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_no_daemon_stops_the_run_without_recording_anything(tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 2)
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", str(tmp_path / "none.sock")]) == 2
    assert "no flashllm daemon" in capsys.readouterr().err
    assert not out.exists() or read_lines(out) == []


def write_openai_batch(path, count: int, max_tokens: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "tiny", "prompt": f"Story number {i}:", "max_tokens": max_tokens,
                                         "temperature": 0, "ignore_eos": True}}) + "\n")


def test_openai_batch_file_killed_midway_resumes_to_exactly_twenty_lines(daemon, tiny_stores, tmp_path):
    prompts, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    write_openai_batch(prompts, 20, max_tokens=120)
    command = ["flashllm", "batch", str(prompts), "--out", str(out), "--store", tiny_stores("llama"),
               "--max-batch", "1", "--concurrency", "1", "--quiet"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **TEST_ENV})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert first.poll() is None, "the batch finished before it could be interrupted"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    done_before = len(read_done_keys(str(out)))
    assert 3 <= done_before < 20

    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    lines = read_lines(out)
    assert len(lines) == 20 and sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(20))
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 120 and body["choices"][0]["finish_reason"] == "length"
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    assert len(read_lines(out)) == 20  # a third run finds nothing to do


def test_openai_batch_lines_with_errors_record_them_in_openai_shape(daemon, tmp_path):
    prompts, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    line = {"custom_id": "ok", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3}}
    prompts.write_text("\n".join(json.dumps(x) for x in [
        line,
        {**line, "custom_id": "n2", "body": {**line["body"], "n": 2}},
        {**line, "custom_id": "embed", "url": "/v1/embeddings"},
        {**line, "custom_id": "long", "body": {**line["body"], "prompt": "the quick brown fox " * 200}},
    ]) + "\n")
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    by_id = {x["custom_id"]: x for x in read_lines(out)}
    assert by_id["ok"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert by_id["n2"]["response"] is None and "n=2 is not supported" in by_id["n2"]["error"]["message"]
    assert "url '/v1/embeddings' is not supported" in by_id["embed"]["error"]["message"]
    assert by_id["long"]["error"]["code"] == "prompt_too_long"
