"""`flashllm serve --http`: the official `openai` package against a live daemon on the demo model.

One daemon for most of the module, serving OpenAI's API on a unix socket and on
loopback TCP (with an API key, which then holds on both), beside its ZeroMQ
socket. Few tokens per request: the machine is small and shared.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_process import running_daemon, wait_until_serving
from flashllm.runtime.clients.cli import main as cli_main

API_KEY = "flashllm-test-key-0123456789abcdef"
MODEL = "smollm2"  # the demo store's directory name
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "Water boils at", "The first month of the year is", "Flash memory is",
           "Large language models", "Berlin is", "def add(a, b):", "One, two, three,"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_key(directory) -> str:
    path = os.path.join(directory, "api.key")
    with open(path, "w", encoding="utf-8") as f:
        f.write(API_KEY + "\n")
    return path


@pytest.fixture(scope="module")
def http_daemon(demo_store, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("http"))
    unix_path, port = os.path.join(directory, "http.sock"), free_port()
    args = ["--max-batch", "8", "--http", f"unix:{unix_path}", "--http", f"127.0.0.1:{port}",
            "--api-key-file", write_key(directory)]
    with running_daemon(demo_store, args, wait=False) as daemon:
        daemon.http_unix_path, daemon.http_port = unix_path, port
        daemon.health_while_starting = health_until_ready(daemon)
        wait_until_serving(daemon)
        daemon.note_workers()
        yield daemon
    assert not os.path.exists(unix_path) and not os.path.exists(unix_path + ".lock")


def health_until_ready(daemon, timeout_s: float = 180) -> list[tuple[int, dict]]:
    """GET /health over TCP from the moment it answers until it says 200: (status, body) as they changed."""
    seen: list[tuple[int, dict]] = []
    deadline = time.monotonic() + timeout_s
    with httpx2.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=5) as client:
        while time.monotonic() < deadline and daemon.process.poll() is None:
            try:
                response = client.get("/health")
            except httpx2.TransportError:
                time.sleep(0.05)
                continue
            answer = (response.status_code, response.json())
            if not seen or seen[-1] != answer:
                seen.append(answer)
            if response.status_code == 200:
                break
            time.sleep(0.05)
    return seen


@pytest.fixture(scope="module")
def tokenizer(demo_store):
    from flashllm.runtime.core.tokenizer import Tokenizer
    from flashllm.workers.store_reader import open_store

    manifest = open_store(demo_store)
    return Tokenizer.from_store(demo_store, manifest.tokenizer, manifest.arch.eos_token_ids)


def sync_clients(daemon) -> dict[str, openai.OpenAI]:
    unix = httpx2.Client(transport=httpx2.HTTPTransport(uds=daemon.http_unix_path))
    return {"unix": openai.OpenAI(base_url="http://flashllm/v1", api_key=API_KEY, http_client=unix, max_retries=0),
            "tcp": openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.http_port}/v1", api_key=API_KEY,
                                 max_retries=0)}


def async_client(daemon, over: str) -> openai.AsyncOpenAI:
    if over == "unix":
        transport = httpx2.AsyncHTTPTransport(uds=daemon.http_unix_path,
                                              limits=httpx2.Limits(max_connections=None))
        return openai.AsyncOpenAI(base_url="http://flashllm/v1", api_key=API_KEY, max_retries=0,
                                  http_client=httpx2.AsyncClient(transport=transport))
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{daemon.http_port}/v1", api_key=API_KEY, max_retries=0)


def raw_client(daemon, key: str | None = API_KEY) -> httpx2.Client:
    """Plain HTTP over loopback TCP, for requests the openai package would never send."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx2.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", headers=headers, timeout=60)


def scrape(daemon) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's parser: (sample name, sorted labels) → value."""
    with raw_client(daemon) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def assert_still_serves(daemon) -> None:
    answer = sync_clients(daemon)["tcp"].completions.create(model=MODEL, prompt="Paris is", max_tokens=1,
                                                             temperature=0)
    assert answer.usage.completion_tokens == 1


# ---------------------------------------------------------------------- answers


@pytest.mark.slow
def test_chat_answers_paris_over_the_unix_socket_and_loopback_tcp(http_daemon):
    for over, client in sync_clients(http_daemon).items():
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content, over
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == MODEL


@pytest.mark.slow
async def test_async_client_streams_what_it_gets_unstreamed_at_temperature_0(http_daemon):
    for over in ("unix", "tcp"):
        async with async_client(http_daemon, over) as client:
            whole = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                                         temperature=0)
            stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content and "Paris" in streamed, over
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.slow
def test_sync_completion_stream_equals_the_unstreamed_text_and_usage_counts_the_tokenizer(http_daemon, tokenizer):
    client = sync_clients(http_daemon)["unix"]
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt)) == chunks[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == 6 == chunks[-1].usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 6 and whole.choices[0].finish_reason == "length"

    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0)
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert chat.usage.completion_tokens == 3


@pytest.mark.slow
def test_a_prompt_list_gets_one_choice_per_prompt(http_daemon):
    client = sync_clients(http_daemon)["tcp"]
    both = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=3, temperature=0)
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in PROMPTS[:2]]
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone
    assert both.usage.completion_tokens == 6


@pytest.mark.slow
async def test_sixteen_concurrent_streaming_clients_get_their_single_outputs(http_daemon):
    distinct = PROMPTS[:4]
    prompts = distinct * 4  # 16 clients, each prompt's single run done once
    async with async_client(http_daemon, "unix") as client:
        async def run(prompt: str, stream: bool) -> str:
            response = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                       stream=stream, extra_body={"ignore_eos": True})
            if not stream:
                return response.choices[0].text
            return "".join([chunk.choices[0].text async for chunk in response])

        alone = {p: await run(p, stream=False) for p in distinct}
        together = await asyncio.gather(*(run(p, stream=True) for p in prompts))
    assert together == [alone[p] for p in prompts]


@pytest.mark.slow
def test_models_lists_the_store_with_its_metadata(http_daemon):
    client = sync_clients(http_daemon)["unix"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = client.models.retrieve(MODEL).model_dump()
    assert card["owned_by"] == "flashllm" and card["flashllm"]["num_hidden_layers"] == 30
    assert card["flashllm"]["max_batch"] == 8 and card["max_model_len"] == card["flashllm"]["max_context"]


@pytest.mark.slow
def test_health_says_503_while_the_model_loads_then_200(http_daemon):
    assert http_daemon.health_while_starting == [(503, {"status": "loading"}), (200, {"status": "ok"})]


@pytest.mark.slow
def test_health_needs_no_key_and_the_unix_socket_is_for_owner_and_group(http_daemon):
    with httpx2.Client(base_url=f"http://127.0.0.1:{http_daemon.http_port}") as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").status_code == 401
    info = os.stat(http_daemon.http_unix_path)
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()


# ---------------------------------------------------------------------- errors


@pytest.mark.slow
@pytest.mark.parametrize("fields, param, words", [
    ({"n": 2}, "n", "n=2 is not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "only frequency_penalty=0"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "logit_bias"),
    ({"temperature": "hot"}, "temperature", "temperature='hot' is invalid"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens=0 is invalid"),
])
def test_unsupported_or_bad_fields_get_a_400_naming_the_field(http_daemon, fields, param, words):
    client = sync_clients(http_daemon)["tcp"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hi", **fields)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_daemon_carries_on(http_daemon):
    good = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    with raw_client(http_daemon) as client:
        cases = [
            (client.post("/v1/completions", content=b"{not json"), 400, "invalid_request_error", "not valid JSON"),
            (client.post("/v1/completions", json={**good, "wat": 1}), 400, "invalid_request_error",
             "'wat' is not supported"),
            (client.post("/v1/completions", json={**good, "model": "gpt-4o"}), 404, "not_found_error",
             "'gpt-4o' does not exist"),
            (client.get("/v1/embeddings"), 404, "not_found_error", "no such endpoint /v1/embeddings"),
            (client.post("/v1/completions", content=b"x" * (5 * 2**20)), 413, "invalid_request_error",
             "over the limit"),
            (client.post("/v1/completions", json={**good, "prompt": "hello " * 3000}), 400,
             "invalid_request_error", "context holds"),
            (client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
             "invalid_request_error", "text parts only"),
        ]
    with raw_client(http_daemon, key=None) as anonymous, raw_client(http_daemon, key="wrong" * 8) as wrong:
        cases += [(anonymous.post("/v1/completions", json=good), 401, "authentication_error", "API key"),
                  (wrong.post("/v1/chat/completions", json=good), 401, "authentication_error", "API key")]
    for response, status, kind, words in cases:
        error = response.json()["error"]
        assert (response.status_code, error["type"]) == (status, kind), error
        assert words in error["message"], error
    assert_still_serves(http_daemon)


def test_refusing_to_listen_beyond_loopback_without_a_key(tiny_stores, tmp_path, capsys):
    base = ["serve", "--store", tiny_stores("llama"), "--socket", str(tmp_path / "z.sock")]
    assert cli_main([*base, "--http", "0.0.0.0:8000"]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    assert cli_main([*base, "--http", "localhost"]) == 2
    assert "unix:/path/to.sock" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- metrics and vanishing clients


@pytest.mark.slow
def test_metrics_parse_and_move_by_what_a_request_did(http_daemon, tokenizer):
    prompt = "Flash memory is"
    before = scrape(http_daemon)
    sync_clients(http_daemon)["tcp"].completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                                        extra_body={"ignore_eos": True})
    after = scrape(http_daemon)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("flashllm_completions_total", outcome="length") == 1
    assert moved("flashllm_completion_tokens_total") == 5
    assert moved("flashllm_tokens_generated_total") == 5
    assert moved("flashllm_prompt_tokens_total") == len(tokenizer.encode(prompt))
    assert moved("flashllm_requests_completed_total") == 1
    assert moved("flashllm_time_to_first_token_seconds_count") == 1
    assert moved("flashllm_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert after[("flashllm_requests_running", ())] == 0 and after[("flashllm_healthy", ())] == 1
    for gauge in ("flashllm_tokens_per_second", "flashllm_flash_bytes_per_token",
                  "flashllm_ffn_io_seconds_per_step", "flashllm_ffn_compute_seconds_per_step"):
        assert (gauge, ()) in after


@pytest.mark.slow
def test_a_client_dropping_mid_stream_frees_its_slot(http_daemon):
    before = scrape(http_daemon)
    with raw_client(http_daemon) as client:
        request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
                   "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=request) as response:
            lines = response.iter_lines()
            assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])["choices"][0]["text"]
        # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 5
    while (after := scrape(http_daemon))[("flashllm_requests_running", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[("flashllm_requests_running", ())] == 0
    cancelled = ("flashllm_completions_total", (("outcome", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0.0) == 1
    finished = ("flashllm_tokens_generated_total", ())
    assert after[finished] - before[finished] < 200  # cut off, not run to the end
    assert_still_serves(http_daemon)


@pytest.mark.slow
def test_a_client_giving_up_on_a_plain_response_frees_its_slot(http_daemon):
    before = scrape(http_daemon)
    request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    with raw_client(http_daemon) as client, pytest.raises(httpx2.ReadTimeout):
        client.post("/v1/completions", json=request, timeout=2.0)  # gives up and closes the connection
    deadline = time.monotonic() + 5
    while (after := scrape(http_daemon))[("flashllm_requests_running", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[("flashllm_requests_running", ())] == 0
    cancelled = ("flashllm_completions_total", (("outcome", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0.0) == 1


@pytest.mark.slow
def test_bench_serve_over_http_reports_each_concurrency(http_daemon, tmp_path, capsys):
    key = write_key(str(tmp_path))
    assert cli_main(["bench-serve", "--http", f"127.0.0.1:{http_daemon.http_port}", "--api-key-file", key,
                     "--concurrency", "1,2", "--requests", "2", "--max-tokens", "2",
                     "--json", str(tmp_path / "b.json")]) == 0
    assert "over http" in capsys.readouterr().out
    assert cli_main(["bench-serve", "--socket", http_daemon.socket_path, "--concurrency", "1,2", "--requests", "2",
                     "--max-tokens", "2", "--json", str(tmp_path / "z.json")]) == 0
    assert "over zeromq" in capsys.readouterr().out
    for name in ("b.json", "z.json"):
        levels = json.loads((tmp_path / name).read_text())["levels"]
        assert [(lv["concurrency"], lv["tokens"]) for lv in levels] == [(1, 4), (2, 4)]
        assert all(lv["tokens_per_s"] > 0 and lv["speedup_vs_1"] for lv in levels)


# ---------------------------------------------------------------------- a full queue, a draining daemon


def tiny_http_daemon(tiny_stores, directory, extra: list[str]):
    unix_path = os.path.join(directory, "http.sock")
    daemon = running_daemon(tiny_stores("llama"), ["--max-batch", "1", "--http", f"unix:{unix_path}", *extra])
    return daemon, unix_path


def tiny_async_client(unix_path: str) -> openai.AsyncOpenAI:
    transport = httpx2.AsyncHTTPTransport(uds=unix_path, limits=httpx2.Limits(max_connections=None))
    return openai.AsyncOpenAI(base_url="http://flashllm/v1", api_key="none", max_retries=0,
                              http_client=httpx2.AsyncClient(transport=transport))


def long_stream(client, model: str, prompt: str):
    async def run() -> str:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=200, stream=True,
                                                 extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])
    return run()


def test_a_full_queue_gets_429_and_the_daemon_carries_on(tiny_stores, tmp_path):
    model = os.path.basename(tiny_stores("llama"))
    context, unix_path = tiny_http_daemon(tiny_stores, str(tmp_path), ["--max-queued", "1"])
    with context:
        async def scenario():
            async with tiny_async_client(unix_path) as client:
                crowd = await asyncio.gather(*(long_stream(client, model, p) for p in PROMPTS[:3]),
                                             return_exceptions=True)
                after = await client.completions.create(model=model, prompt="hi", max_tokens=2)
            return crowd, after

        crowd, after = asyncio.run(scenario())
    refused = [r for r in crowd if isinstance(r, openai.RateLimitError)]
    assert refused and all(isinstance(r, (str, openai.RateLimitError)) for r in crowd), crowd
    assert refused[0].status_code == 429 and "retry later" in refused[0].body["message"]
    assert after.usage.completion_tokens == 2


def test_a_draining_daemon_answers_503_and_finishes_its_streams(tiny_stores, tmp_path):
    model = os.path.basename(tiny_stores("llama"))
    context, unix_path = tiny_http_daemon(tiny_stores, str(tmp_path), ["--drain-timeout-s", "60"])
    with context as daemon:
        async def scenario():
            async with tiny_async_client(unix_path) as client:
                running = [asyncio.create_task(long_stream(client, model, p)) for p in PROMPTS[:4]]
                await asyncio.sleep(0.3)
                daemon.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                with pytest.raises(openai.APIStatusError) as draining:
                    await client.completions.create(model=model, prompt="hi", max_tokens=1)
                async with httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=unix_path)) as raw:
                    health = await raw.get("http://flashllm/health")
                return draining.value, health, await asyncio.gather(*running)

        draining, health, drained = asyncio.run(scenario())
        assert draining.status_code == 503 and draining.body["type"] == "service_unavailable"
        assert "shutting down" in draining.body["message"]
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert len(drained) == 4 and all(drained)  # the streams in flight were finished, not cut
        assert daemon.process.wait(timeout=30) == 0
    assert not os.path.exists(unix_path)
