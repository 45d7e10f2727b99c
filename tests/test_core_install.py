"""edje's core install (torch, transformers, safetensors, huggingface_hub, datasets, Pillow):
it imports and scores from a store without Lightning, FAISS or matplotlib, and each feature of
an extra names the extra it needs, in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import torch

from edje.store import TokenStore
from tests.helpers.paths import ROOT
from tests.helpers.tiny import make_tiny_model

EXTRAS_ONLY = ("lightning", "faiss", "matplotlib", "torchmetrics", "fastapi", "uvicorn")
# Run first in the subprocess: the extras' packages look uninstalled.
NOT_INSTALLED = f"""
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {(*EXTRAS_ONLY, "lightning_utilities", "pytorch_lightning")!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NOT_INSTALLED + code], capture_output=True, text=True, timeout=300
    )


def test_the_core_dependencies_leave_the_extras_out_and_bound_uvicorn():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not [name for name in (*EXTRAS_ONLY, "faiss-cpu") if name in core]
    extras = project["optional-dependencies"]
    assert {"training", "serving", "faiss", "plots", "onnx", "all"} <= set(extras)
    uvicorn = next(d for d in extras["serving"] if d.startswith("uvicorn"))
    assert "<" in uvicorn  # its private H11Protocol is subclassed (edje.serving.connections)


def test_the_core_install_scores_from_a_store(tiny_processor, tiny_vision_encoder, tmp_path):
    model = make_tiny_model(tiny_processor, tiny_vision_encoder)
    model.save_pretrained(tmp_path / "edje", save_vision_encoder=True)
    tiny_processor.save_pretrained(tmp_path / "edje")
    tokens = torch.randn(
        3, *model.config.image_token_shape, generator=torch.Generator().manual_seed(0)
    )
    fingerprint = model.store_fingerprint()
    with TokenStore.create(tmp_path / "store", token_shape=tokens.shape[1:],
                           fingerprint=fingerprint) as writer:  # fmt: skip
        writer.add(["a", "b", "c"], tokens)
    code = f"""
import json, warnings
from edje.rerank import EDJEReranker
from edje.first_stage import VectorIndex
from edje.evaluation.report import EvaluationReport

reranker = EDJEReranker({str(tmp_path / "edje")!r}, store={str(tmp_path / "store")!r}, device="cpu")
hits = reranker.rank("a cat", ["a", "b", "c"])
try:
    VectorIndex(4)
    faiss = "built"
except ImportError as error:
    faiss = str(error)
report = EvaluationReport.build(model=None, first_stage="toy", dataset={{"name": "toy"}}, k=1,
    ks=[1], depths=[1], first_stage_curve={{"image_retrieval_recall@1": 0.5,
    "text_retrieval_recall@1": 0.5}}, reranked_curves={{}}, curve_ks=[1], pairs_scored=0,
    seconds={{}}, device="cpu", first_stage_recall_from="")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    written = sorted(report.save({str(tmp_path / "report")!r}))
print(json.dumps({{"hits": hits, "faiss": faiss, "written": written,
                  "warnings": [str(w.message) for w in caught]}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = reference_ranking(tmp_path)
    assert [h["image_id"] for h in out["hits"]] == [h["image_id"] for h in expected]
    assert "VectorIndex needs faiss" in out["faiss"] and "pip install 'edje[faiss]'" in out["faiss"]
    assert out["written"] == ["json", "markdown"]  # the plot left out, and said so
    assert any("pip install 'edje[plots]'" in w for w in out["warnings"])


def reference_ranking(tmp_path):
    """The same ranking with every extra installed."""
    from edje.rerank import EDJEReranker

    reranker = EDJEReranker(str(tmp_path / "edje"), store=tmp_path / "store", device="cpu")
    return reranker.rank("a cat", ["a", "b", "c"])


def test_a_command_of_an_extra_names_it_in_one_line():
    code = "import edje_cli; sys.argv[1:] = ['fit', '--config', 'quickstart']; edje_cli.run()"
    result = run_python(code)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "edje: error: edje fit needs lightning, which edje's core install leaves out: "
        "pip install 'edje[training]' (--verbose shows the traceback)"
    ]
