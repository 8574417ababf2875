"""A small asyncio client for the daemon's OpenAI HTTP API, for `flashllm bench-serve --http`.

Programs that just want completions should use the `openai` package (deploy/README.md
shows it on the unix socket); this one measures: it streams /v1/completions and
times the first token and the decode as this client sees them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

UNIX_PREFIX = "unix:"


class HttpClientError(Exception):
    """The daemon's HTTP API could not be reached or refused a request."""


@dataclass
class StreamedCompletion:
    text: str
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float  # tokens after the first over the time after the first


def read_key_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except OSError as error:
        raise HttpClientError(f"cannot read --api-key-file {path}: {error.strerror}") from None


class OpenAIHttpClient:
    """async with OpenAIHttpClient("unix:/run/flashllm/http.sock") as client: await client.stream_completion(...)"""

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float = 600.0):
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)  # one per concurrent stream
        if address.startswith(UNIX_PREFIX):
            transport = httpx.AsyncHTTPTransport(uds=address[len(UNIX_PREFIX):], limits=limits)
            base_url = "http://flashllm"
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits)
            base_url = f"http://{address}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._address = address
        self._client = httpx.AsyncClient(transport=transport, base_url=base_url, headers=headers,
                                         timeout=timeout_s)

    async def __aenter__(self) -> OpenAIHttpClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._client.aclose()

    async def model_card(self) -> dict:
        body = await self._json("GET", "/v1/models")
        return body["data"][0]

    async def stream_completion(self, model: str, prompt: str, max_tokens: int) -> StreamedCompletion:
        import httpx

        request = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start_s = time.perf_counter()
        first_s = last_s = None
        parts, usage = [], None
        try:
            async with self._client.stream("POST", "/v1/completions", json=request) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise HttpClientError(_error_text(response))
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        raise HttpClientError(chunk["error"]["message"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        if choice["text"]:
                            last_s = time.perf_counter()
                            first_s = first_s or last_s
                            parts.append(choice["text"])
        except httpx.HTTPError as error:
            raise HttpClientError(f"HTTP request to {self._address} failed: {error}") from None
        if usage is None:
            raise HttpClientError("the stream ended without a usage chunk")
        tokens = usage["completion_tokens"]
        first_s = first_s or time.perf_counter()
        decode_s = (last_s or first_s) - first_s
        return StreamedCompletion("".join(parts), tokens, first_s - start_s,
                                  (tokens - 1) / decode_s if decode_s > 0 else 0.0)

    async def _json(self, method: str, path: str) -> dict:
        import httpx

        try:
            response = await self._client.request(method, path)
        except httpx.HTTPError as error:
            raise HttpClientError(f"cannot reach the daemon's HTTP API at {self._address}: {error}; is "
                                  "`flashllm serve --http` running there?") from None
        if response.status_code != 200:
            raise HttpClientError(_error_text(response))
        return response.json()


def _error_text(response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
