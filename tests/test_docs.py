"""The examples users copy: README code blocks and the public docstrings run as written."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCTESTED = [
    "edje.backbones",
    "edje.data",
    "edje.data.builtin",
    "edje.data.emoji",
    "edje.data.icon_captions",
    "edje.data.npm",
    "edje.data.load",
    "edje.evaluation.metrics",
    "edje.fusion",
    "edje.scoring",
    "edje.configuration_edje",
    "edje.modeling_edje",
    "edje.processing_edje",
    "edje.rerank",
    "edje.training.losses",
    "edje.training.sampling",
]


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}  # blocks build on each other, as a reader runs them
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-edje" / "model.safetensors").is_file()
    assert namespace["stored"].shape == (1, 64, 384)
    # The stored tokens and the photo are the same image: the same score (fp16 storage aside).
    scores = {entry["corpus_id"]: entry["score"] for entry in namespace["ranking"]}
    assert sorted(scores) == [0, 1] and abs(scores[0] - scores[1]) < 1e-3


@pytest.mark.parametrize("module_name", DOCTESTED)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
