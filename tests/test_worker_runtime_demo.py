"""The worker runtime on the real demo model: the same greedy tokens as the in-process sparse engine.

Its 10 MiB layers take several dense-read chunks in a prompt's prefill (streamed through two shared-memory
slots in the workers), which the tiny models of tests/test_worker_runtime.py never need. A file of its own:
the suite's workers each run a whole file, and this one is long enough to run beside the rest.
"""
from __future__ import annotations

import os
import shutil

import pytest

from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.runtime.tools.calibrate import calibrate
from tests.conftest import calibration_text

DEMO_OPTIONS = {"memory_budget_bytes": 450 * 2**20, "keep_fraction": 0.25}  # ~60% of the FFN fits: every token reads


@pytest.fixture(scope="module")
def calibrated_demo(demo_store, tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("demo-calibrated") / "demo")
    shutil.copytree(demo_store, store)
    # both runtimes read the same predictors: their quality is not what the tests below compare
    calibrate(store, calibration_text(), max_tokens=600, epochs=1, progress=False, log=lambda *a: None)
    return store


def _demo_greedy_in_both_runtimes(store: str, prompts: list[str], new_tokens: int) -> dict[str, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens = {}
    for runtime in ("inproc", "workers"):
        with Engine(store, mode="sparse", max_batch=1, max_context=512, ffn_options=dict(DEMO_OPTIONS),
                    runtime=runtime) as engine:
            tokens[runtime] = [engine.generate([p], params)[0].tokens for p in prompts]
    return tokens


@pytest.mark.slow
def test_demo_model_workers_match_inprocess_on_three_prompts(calibrated_demo):
    """The issue's check, shortened to run every time: the demo model's 10 MiB layers take three dense-read
    chunks in the prompts' prefill (streamed through two shared-memory slots in the workers), which the tiny
    models never need; a budget that forces reads. The full check below caught runtimes whose plans
    differed; this catches it too."""
    from flashllm.runtime.tools.calibrate import SELF_TEXT_PROMPTS

    # 16 tokens (24 before) keep the suite's longest test off its critical path; the 64-token check is below
    tokens = _demo_greedy_in_both_runtimes(calibrated_demo, SELF_TEXT_PROMPTS[:3], 16)
    assert tokens["workers"] == tokens["inproc"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLASHLLM_FULL_DEMO_CHECK") != "1",
                    reason="4 minutes on 2 idle cores (15 loaded): run with FLASHLLM_FULL_DEMO_CHECK=1. It diverged "
                           "on one prompt while compute ran 1 torch thread against the engine's 2 (CPU attention's "
                           "low bits depend on the thread count), and when the workers' memory plan held two chunks "
                           "more than the in-process one; it passes now")
def test_demo_model_workers_match_inprocess(calibrated_demo):
    """The issue's check: demo model, 10 prompts × 64 tokens, at a budget that forces reads."""
    from flashllm.runtime.tools.calibrate import SELF_TEXT_PROMPTS

    tokens = _demo_greedy_in_both_runtimes(calibrated_demo, SELF_TEXT_PROMPTS[:10], 64)
    assert tokens["workers"] == tokens["inproc"]
