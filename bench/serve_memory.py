"""Memory of an `edje serve` process under concurrent large request bodies.

Starts `edje serve` (the shipped quickstart model over a small random store) in a subprocess,
then 16 clients at once each POST a 29 MB body (a JSON query of 29 million characters: refused
with a 400 once parsed, after the server has held it). Printed: the server's peak RSS over its
idle RSS (`VmHWM`), and its RSS once all are answered.

    python bench/serve_memory.py
    python bench/serve_memory.py --clients 16 --megabytes 29
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: bytes, statuses: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/rerank", body, {"Content-Type": "application/json"})
    statuses.append(connection.getresponse().status)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--megabytes", type=int, default=29)
    args = parser.parse_args()
    from edje import EDJEModel
    from edje.quickstart import shipped_checkpoint
    from edje.store import TokenStore

    model = EDJEModel.from_pretrained(shipped_checkpoint())
    shape = (model.config.vision_num_tokens, model.config.vision_hidden_size)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store"
        fingerprint = model.store_fingerprint(raw=True)
        with TokenStore.create(store, token_shape=shape, fingerprint=fingerprint) as writer:
            writer.add([f"img{i}" for i in range(8)], torch.randn(8, *shape))
        port = free_port()
        command = [sys.executable, "-m", "edje.cli", "serve", "--model", str(shipped_checkpoint()),
                   "--store", str(store), "--port", str(port), "--device", "cpu"]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("edje serve did not start") from None
                    time.sleep(0.2)
            idle = status_mb(server.pid, "VmRSS")
            body = json.dumps({"query": "a" * (args.megabytes << 20), "documents": ["img0"]})
            statuses: list[int] = []
            clients = [
                threading.Thread(target=post, args=(port, body.encode(), statuses))
                for _ in range(args.clients)
            ]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            time.sleep(1)
            result = {
                "clients": args.clients, "body_mb": args.megabytes, "statuses": sorted(statuses),
                "idle_rss_mb": round(idle), "peak_over_idle_mb": round(
                    status_mb(server.pid, "VmHWM") - idle),
                "after_over_idle_mb": round(status_mb(server.pid, "VmRSS") - idle),
            }  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
