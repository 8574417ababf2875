"""Which executor runs the model for a --runtime: the one place that maps the name to the class."""
from __future__ import annotations

import importlib

from flashllm.workers.interfaces import Executor

# --runtime → (module, class); imported on demand, so an in-process engine never loads the supervisor
EXECUTOR_CLASSES = {
    "inproc": ("flashllm.workers.executor", "ModelExecutor"),  # the model in this process
    "workers": ("flashllm.runtime.core.worker_executor", "WorkerExecutor"),  # prefetch and compute processes
}


def executor_class(runtime: str) -> type[Executor]:
    """The Executor class of a resolved --runtime ("inproc" or "workers"; "auto" is decided before)."""
    if runtime not in EXECUTOR_CLASSES:
        raise ValueError(f"--runtime {runtime!r} is not one of {', '.join(EXECUTOR_CLASSES)}")
    module_name, class_name = EXECUTOR_CLASSES[runtime]
    return getattr(importlib.import_module(module_name), class_name)
