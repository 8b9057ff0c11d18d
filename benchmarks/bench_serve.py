"""Serving throughput and latency: the OpenAI-compatible server under 1, 8 and 32 concurrent clients.

    python benchmarks/bench_serve.py --model DIR [--concurrency 1,8,32] [--duration 20] [--max-requests 256]
        [--prompt-len 32] [--max-tokens 32] [--max-batch 32] [--max-len 512] [--decode auto] [--json OUT]
    python benchmarks/bench_serve.py --shape mixtral-8x7b [--dense] [--layers 32] [--impl auto] ...   # GPU

Starts ``python -m puzzlemoe_jax.serve`` on 127.0.0.1 (``--shape``: this script in server mode, the
model built on the device with random weights by ``bench_e2e.build_model``, packed at 50 % unless
``--dense``), waits for its warmup, then for each concurrency level runs that many clients, each
sending streamed greedy completions (random token-id prompts of ``--prompt-len``, ``--max-tokens``
new tokens) one after another until ``--duration`` seconds or ``--max-requests`` requests.  Reports
requests/s, output tokens/s, time to first token (submission to first streamed token) and
inter-token latency (gap between a request's streamed tokens), p50 and p99; prints a table and
writes JSON.  Only localhost is contacted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from kernels import IMPL_CHOICES, IMPL_HELP  # noqa: E402


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _client(client, url, rng, args, deadline, budget, out, vocab):
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        prompt = [int(rng.integers(1, vocab)) for _ in range(args.prompt_len)]
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        first, last, gaps, n = None, None, [], 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out["errors"] += 1
                await r.aread()
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                k = len(json.loads(line[6:])["choices"][0]["token_ids"])
                if not k:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps += [(now - last) / k] * k
                last, n = now, n + k
        out["ttft"].append(first - t0)
        out["itl"] += gaps
        out["tokens"] += n
        out["requests"] += 1
        out["end"] = max(out["end"], time.perf_counter())


async def _level(url, c, args, vocab):
    import httpx  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    out = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0, "end": 0.0}
    start = time.perf_counter()
    budget = [args.max_requests]
    async with httpx.AsyncClient(timeout=args.duration + 600, limits=httpx.Limits(max_connections=c + 4)) as client:
        await asyncio.gather(*(_client(client, url, np.random.default_rng(1000 * c + i), args,
                                       start + args.duration, budget, out, vocab) for i in range(c)))
    el = max(out["end"], start + 1e-9) - start
    ms = lambda v: 1000 * v  # noqa: E731
    return {"concurrency": c, "requests": out["requests"], "errors": out["errors"], "seconds": round(el, 2),
            "requests_per_s": out["requests"] / el, "output_tokens_per_s": out["tokens"] / el,
            "ttft_ms_p50": ms(_pct(out["ttft"], 50)), "ttft_ms_p99": ms(_pct(out["ttft"], 99)),
            "itl_ms_p50": ms(_pct(out["itl"], 50)), "itl_ms_p99": ms(_pct(out["itl"], 99))}


def table(rows) -> str:
    head = "| clients | requests | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.1f} | {r['ttft_ms_p99']:.1f} | "
                     f"{r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} |")
    return "\n".join(lines)


def serve_random(args) -> None:
    """Server mode (``--_serve``): a random-weight model of ``--shape`` behind the HTTP server."""
    sys.path.insert(0, str(HERE))
    from bench_e2e import SHAPES, build_model  # noqa: PLC0415
    from puzzlemoe_jax.engine import Engine  # noqa: PLC0415
    from puzzlemoe_jax.serve import Served, run  # noqa: PLC0415
    layers = args.layers or SHAPES[args.shape]["num_layers"]
    t0 = time.perf_counter()
    model = build_model(args.shape, layers, not args.dense, impl=args.impl)
    print(f"built {args.shape} ({layers} layers, {'dense' if args.dense else 'packed 50 %'}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    engine = Engine(model, max_len=args.max_len, max_batch=args.max_batch, max_queue=args.max_queue, mode=args.decode,
                    prefill_batch=args.prefill_batch)
    secs = engine.warmup()
    print(f"warmup: {len(engine.prefill_shapes())} prefill shapes (up to {engine.prefill_batch} prompts a call) "
          f"and the decode step compiled in {secs:.1f} s", file=sys.stderr, flush=True)
    run(Served(engine, None, f"{args.shape}-{'dense' if args.dense else 'packed'}"), "127.0.0.1", args.port)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="converted model directory")
    src.add_argument("--shape", help="random-weight model of a bench_e2e shape (e.g. mixtral-8x7b)")
    ap.add_argument("--dense", action="store_true", help="--shape: uncompressed experts")
    ap.add_argument("--layers", type=int, help="--shape: layer count (default: the shape's)")
    ap.add_argument("--impl", default="auto", choices=IMPL_CHOICES, help=IMPL_HELP)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--max-requests", type=int, default=256, help="requests per concurrency level at most")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--decode", default="auto", choices=("auto", "batched", "exact"))
    ap.add_argument("--prefill-batch", type=int, help="the server's --prefill-batch (default: its own)")
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        serve_random(args)
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.prompt_len + args.max_tokens > args.max_len:
        ap.error("--prompt-len + --max-tokens must fit --max-len")
    import httpx  # noqa: PLC0415
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
              "--max-len", str(args.max_len), "--decode", args.decode, "--impl", args.impl]
    common += ["--prefill-batch", str(args.prefill_batch)] if args.prefill_batch else []
    if args.model:
        cmd = [sys.executable, "-m", "puzzlemoe_jax.serve", "--model", args.model] + common
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_serve", "--shape", args.shape] + common + (
            ["--dense"] if args.dense else []) + (["--layers", str(args.layers)] if args.layers else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        while True:
            if proc.poll() is not None:
                print(f"error: the server exited with {proc.returncode}", file=sys.stderr)
                return 1
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.TransportError:
                if time.perf_counter() - t0 > args.start_timeout:
                    print("error: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        startup = time.perf_counter() - t0
        vocab = 256
        if args.shape:
            sys.path.insert(0, str(HERE))
            from bench_e2e import SHAPES  # noqa: PLC0415
            vocab = SHAPES[args.shape]["vocab_size"]
        elif args.model:
            vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        rows = []
        for c in levels:
            rows.append(asyncio.run(_level(url, c, args, vocab)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        metrics = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\n{args.model or args.shape} on {health['device']}, decode {health['decode']}, "
          f"{args.max_batch} slots, prompt {args.prompt_len} + {args.max_tokens} new tokens, "
          f"server start (load + warmup) {startup:.1f} s, compiled {metrics['compiled']}")
    print(table(rows))
    if args.json:
        sys.path.insert(0, str(HERE))
        res = {"command": " ".join(sys.argv), "model": args.model or args.shape, "health": metrics,
               "startup_s": startup, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
