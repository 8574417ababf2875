"""OpenAI request bodies read into flashllm's terms, and refused with the field named (no daemon needed)."""
from __future__ import annotations

import os

import pytest

from flashllm.protocol.openai_api import (CHAT, COMPLETION, Choice, OpenAIError, chunk_body, parse_request,
                                          response_body)
from flashllm.runtime.daemon.http_api import HttpAddressError, HttpOptions, parse_http_address


def test_a_chat_body_becomes_messages_and_sampling_fields():
    job = parse_request(CHAT, {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "temperature": 0, "seed": 3, "stop": "\n", "stream": True,
        "stream_options": {"include_usage": True}, "n": 1, "user": "alice"})
    assert job.prompts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]]
    assert job.sampling == {"max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 3,
                            "stop": ["\n"], "ignore_eos": False}
    assert job.stream and job.include_usage


def test_completion_prompts_may_be_text_lists_or_token_ids():
    assert parse_request(COMPLETION, {"model": "m", "prompt": "a"}).prompts == ["a"]
    assert parse_request(COMPLETION, {"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_request(COMPLETION, {"model": "m", "prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert parse_request(COMPLETION, {"model": "m", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    assert parse_request(COMPLETION, {"model": "m", "prompt": "a"}).sampling["max_tokens"] == 16  # OpenAI's default


@pytest.mark.parametrize("endpoint, body, param, words", [
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model", "model is missing"),
    (CHAT, {"model": "m", "messages": []}, "messages", "non-empty list"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls", "not supported"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools", "only tools=None"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options", "only allowed with stream=true"),
    (COMPLETION, {"model": "m", "prompt": "x", "echo": True}, "echo", "only echo=False"),
    (COMPLETION, {"model": "m", "prompt": [1, -2]}, "prompt", "token ids"),
    (COMPLETION, {"model": "m", "prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
    (COMPLETION, {"model": "m", "prompt": "x", "top_p": 0}, "top_p", "top_p=0 is invalid"),
    (COMPLETION, {"model": "m", "prompt": "x", "seed": -1}, "seed", "seed=-1 is invalid"),
])
def test_bad_bodies_name_the_field(endpoint, body, param, words):
    with pytest.raises(OpenAIError) as refused:
        parse_request(endpoint, body)
    assert refused.value.status == 400 and refused.value.param == param and words in refused.value.message


def test_response_and_chunk_shapes():
    job = parse_request(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    body = response_body(job, "chatcmpl-1", 5, [Choice("Paris.", "stop", 10, 3)])
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                      "content": "Paris."}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    first = chunk_body(job, "chatcmpl-1", 5, 0, "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "usage" not in first


def test_http_addresses():
    assert parse_http_address("unix:/run/flashllm/http.sock").unix_path == "/run/flashllm/http.sock"
    assert parse_http_address("[::1]:8000").is_loopback and parse_http_address("127.0.0.1:80").port == 80
    assert not parse_http_address("0.0.0.0:8000").is_loopback
    for bad in ("unix:", "8000", "example.com:80", "127.0.0.1:0", "127.0.0.1:99999"):
        with pytest.raises(HttpAddressError):
            parse_http_address(bad)


def test_an_address_beyond_loopback_needs_a_long_enough_key(tmp_path):
    with pytest.raises(HttpAddressError, match="--api-key-file"):
        HttpOptions.from_args(["127.0.0.1:8000", "192.168.1.5:8000"], None, None)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(HttpAddressError, match="at least 16"):
        HttpOptions.from_args(["192.168.1.5:8000"], str(short), None)
    good = tmp_path / "good.key"
    good.write_text("k" * 32 + "\n")
    assert HttpOptions.from_args(["192.168.1.5:8000"], str(good), None).api_key == "k" * 32


def test_an_http_socket_another_server_holds_is_refused_and_left_alone(tmp_path):
    from flashllm.runtime.daemon.http_api import HttpFrontDoor
    from flashllm.runtime.daemon.metrics import DaemonMetrics
    from flashllm.runtime.daemon.socket_lock import IpcEndpointLock

    path = str(tmp_path / "http.sock")
    with IpcEndpointLock(path):
        door = HttpFrontDoor(HttpOptions.from_args([f"unix:{path}"], None, None), "m", DaemonMetrics())
        with pytest.raises(HttpAddressError, match=f"cannot serve HTTP on unix:{path}: another flashllm serve"):
            door.claim()
        assert os.path.exists(path + ".lock")  # the holder's lock stays
    assert os.listdir(tmp_path) == []
