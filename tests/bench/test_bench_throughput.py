"""bench/throughput.py on CPU, small sizes: the JSON is complete and parity holds. Never timed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edje.training.hardware import cpu_has_native_bf16
from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("bench") / "cpu-small.json"
    argv = ["--device", "cpu", "--sizes", "small", "--batch-sizes", "8", "16", "--seconds", "0"]
    exact = ["--exact-candidates", "16", "64", "--exact-queries", "3", "--calibration-pairs", "64"]
    module.main([*argv, "--candidates", "4", "--parity-queries", "8", *exact, "--out", str(out)])
    report = json.loads(out.read_text())
    report["exact_markdown"] = module.exact_markdown(report)
    return report


def test_header_names_device_versions_and_peak(report):
    for key in ("device", "torch", "transformers", "dtype", "token_source", "flops_per_pair"):
        assert report[key], key
    assert report["device_type"] == "cpu"
    peak = report["matmul_peak"]
    assert peak["square_tflops"] > 0 and peak["mlp_up_tflops"] > 0
    # The roofline is the fastest GEMM measured, over every dtype the CPU computes natively.
    assert peak["best_tflops"] == max(v for k, v in peak.items() if k.endswith("_tflops"))
    low, high = report["caption_pieces_min_max"]
    assert 12 <= low <= high <= 20


def test_every_case_ran_with_figures_per_batch_size(report):
    cases = report["cases"]
    expected = {"edje_transformers", "fast_eager", "onnx_fp32", "onnx_int8", "blip_full"}
    if cpu_has_native_bf16():
        expected.add("fast_bf16")
    assert expected | {"blip_cached"} <= set(cases)
    for name, case in cases.items():
        assert "error" not in case, (name, case.get("error"))
        assert set(case["by_batch_size"]) == {"8", "16"}, name
        for per_source in case["by_batch_size"].values():
            for figures in per_source.values():
                assert figures["pairs_per_s"] > 0
                assert figures["mfu"] > 0
                assert figures["peak_memory_bytes"] > 0
    assert set(cases["fast_eager"]["by_batch_size"]["16"]) == {"resident", "memmap"}


def test_parity_fields_within_tolerance(report):
    cases = report["cases"]
    for name in ("edje_transformers", "fast_eager", "onnx_fp32"):
        parity = cases[name]["parity"]
        assert parity["max_abs_diff"] < 1e-4, name
        assert parity["top10_order_agreement"] == 1.0, name
    if "fast_bf16" in cases:  # a CPU with AVX-512 BF16 / AMX: bf16 rounding, measured
        bf16 = cases["fast_bf16"]["parity"]
        assert 0 < bf16["max_abs_diff"] < 0.5 and bf16["top1_agreement"] >= 0.5
    int8 = cases["onnx_int8"]["parity"]
    assert int8["max_abs_diff"] < 0.5 and int8["top1_agreement"] >= 0.5
    assert cases["blip_cached"]["parity_vs_full_max_abs_prob_diff"] < 1e-5


def test_exact_table_keeps_fp32s_top_n_with_its_bound_and_counts(report):
    table = report["exact"]["random"]
    assert table["top_n"] == 10 and table["queries"] == 3
    calibration = table["calibration"]
    assert calibration["bound"] == calibration["safety_margin"] * calibration["max_abs_diff"] > 0
    assert calibration["pairs"] == 64 and calibration["captions"] == 1  # --calibration-pairs 64
    assert calibration["source"].startswith("measured in this run: each caption's top 64 of")
    assert set(table["by_k"]) == {"16", "64"}
    for k, rows in table["by_k"].items():
        assert set(rows) == {"transformers_fp32", "fast_float32", "fast_bfloat16", "fast_exact"}
        assert all(r["pairs_per_s"] > 0 for r in rows.values()), k
        exact = rows["fast_exact"]
        assert exact["identical_top_n"] == rows["fast_float32"]["identical_top_n"] == 1.0, k
        assert exact["fallbacks"] == 0 and 0 < exact["rescored_share"] <= 1, k
    assert table["by_k"]["64"]["fast_exact"]["rescored_share"] < 1  # not everything re-scored
    assert "| random | 64 | fast_exact |" in report["exact_markdown"]
