"""Fairness of `edje serve`: how long a 2-document request waits beside a 1,000-document one.

A client sends 1,000 store ids with a long caption (or 1,000 small base64 images); 0.3 s
later another client sends 2 store ids. Printed: each request's latency, and the same
2-document request alone. Runs the real service (`create_app` + uvicorn on loopback) over the
shipped quickstart model, or a random paper-size EDJE (MiniLM-L12-H384 joint encoder, 64
tokens of width 384; scores carry no meaning, only the cost counts).

    python bench/fairness.py --model quickstart --documents ids
    python bench/fairness.py --model quickstart --documents images
    python bench/fairness.py --model paper --documents ids
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

LONG_CAPTION = ("a small red circle left of a large blue square near a green star " * 60)[:4000]


def post(url: str, payload: dict) -> tuple[int, float]:
    request = urllib.request.Request(f"{url}/v1/rerank", data=json.dumps(payload).encode())
    request.add_header("Content-Type", "application/json")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
        return response.status, time.perf_counter() - started


def reranker_of(name: str, folder: Path, count: int):
    from edje.rerank import EDJEReranker
    from edje.store import TokenStore

    if name == "quickstart":
        from edje import EDJEModel, EDJEProcessor
        from edje.quickstart import shipped_checkpoint

        model = EDJEModel.from_pretrained(shipped_checkpoint()).eval()
        processor = EDJEProcessor.from_pretrained(shipped_checkpoint())
    else:
        from throughput import SIZES, build_edje, make_processor

        processor = make_processor(SIZES["paper"])
        model = build_edje(SIZES["paper"], processor)
        model.config.vision_encoder_sha256 = "none: tokens are random"  # no vision encoder
    shape = model.config.image_token_shape
    if name == "quickstart":  # a raw store, as edje quickstart leaves it: the adapter runs too
        shape = (model.config.vision_num_tokens, model.config.vision_hidden_size)
        fingerprint = model.store_fingerprint(raw=True)
    else:
        fingerprint = model.store_fingerprint()
    with TokenStore.create(folder / "store", token_shape=shape, fingerprint=fingerprint) as w:
        w.add([f"img{i}" for i in range(count)], torch.randn(count, *shape))
    return EDJEReranker(model, store=folder / "store", device="cpu", processor=processor)


def tiny_png(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["quickstart", "paper"], default="quickstart")
    parser.add_argument("--documents", choices=["ids", "images"], default="ids")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from edje.serving.app import RerankerBackend, ServeLimits, create_app, serve_in_background

    with tempfile.TemporaryDirectory() as folder:
        reranker = reranker_of(args.model, Path(folder), args.count)
        app = create_app(RerankerBackend(reranker), limits=ServeLimits())
        if args.documents == "ids":
            large = {"query": LONG_CAPTION, "documents": [f"img{i}" for i in range(args.count)]}
        else:
            images = [{"image": tiny_png(i)} for i in range(args.count)]
            large = {"query": "a red circle", "documents": images}
        small = {"query": "a cat", "documents": ["img1", "img2"]}
        with serve_in_background(app) as url:
            post(url, small)  # warm up
            alone = min(post(url, small)[1] for _ in range(3))
            times: dict[str, float] = {}
            thread = threading.Thread(target=lambda: times.update(large=post(url, large)[1]))
            thread.start()
            time.sleep(0.3)  # the large request is in
            times["small"] = post(url, small)[1]
            thread.join()
    result = {
        "model": args.model, "documents": args.documents, "count": args.count,
        "threads": args.threads, "small_alone_s": round(alone, 3),
        "small_beside_large_s": round(times["small"], 3), "large_s": round(times["large"], 3),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
