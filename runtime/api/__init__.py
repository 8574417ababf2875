"""flashllm's Python API: run a language model whose FFN weights stay on flash.

    import flashllm

    flashllm.convert("model.gguf", "stores/model")                  # once per model
    with flashllm.Engine("stores/model", mode="dense") as engine:   # in this process
        print(engine.generate(["The capital of France is"], flashllm.SamplingParams(max_tokens=8))[0].text)

    config = flashllm.EngineConfig(mode="sparse", memory_budget_bytes=2**30,   # the same settings as one
                                   sparse=flashllm.SparseOptions(keep_fraction=0.25))  # typed, checked object
    with flashllm.Engine("stores/model", config=config) as engine:
        ...

    with flashllm.Client("/run/flashllm/flashllm.sock") as client:  # a running `flashllm serve`
        print(client.generate("The capital of France is", max_tokens=8).text)

Names resolve on first use, so `flashllm.Client` never imports torch.
"""
from __future__ import annotations

import importlib

# public name → (module, attribute)
_EXPORTS = {
    "Engine": ("flashllm.runtime.core.engine", "Engine"),
    "EngineConfig": ("flashllm.runtime.core.engine_config", "EngineConfig"),  # Engine(store, config=...)
    "SparseOptions": ("flashllm.runtime.core.engine_config", "SparseOptions"),
    "SamplingParams": ("flashllm.runtime.core.sampling", "SamplingParams"),
    "Client": ("flashllm.runtime.clients.client", "Client"),
    "AsyncClient": ("flashllm.runtime.clients.client", "AsyncClient"),
    "convert": ("flashllm.runtime.tools.convert.store_writer", "convert"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flashllm' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
