"""Peer baseline: an uncompressed MoE layer step in PyTorch (cuBLAS), the way a PyTorch serving user
runs it, timed as CUDA-graph replays between CUDA events (median of ``--iters``).

Variants (bf16, SwiGLU experts, weights ``[E, H, 2I]`` (gate and up fused) and ``[E, I, H]``):

* loop: for each expert with tokens, ``x_e @ W13[e]``, ``silu * mul``, ``@ W2[e]``, ``index_add`` into
  the output (only routed experts' weights are read; what HF / vLLM-eager do);
* grouped: ``torch._grouped_mm`` over the tokens sorted by expert (one launch per matrix), where
  this torch has it.

The routing is a static plan, as a graph-captured serving step would hold after its routing kernel.
``routing`` (numpy only) is the one the JAX layer benchmark draws too, so both see the same tokens.
Runs where torch and a CUDA GPU exist (``bench_moe_layer.py --peer`` starts it as a subprocess).

    python3 benchmarks/peer_torch.py --tokens 1,4,16 --shape 8,4096,14336,2 --out $OUT/peer.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def routing(rng, T: int, E: int, H: int, k: int, skew: float = 0.0, pool: np.ndarray | None = None):
    """(x [T, H] f32, ids [T, k], weights [T, k] softmax over the selected logits) from ``rng``.
    ``pool`` ([n, k] expert ids, ``load_routing_pool``): the ids of T distinct rows of it instead of
    random logits' top-k (a trained router's loads), with random softmax weights."""
    x = rng.standard_normal((T, H))
    if pool is not None:
        ids = pool[rng.choice(pool.shape[0], T, replace=False)]
        sel = rng.standard_normal((T, k))
    else:
        logits = rng.standard_normal((T, E)) + skew * np.linspace(1, -1, E)
        ids = np.argsort(-logits, 1)[:, :k]
        sel = np.take_along_axis(logits, ids, 1)
    return x, ids, np.exp(sel) / np.exp(sel).sum(1, keepdims=True)


def load_routing_pool(path: str | None, layer: int, E: int, k: int) -> np.ndarray | None:
    """One layer's top-k ids from ``benchmarks/routing_spill.py --save-ids`` (None without a path),
    checked against the benchmarked layer's E experts and top-k."""
    if not path:
        return None
    try:
        with np.load(path) as f:
            ids = f[f"layer{layer}"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {path}: no routing ids for layer {layer} ({type(e).__name__}: {e})", file=sys.stderr)
        raise SystemExit(2) from None
    if ids.ndim != 2 or ids.shape[1] != k or ids.min() < 0 or ids.max() >= E:
        print(f"error: {path} layer{layer}: expected [tokens, {k}] expert ids in [0, {E}), "
              f"got shape {ids.shape}, ids {ids.min()}..{ids.max()}", file=sys.stderr)
        raise SystemExit(2)
    return ids.astype(np.int64)


def graph_time(torch, fn, iters: int) -> tuple[float, float]:
    """(median ms, min ms) of CUDA-graph replays of ``fn`` between CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2], times[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--skew", type=float, default=0.0)
    ap.add_argument("--shape", default="8,4096,14336,2", help="E,H,I,topk")
    ap.add_argument("--routing-ids", help="routing_spill.py --save-ids file: draw each T's ids from it")
    ap.add_argument("--routing-layer", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import torch  # noqa: PLC0415 (only on the GPU machine)
    import torch.nn.functional as F  # noqa: PLC0415, N812
    E, H, I, k = (int(v) for v in a.shape.split(","))
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = (0.02 * torch.randn(E, H, 2 * I, device=dev, generator=g)).to(torch.bfloat16)
    w2 = (0.02 * torch.randn(E, I, H, device=dev, generator=g)).to(torch.bfloat16)
    dense_bytes = (w13.numel() + w2.numel()) * 2
    pool = load_routing_pool(a.routing_ids, a.routing_layer, E, k)
    rng = np.random.default_rng(a.seed)
    rows = []
    for T in [int(t) for t in a.tokens.split(",")]:
        x_np, ids_np, tw_np = routing(rng, T, E, H, k, a.skew, pool)
        x = torch.tensor(x_np, device=dev, dtype=torch.bfloat16)
        ids = torch.tensor(ids_np, device=dev)
        tw = torch.tensor(tw_np, device=dev, dtype=torch.float32)
        active = sorted(set(ids_np.ravel().tolist()))
        plan = []
        for e in active:
            tok, slot = (ids == e).nonzero(as_tuple=True)
            plan.append((e, tok, tw[tok, slot].to(torch.bfloat16)[:, None]))

        def loop():
            out = torch.zeros(T, H, device=dev, dtype=torch.bfloat16)
            for e, tok, wt in plan:
                h = x[tok] @ w13[e]
                h = F.silu(h[:, :I]) * h[:, I:]
                out.index_add_(0, tok, (h @ w2[e]) * wt)
            return out

        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        xs, tok_of = x[order // k], order // k
        wts = tw.reshape(-1)[order].to(torch.bfloat16)[:, None]

        def grouped():
            h = torch._grouped_mm(xs, w13, offs=offs)
            h = F.silu(h[:, :I]) * h[:, I:]
            y = torch._grouped_mm(h, w2, offs=offs) * wts
            out = torch.zeros(T, H, device=dev, dtype=torch.bfloat16)
            out.index_add_(0, tok_of, y)
            return out

        # f32 reference of the same layer, for the error of each variant
        ref = torch.zeros(T, H, device=dev, dtype=torch.float32)
        for e, tok, wt in plan:
            h = x[tok].float() @ w13[e].float()
            ref.index_add_(0, tok, ((F.silu(h[:, :I]) * h[:, I:]) @ w2[e].float()) * wt.float())
        row = dict(T=T, active_experts=len(active), bytes_active=int(dense_bytes * len(active) / E))
        variants = [("loop", loop)] + ([("grouped", grouped)] if hasattr(torch, "_grouped_mm") else [])
        for name, fn in variants:
            try:
                out = fn().float()
                err = float((out - ref).norm() / ref.norm())
                ms, min_ms = graph_time(torch, fn, a.iters)
                row[name] = dict(ms=ms, min_ms=min_ms, err=err, finite=bool(torch.isfinite(out).all()),
                                 read_GBps=row["bytes_active"] / ms / 1e6)
            except Exception as ex:  # noqa: BLE001 (a variant this torch cannot run is recorded)
                row[name] = dict(error=repr(ex)[:300])
        print(json.dumps(row), flush=True)
        rows.append(row)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=dict(E=E, H=H, I=I, topk=k),
               seed=a.seed, skew=a.skew, dense_bytes=dense_bytes, rows=rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
