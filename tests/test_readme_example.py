"""The README's Python example runs as written, against the demo store."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.mark.slow
def test_the_readmes_python_example_answers_from_the_store(demo_store):
    code = readme_python_example()
    assert '"stores/smollm2"' in code  # the quick start's store
    done = subprocess.run([sys.executable, "-c", code.replace('"stores/smollm2"', repr(demo_store))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text, ms_per_token = done.stdout.rsplit(maxsplit=1)
    assert "Paris" in text and float(ms_per_token) > 0


def test_flashllm_installs_under_its_own_name_only():
    """pip install puts one top-level package, flashllm, in site-packages: no generic `runtime` or `protocol`."""
    from importlib.metadata import distribution

    top_level = (distribution("flashllm").read_text("top_level.txt") or "").split()
    assert top_level == ["flashllm"]
    import flashllm

    assert {"Engine", "SamplingParams", "Client", "AsyncClient", "convert"} <= set(dir(flashllm))
    assert flashllm.Engine.__module__ == "flashllm.runtime.core.engine"
