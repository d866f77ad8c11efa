"""Load on `lemoe serve` (issue 13), loopback only and bounded: N concurrent clients send greedy completions
while a batch of edits arrives every few seconds; then the server is "restarted" on the same adapter
directory and must serve every acknowledged edit.

    python benchmarks/serve_load.py --clients 8 --requests 160 --edit-every 5 --out results/serve_load.json

JSON: requests per second, p50 / p95 latency, errors (must be 0), edits acknowledged and edits served after
the restart (must be equal), generations that overlapped an edit's training, threads and versions.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import header, write_json, zsre_records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160, help="completions in all (bounded)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--edit-every", type=float, default=5.0, help="seconds between edit batches")
    parser.add_argument("--edit-batch", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=480.0, help="stop sending after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="results/serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import httpx
    import uvicorn

    from lemoe import load_model
    from lemoe.server import create_app, serve_model

    records = zsre_records(0, 400)
    prompts = [r.prompt for r in zsre_records(1000, 200)]  # questions the edits do not touch, and edited ones
    adapter = Path(tempfile.mkdtemp(prefix="lemoe-serve-load-")) / "adapter"
    model, tok = load_model(args.model)
    served = serve_model(model, tok, adapter, args.model or "smollm2-135m")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"

    latencies: list[float] = []
    errors: list[str] = []
    sent = {"n": 0}
    lock = threading.Lock()
    training = threading.Event()
    overlapped = {"n": 0}
    started = time.perf_counter()

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            while True:
                with lock:
                    if sent["n"] >= args.requests or time.perf_counter() - started > args.max_seconds:
                        return
                    i = sent["n"]
                    sent["n"] += 1
                edited = records[(i // 2) % len(records)].prompt
                prompt = edited if i % 2 else prompts[i % len(prompts)]
                during = training.is_set()
                t0 = time.perf_counter()
                try:
                    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": args.max_tokens,
                                                                  "temperature": 0})
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    overlapped["n"] += int(during and training.is_set())

    acknowledged: list[int] = []
    edit_seconds: list[float] = []

    def editor() -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            batch = 0
            while any(t.is_alive() for t in clients):
                time.sleep(args.edit_every)
                chunk = records[batch * args.edit_batch : (batch + 1) * args.edit_batch]
                if not chunk or not any(t.is_alive() for t in clients):
                    return
                training.set()
                t0 = time.perf_counter()
                response = http.post("/v1/edits", json={"edits": [r.to_dict(probes=False) for r in chunk]})
                training.clear()
                if response.status_code == 200:
                    acknowledged.append(len(chunk))
                    edit_seconds.append(time.perf_counter() - t0)
                else:
                    errors.append(f"edit {response.status_code}: {response.text[:200]}")
                batch += 1

    clients = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in clients:
        t.start()
    edits = threading.Thread(target=editor)
    edits.start()
    for t in clients:
        t.join()
    edits.join()
    wall = time.perf_counter() - started
    server.should_exit = True
    runner.join(timeout=30)
    served.editor.unload()

    # a new server on the same directory (as after a restart) must serve every acknowledged edit
    restarted = serve_model(load_model(args.model)[0], tok, adapter, "restarted")
    served_after = len(restarted.editor.edits)

    ordered = sorted(latencies)
    result = {
        **header("serve_load", args),
        "threads": args.threads,
        "clients": args.clients,
        "requests": len(latencies) + len([e for e in errors if not e.startswith("edit")]),
        "max_tokens": args.max_tokens,
        "wall_seconds": wall,
        "requests_per_second": len(latencies) / wall,
        "latency_p50_seconds": statistics.median(ordered) if ordered else None,
        "latency_p95_seconds": ordered[int(0.95 * (len(ordered) - 1))] if ordered else None,
        "errors": len(errors),
        "error_samples": errors[:5],
        "edit_batches_acknowledged": len(acknowledged),
        "edits_acknowledged": sum(acknowledged),
        "edits_served_after_restart": served_after,
        "edit_seconds_mean": statistics.mean(edit_seconds) if edit_seconds else None,
        "completions_during_training": overlapped["n"],
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "error_samples")}, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
