"""End-to-end generation throughput and peak GPU memory: packed (PuzzleMoE, 50 %) vs uncompressed.

    python benchmarks/bench_e2e.py [--shape mixtral-8x7b] [--batches 1,4,16,64] [--prefill 16]
        [--decode 128] [--packed-layers 32] [--dense-layers auto] [--budget-s 420] [--json OUT]
        [--impl auto] [--configs dense,packed-all] [--compile-cache DIR]
        [--meshes 1x1,2x1] [--concurrent-single] [--profile] [--timeline] [--routing-stats]

A Mixtral-8x7B-shaped model (bf16) is built directly on the device with random weights
(normal, std 0.02; RMSNorm scales 1), not read from disk.  Packed layers: ``compress.compress_layer``
runs once (ratio 0.5: 4 pairs of 8 experts) on one layer of random experts; every other layer's
words are that layer's words rolled along the output axis by the layer index (distinct buffers with
the statistics of real merged words, without 32 merges).  Both models run the same stack:
``puzzlemoe_jax.generate`` (jit prefill, then one jit ``while_loop`` over the decode steps);
both models serve their MoE layers with ``--impl`` (``kernels.IMPL_CHOICES``; "auto": the Mosaic
kernels on Hopper, the Triton ones on other GPUs, for packed pairs and for uncompressed experts
alike); ``--configs dense-xla`` adds the uncompressed model on XLA ``ragged_dot`` (impl
"reference"); both prefill the whole prompt in one step.  ``compile s``: wall clock of the first
prefill + decode call at that batch size (tracing, compilation, first run; no persistent
compilation cache unless ``--compile-cache DIR``).

Each configuration runs in its own subprocess (peak memory is per process).  Timing: wall clock
of the prefill call and of the whole decode loop (one dispatch for all steps), each
``block_until_ready``, median of ``--reps`` after a compile run.  tokens/s end to end =
batch * decode / (prefill + decode loop); decode-only = batch * (decode - 1) / loop time (the
first new token comes from the prefill).  The uncompressed model gets as many layers as fit
(``--dense-layers auto``); the packed model runs at that same layer count (per-layer-normalised
comparison) and with all layers.

Several GPUs (``--meshes``, e.g. ``1x1,2x1``: ("expert", "model") mesh shapes): each array is
placed as ``sharding.shard_model`` places it while the model is built, and the MoE layers run
expert parallel under ``shard_map`` (packed pairs with the Pallas kernel on each GPU, one psum);
memory is reported per GPU and tokens/s compared with the 1x1 run of the same model.
While the workers run, ``nvidia-smi`` samples the first GPU's SM clock, board power and power-cap state
(``common.GpuSampler``); each run reports their means over its timed repetitions and the energy per
generated token (mean power x step time / batch), so a speed-up can be read against the clock it ran at.
``--concurrent-single`` runs the 1x1 configurations side by side, one per GPU (separate processes
and GPUs; only the host is shared), to save device time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import IMPL_CHOICES, IMPL_HELP  # noqa: E402

SHAPES = {  # vocab, hidden, layers, heads, kv heads, head_dim, expert intermediate, experts, top_k, theta
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, intermediate_size=14336, num_experts=8, top_k=2, rope_theta=1e6),
    "tiny": dict(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=512, num_experts=8, top_k=2, rope_theta=1e6),
    "small": dict(vocab_size=1024, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128,
                  intermediate_size=2048, num_experts=8, top_k=2, rope_theta=1e6),
}
GiB = 2 ** 30


def model_config(shape: str, layers: int):
    from puzzlemoe_jax.config import ModelConfig  # noqa: PLC0415
    s = dict(SHAPES[shape])
    s["num_layers"] = layers
    return ModelConfig(model_type="mixtral", moe_intermediate_size=s["intermediate_size"],
                       moe_layers=tuple(range(layers)), norm_topk_prob=True, rms_norm_eps=1e-5, **s)


def parse_mesh(text: str) -> tuple[int, int]:
    e, m = (int(v) for v in text.lower().split("x"))
    return e, m


def build_model(shape: str, layers: int, packed: bool, impl: str = "auto", seed: int = 0, mesh=None):
    """Random-weight CausalLM built on the default device, layer by layer (see module docstring);
    with ``mesh``, each array is moved to its ``sharding.partition_spec`` place as it is made."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from puzzlemoe_jax import compress, pairing  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from puzzlemoe_jax.models import CausalLM  # noqa: PLC0415
    from puzzlemoe_jax.sharding import partition_spec, shard_model  # noqa: PLC0415

    cfg = model_config(shape, layers)
    e = cfg.num_experts
    n_pairs = pairing.pairs_for_ratio(e, 0.5) if packed else 0
    dtype = jnp.bfloat16
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, packed_pairs={i: n_pairs for i in range(layers)}
                                               if packed else None, impl=impl))
    graphdef, state = nnx.split(abstract)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, dt):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)

    words0 = pairs0 = None
    if packed:
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        k = jax.random.split(jax.random.key(seed + 1000), 3)
        w = {"w_gate": draw(k[0], (e, h, i), dtype), "w_up": draw(k[1], (e, h, i), dtype),
             "w_down": draw(k[2], (e, i, h), dtype)}
        pe, _ = compress.compress_layer(w, 0.5)
        words0, pairs0 = dict(pe.packed), pe
        del w
    roll = jax.jit(lambda a, s: jnp.roll(a, s, axis=-1))
    flat = []
    key = jax.random.key(seed)
    for n, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = ".".join(map(str, path))
        want = var.get_value()
        leaf = path[-1]
        if leaf == "scale":
            a = jnp.ones(want.shape, want.dtype)
        elif leaf.startswith("packed_"):
            layer = int(path[1])
            a = roll(words0[leaf[len("packed_"):]], jnp.int32(layer))
        elif leaf == "pairs":
            a = jnp.asarray(pairs0.pairs, jnp.int32)
        elif leaf in ("dense_ids", "dropped_ids"):
            a = jnp.zeros(want.shape, jnp.int32)
        elif leaf.startswith("dense_") and want.shape[0] == 0:
            a = jnp.zeros(want.shape, want.dtype)
        else:
            a = draw(jax.random.fold_in(key, n), want.shape, want.dtype)
        assert a.shape == want.shape and a.dtype == want.dtype, (name, a.shape, want.shape, a.dtype, want.dtype)
        if mesh is not None:
            spec = partition_spec(path, a.shape, mesh, cfg.num_heads, cfg.num_kv_heads)
            a = jax.device_put(a, NamedSharding(mesh, spec))
        a.block_until_ready()
        flat.append((path, a))
    del words0
    state = nnx.from_flat_state(flat)
    model = nnx.merge(graphdef, state)
    del state, flat   # (use_mosaic frees each layer's [K, N] words as it replaces them)
    if mesh is not None and mesh.size > 1:
        return shard_model(model, mesh, impl=impl)   # ("auto": Triton on a mesh)
    model.set_impl(impl)   # (Mosaic: re-lays the packed words out, layer by layer)
    return model


def _mem(dev):
    m = dev.memory_stats() or {}
    return {k: m.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def _mems():
    import jax  # noqa: PLC0415
    return [_mem(d) for d in jax.devices()]


def _mesh(args):
    from puzzlemoe_jax.sharding import make_mesh  # noqa: PLC0415
    e, m = parse_mesh(args.mesh)
    return make_mesh(e, m) if e * m > 1 else None


def worker(args) -> dict:
    """One configuration in this process: build, then generation at each batch size."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from puzzlemoe_jax.generate import Generator, prepare_batch  # noqa: PLC0415
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "shape": args.shape, "layers": args.layers, "packed": args.packed,
           "impl": args.impl, "prefill": args.prefill, "decode": args.decode, "jax": jax.__version__,
           "mesh": args.mesh, "gpus": jax.device_count(), "runs": []}
    try:
        mesh = _mesh(args)
        t0 = time.perf_counter()
        model = build_model(args.shape, args.layers, args.packed, args.impl, mesh=mesh)
        res["build_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (out of memory while building: reported, parent retries)
        res["error"] = f"build: {type(e).__name__}: {str(e)[:300]}"
        return res
    res["after_build"] = _mems()
    from flax import nnx  # noqa: PLC0415
    res["weights_bytes"] = sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(model)))
    gen = Generator(model)
    compile_events = {}   # jax's compile-stage durations (trace, lower to MLIR, backend compile), summed

    def on_event(name, secs, **_):
        if name.startswith("/jax/core/compile/"):
            key = name.rsplit("/", 1)[-1].removesuffix("_duration")
            compile_events[key] = compile_events.get(key, 0.0) + secs
    jax.monitoring.register_event_duration_secs_listener(on_event)
    rng = np.random.default_rng(0)
    cfg = model.config
    for b in args.batches:
        left = args.budget_s - (time.perf_counter() - t_start)
        if res["runs"] and left < args.min_left_s:
            res["runs"].append({"batch": b, "skipped": f"time budget ({left:.0f} s left)"})
            continue
        prompts = rng.integers(1, cfg.vocab_size, (b, args.prefill)).tolist()
        batch = prepare_batch(prompts, args.decode, cfg.vocab_size)
        chunk = args.decode_chunks[0]
        run = {"batch": b, "decode_chunk": chunk}
        try:
            compile_events.clear()
            t0 = time.perf_counter()
            first, cache, ok = gen.prefill(batch, args.decode)
            out, steps, ok2, cache = gen.decode(batch, first, cache, args.decode, chunk=chunk)
            jax.block_until_ready(out)
            run["compile_and_first_s"] = time.perf_counter() - t0
            run["compile_stages_s"] = dict(compile_events)
            pre, dec = [], []
            run["timed_unix_s"] = [time.time()]   # (to line up with a clock / power log)
            for _ in range(args.reps):
                t0 = time.perf_counter()
                first, cache, ok = gen.prefill(batch, args.decode)
                jax.block_until_ready((first, cache))
                t1 = time.perf_counter()
                out, steps, ok2, cache = gen.decode(batch, first, cache, args.decode, chunk=chunk)
                jax.block_until_ready(out)
                t2 = time.perf_counter()
                pre.append(t1 - t0)
                dec.append(t2 - t1)
                del cache
            run["timed_unix_s"].append(time.time())
            for other in args.decode_chunks[1:]:   # the same decode with another stop-check interval
                first, cache, _ = gen.prefill(batch, args.decode)
                t0 = time.perf_counter()
                jax.block_until_ready(gen.decode(batch, first, cache, args.decode, chunk=other)[0])
                first_s, times = time.perf_counter() - t0, []
                for _ in range(args.reps):
                    first, cache, _ = gen.prefill(batch, args.decode)
                    jax.block_until_ready(cache)
                    t0 = time.perf_counter()
                    jax.block_until_ready(gen.decode(batch, first, cache, args.decode, chunk=other)[0])
                    times.append(time.perf_counter() - t0)
                d = statistics.median(times)
                run.setdefault("other_chunks", []).append(
                    {"decode_chunk": other, "compile_and_first_s": first_s, "decode_loop_s": d,
                     "ms_per_step": 1e3 * d / (args.decode - 1)})
            if args.compare_prefill_chunk:   # the same prefill in chunks of <= N tokens a step
                pchunk = max(1, args.compare_prefill_chunk // b)
                first_c, cache, ok_c = gen.prefill(batch, args.decode, chunk=pchunk)
                jax.block_until_ready((first_c, cache))
                del cache
                chunked = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    first_c, cache, ok_c = gen.prefill(batch, args.decode, chunk=pchunk)
                    jax.block_until_ready((first_c, cache))
                    chunked.append(time.perf_counter() - t0)
                    del cache
                run.update(prefill_chunk_slots=pchunk, prefill_chunked_s=statistics.median(chunked),
                           prefill_chunked_same_first_token=bool((np.asarray(first_c) == np.asarray(first)).all()))
                ok = ok & ok_c
            if args.profile:   # where a decode step's device time goes, kernels summed by name
                from common import cupti_time  # noqa: PLC0415
                from puzzlemoe_jax.generate import DECODE_STATIC, decode_steps  # noqa: PLC0415
                first, cache, _ = gen.prefill(batch, args.decode)
                # the cache is not donated here: every timed iteration reads the same one
                step = functools.partial(jax.jit(decode_steps, static_argnames=DECODE_STATIC), gen.graphdef,
                                         max_new=args.decode, greedy=True, chunk=chunk)
                one = jnp.float32(1.0)
                # the weights are an argument: a closure would make them constants of the measured jit
                _, ms, _, per = cupti_time(step, (gen.state, first, cache, batch.valid, batch.next_pos,
                                                  jnp.asarray([-1], jnp.int32), jax.random.key(1), one, one),
                                           iterations=2, by_kernel=True)
                del cache
                n = args.decode - 1
                top = sorted(per.items(), key=lambda kv: -kv[1])[:30]
                run["profile"] = {"steps": n, "device_ms_per_step": ms / n,
                                  "kernels_us_per_step": {k: round(1e3 * v / n, 2) for k, v in top}}
            if args.timeline:  # when the GPU idles during one decode call, as the user calls it
                from common import device_timeline  # noqa: PLC0415
                first, cache, _ = gen.prefill(batch, args.decode)
                jax.block_until_ready(cache)
                _, run["timeline"] = device_timeline(lambda: gen.decode(batch, first, cache, args.decode, chunk=chunk), ())
                del cache
            if args.routing_stats:
                run["routing"] = routing_stats(model, np.asarray(batch.ids), np.asarray(out), args.prefill)
            finite = bool(ok) and bool(ok2)
            assert int(steps) == args.decode, int(steps)
            p, d = statistics.median(pre), statistics.median(dec)
            run.update(prefill_s=p, decode_loop_s=d, prefill_runs=pre, decode_runs=dec, finite=finite,
                       tokens_per_s=b * args.decode / (p + d), decode_tokens_per_s=b * (args.decode - 1) / d,
                       ms_per_step=1e3 * d / (args.decode - 1), sample=np.asarray(out)[0, :8].tolist())
            if not finite:
                run["error"] = "non-finite logits"
        except Exception as e:  # noqa: BLE001
            run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        run["mem"] = _mems()
        res["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k not in ("prefill_runs", "decode_runs")}), flush=True)
    res["peak_bytes_per_gpu"] = [m["peak_bytes_in_use"] for m in _mems()]
    res["peak_bytes_in_use"] = max(res["peak_bytes_per_gpu"], key=lambda v: v or 0)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def routing_stats(model, prompt_ids, new_ids, prefill: int) -> dict:
    """How the decode steps' tokens spread over the experts, per layer, from one forward pass over the
    prompts and the generated tokens (the decode inputs are positions ``prefill ..``): the most rows
    any expert got in a step, and for a packed layer the grouped kernel's tiles (a pair side with more
    rows than the token block costs its pair another tile, which streams the pair's words again, unless
    ``mosaic_ffn.absorb_spills`` takes it) against the pairs that had rows."""
    import numpy as np  # noqa: PLC0415
    from kernels.mosaic_ffn import absorbs_spills, grouped_block_m, layer_configs  # noqa: PLC0415
    from puzzlemoe_jax import calibrate  # noqa: PLC0415
    from puzzlemoe_jax.models import PackedExpertsModule  # noqa: PLC0415
    seq = np.concatenate([prompt_ids, new_ids[:, :-1]], 1)
    b, cfg = seq.shape[0], model.config
    layers = model.moe_layers()
    ids_by_layer = {i: [] for i in layers}
    # a few sequences a pass: the uncompressed model leaves little memory beside its weights
    for _, routed in calibrate.routed_batches(model, seq, 8):
        for i in layers:
            ids_by_layer[i].append(np.asarray(routed[i][1]).reshape(-1, seq.shape[1], cfg.top_k))
    block = grouped_block_m(b * cfg.top_k, cfg.num_experts, b)
    out = {"block_m": block, "steps": seq.shape[1] - prefill, "layers": {}}
    for i, m in layers.items():
        ids = np.concatenate(ids_by_layer[i])[:, prefill:]                                # [B, steps, k]
        counts = np.stack([np.bincount(ids[:, t].ravel(), minlength=cfg.num_experts)
                           for t in range(ids.shape[1])])                                  # [steps, E]
        row = {"max_rows_mean": float(counts.max(1).mean()), "max_rows_max": int(counts.max()),
               "experts_touched_mean": float((counts > 0).sum(1).mean())}
        if isinstance(m.experts, PackedExpertsModule):
            pairs = np.asarray(m.experts.pairs[...])
            n_i, n_j = counts[:, pairs[:, 0]], counts[:, pairs[:, 1]]
            per_pair = np.maximum(-(-n_i // block), -(-n_j // block))
            if absorbs_spills(block, *layer_configs(block, b * cfg.top_k, len(pairs), cfg.hidden_size,
                                                    cfg.moe_intermediate_size)):
                # as absorb_spills: one side two blocks long, the other at most one -> one tile
                per_pair = np.where((per_pair == 2) & (np.minimum(-(-n_i // block), -(-n_j // block)) <= 1), 1, per_pair)
            tiles = per_pair.sum(1)
            live = ((n_i + n_j) > 0).sum(1)
            row.update(tiles_mean=float(tiles.mean()), live_pairs_mean=float(live.mean()),
                       steps_with_extra_tiles=float((tiles > live).mean()))
        out["layers"][i] = row
    rows = list(out["layers"].values())
    out["summary"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def check(args) -> dict:
    """Correctness on the device: packed model, Pallas kernel path vs reference path (fresh random data)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from puzzlemoe_jax.generate import generate  # noqa: PLC0415
    from puzzlemoe_jax.models import forward  # noqa: PLC0415
    shape = args.check_shape
    mesh = _mesh(args)
    ids = jnp.asarray(np.random.default_rng(7).integers(1, SHAPES[shape]["vocab_size"], (4, 12)), jnp.int32)
    model = build_model(shape, SHAPES[shape]["num_layers"], True, "reference", seed=7)   # one device
    lr = np.asarray(forward(model, ids), np.float32)
    gr = generate(model, ids.tolist(), 16)
    model = build_model(shape, SHAPES[shape]["num_layers"], True, args.impl, seed=7, mesh=mesh)
    lp = np.asarray(forward(model, ids), np.float32)
    gp = generate(model, ids.tolist(), 16)
    agree = float(np.mean([a == b for x, y in zip(gp, gr) for a, b in zip(x, y)]))
    scale = float(np.abs(lr).max())
    res = {"shape": shape, "device": jax.devices()[0].device_kind, "mesh": args.mesh,
           "what": "Pallas kernel path (on the mesh) vs reference path on one device",
           "finite": bool(np.isfinite(lp).all()),
           "max_abs_logit_diff": float(np.abs(lp - lr).max()), "max_abs_logit": scale,
           "greedy_token_agreement": agree, "pallas_tokens_row0": gp[0], "reference_tokens_row0": gr[0]}
    res["ok"] = res["finite"] and res["max_abs_logit_diff"] <= 0.05 * max(scale, 1.0)
    return res


def _spawn(argv, env, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, f"timeout after {timeout:.0f} s; stdout tail: {(e.stdout or '')[-500:] if isinstance(e.stdout, str) else ''}"
    sys.stdout.write("".join(ln + "\n" for ln in p.stdout.splitlines() if not ln.startswith("RESULT ")))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return None, f"rc {p.returncode}: {p.stderr[-1500:]}"
    return json.loads(lines[-1][len("RESULT "):]), None


def dense_fit(shape: str, limit_bytes: int, headroom: float) -> int:
    s = SHAPES[shape]
    h, i, e = s["hidden_size"], s["intermediate_size"], s["num_experts"]
    attn = h * (s["num_heads"] + 2 * s["num_kv_heads"]) * s["head_dim"] + s["num_heads"] * s["head_dim"] * h
    per_layer = 2 * (3 * e * h * i + attn + h * e + 2 * h)
    fixed = 2 * (2 * s["vocab_size"] * h + h)
    return max(1, min(s["num_layers"], int((limit_bytes - headroom - fixed) // per_layer)))


def _gib(x):
    return "n/a" if x is None else f"{x / GiB:.2f}"


def _name(r) -> str:
    return ("packed 50 %" if r["packed"] else "uncompressed") + f" ({r.get('impl', 'auto')})" + (
        f" @{r['mesh']}" if r.get("mesh", "1x1") != "1x1" else "")


def _per_gpu(r) -> str:
    per = r.get("peak_bytes_per_gpu") or [r.get("peak_bytes_in_use")]
    return " / ".join(_gib(v) for v in per)


def _stages(run) -> str:
    st = run.get("compile_stages_s", {})
    return " / ".join(f"{st[k]:.1f}" if k in st else "-" for k in
                      ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile"))


def table(results) -> str:
    rows = ["| model | layers | batch | compile s (trace / lower / backend) | prefill s | decode loop s | ms/step | tok/s e2e | "
            "tok/s decode | weights GiB | peak GiB per GPU | GPU 0 SM MHz / W / power-capped | J per token |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = _name(r)
        if r.get("error"):
            rows.append(f"| {name} | {r['layers']} | - | {r['error'][:80]} | | | | | | |")
            continue
        for run in r["runs"]:
            if "tokens_per_s" not in run:
                rows.append(f"| {name} | {r['layers']} | {run['batch']} | {run.get('skipped') or run.get('error', '')[:80]} | | | | | | |")
                continue
            rows.append(f"| {name} | {r['layers']} | {run['batch']} | {run['compile_and_first_s']:.1f} ({_stages(run)}) | {run['prefill_s']:.3f} | {run['decode_loop_s']:.3f} | "
                        f"{run['ms_per_step']:.2f} | {run['tokens_per_s']:.1f} | {run['decode_tokens_per_s']:.1f} | "
                        f"{r['weights_bytes'] / GiB:.2f} | {_per_gpu(r)} | {_power(run)} |")
    return "\n".join(rows)


def _power(run) -> str:
    g = run.get("gpu0") or {}
    if not g.get("samples"):
        return "- | -"
    return (f"{g['sm_mhz']:.0f} / {g['power_w']:.0f} / {100 * g['power_capped']:.0f} % | "
            f"{run['joules_per_token']:.3f}")


def _runs(results) -> dict:
    by = {}
    for r in results:
        for run in r.get("runs", []):
            if "tokens_per_s" in run:
                by[(r.get("mesh", "1x1"), r["packed"], r["layers"], run["batch"], r.get("impl", "auto"))] = run
    return by


def speedups(results) -> str:
    """Packed over the best uncompressed run (by decode tok/s), same mesh, same layer count; and
    compile + first call of each over the uncompressed one's."""
    by = _runs(results)
    rows = ["| mesh | layers (both) | batch | packed tok/s decode | best uncompressed tok/s decode (impl) | speed-up e2e | "
            "speed-up decode | compile s packed / uncompressed |", "|---|---|---|---|---|---|---|---|"]
    for (mesh, packed, layers, b, impl), run in sorted(by.items()):
        dense = [(d, i) for (m, p, lay, bb, i), d in by.items() if (m, p, lay, bb) == (mesh, False, layers, b)]
        if not packed or not dense:
            continue
        d, di = max(dense, key=lambda di: di[0]["decode_tokens_per_s"])
        rows.append(f"| {mesh} | {layers} | {b} | {run['decode_tokens_per_s']:.1f} ({impl}) | {d['decode_tokens_per_s']:.1f} "
                    f"({di}) | {run['tokens_per_s'] / d['tokens_per_s']:.2f}x | "
                    f"{run['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x | "
                    f"{run['compile_and_first_s']:.0f} / {d['compile_and_first_s']:.0f} "
                    f"({run['compile_and_first_s'] / d['compile_and_first_s']:.2f}x) |")
    return "\n".join(rows)


def scaling(results) -> str:
    """Each model on a mesh over the same model on one GPU (decode tokens/s)."""
    by = _runs(results)
    rows = ["| model | mesh | layers | batch | tok/s decode | tok/s decode 1 GPU | scaling |", "|---|---|---|---|---|---|---|"]
    for (mesh, packed, layers, b, impl), run in sorted(by.items()):
        one = by.get(("1x1", packed, layers, b, impl))
        if mesh == "1x1" or one is None:
            continue
        rows.append(f"| {'packed 50 %' if packed else 'uncompressed'} | {mesh} | {layers} | {b} | "
                    f"{run['decode_tokens_per_s']:.1f} | {one['decode_tokens_per_s']:.1f} | "
                    f"{run['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}x |")
    return "\n".join(rows) if len(rows) > 2 else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="mixtral-8x7b")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--packed-layers", type=int, help="default: all layers of the shape")
    ap.add_argument("--dense-layers", default="auto", help="'auto': as many as fit on one GPU, or a number")
    ap.add_argument("--headroom-gib", type=float, default=5.0, help="kept free when fitting dense layers")
    ap.add_argument("--configs", default="dense,packed-same,packed-all",
                    help="which runs, in order: dense, dense-xla (uncompressed on ragged_dot), packed-same, packed-all")
    ap.add_argument("--impl", default="auto", choices=IMPL_CHOICES, help=IMPL_HELP)
    ap.add_argument("--compile-cache", metavar="DIR",
                    help="JAX persistent compilation cache for the workers (default: none, cold compiles)")
    ap.add_argument("--meshes", default="1x1", help="(expert x model) meshes to run every configuration on, e.g. 1x1,2x1")
    ap.add_argument("--concurrent-single", action="store_true",
                    help="run the 1x1 configurations at the same time, one per GPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total seconds for all configurations")
    ap.add_argument("--check", action="store_true",
                    help="first: Pallas (on the largest mesh) vs one-device reference check of a small packed model")
    ap.add_argument("--check-shape", default="small", choices=SHAPES)
    ap.add_argument("--json")
    ap.add_argument("--compare-prefill-chunk", type=int, default=0, metavar="TOKENS",
                    help="also time the prefill in chunks of <= TOKENS tokens a step (packed models' default "
                         "before 2026-11-24: 256)")
    ap.add_argument("--profile", action="store_true",
                    help="also run the decode loop under CUPTI at each batch: device ms per step and the kernels' "
                         "time per step by name (JSON 'profile')")
    ap.add_argument("--timeline", action="store_true",
                    help="also trace one decode call at each batch (jax.profiler): the GPU's busy time, its idle "
                         "time before, between and after the kernels, the longest gaps (JSON 'timeline')")
    ap.add_argument("--decode-chunks", default="", help="decode steps between stop checks (generate.Generator.decode's "
                    "chunk; default its default); more than one: each timed in the same worker (JSON 'other_chunks')")
    ap.add_argument("--routing-stats", action="store_true",
                    help="also count, per layer, how the decode steps' tokens spread over the experts and the "
                         "grouped kernel's tiles for them (one forward pass; JSON 'routing')")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", default="1x1", help=argparse.SUPPRESS)
    ap.add_argument("--min-left-s", type=float, default=45.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    from puzzlemoe_jax.generate import DECODE_CHUNK  # noqa: PLC0415
    args.decode_chunks = [int(c) for c in str(args.decode_chunks).split(",") if c] or [DECODE_CHUNK]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.worker_check:
        print("RESULT " + json.dumps(check(args)), flush=True)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    meshes = [m.strip().lower() for m in args.meshes.split(",") if m.strip()]
    for m in meshes:
        parse_mesh(m)
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "results": [], "not_run": []}
    if args.check:
        big = max(meshes, key=lambda m: math.prod(parse_mesh(m)))
        res, err = _spawn(["--worker-check", "--check-shape", args.check_shape, "--mesh", big], env, max(60.0, left()))
        out["check"] = res or {"error": err}
        print("CHECK", json.dumps(out["check"]), flush=True)
    base = ["--shape", args.shape, "--batches", ",".join(map(str, args.batches)), "--prefill", str(args.prefill),
            "--decode", str(args.decode), "--reps", str(args.reps), "--compare-prefill-chunk", str(args.compare_prefill_chunk),
            *(["--profile"] if args.profile else []), *(["--timeline"] if args.timeline else []),
            *(["--routing-stats"] if args.routing_stats else []),
            "--decode-chunks", ",".join(map(str, args.decode_chunks))]
    all_layers = args.packed_layers or SHAPES[args.shape]["num_layers"]
    import jax  # noqa: PLC0415 (only the device count and bytes limit; workers use their own processes)
    n_gpus = jax.device_count()
    if args.dense_layers == "auto":
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit is None:
            dense_layers = all_layers
        else:  # this process holds no arrays: the limit is what a worker gets under the same env
            dense_layers = min(all_layers, dense_fit(args.shape, limit, args.headroom_gib * GiB))
        out["bytes_limit_parent"] = limit
    else:
        dense_layers = int(args.dense_layers)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    jobs = []   # (mesh, config name, layers, packed)
    for mesh in meshes:
        for c in configs:
            layers, packed = {"dense": (dense_layers, False), "dense-xla": (dense_layers, False),
                              "packed-same": (dense_layers, True), "packed-all": (all_layers, True)}[c]
            if c == "packed-same" and layers == all_layers and "packed-all" in configs:
                continue
            jobs.append((mesh, c, layers, packed))
    if args.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache
    groups = []   # jobs run together (concurrent 1x1 runs, one per GPU) or alone
    single = [j for j in jobs if j[0] == "1x1"]
    if args.concurrent_single and len(single) > 1 and n_gpus >= len(single):
        groups.append(single)
        groups += [[j] for j in jobs if j[0] != "1x1"]
    else:
        groups = [[j] for j in jobs]

    def run_job(job, share, gpu):
        mesh, c, layers, packed = job
        argv = base + ["--worker", "--layers", str(layers), "--mesh", mesh, "--budget-s", str(share - 15),
                       "--impl", "reference" if c == "dense-xla" else args.impl] + (["--packed"] if packed else [])
        job_env = dict(env)
        if gpu is not None:
            job_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        res, err = _spawn(argv, job_env, share + 60)
        return res or {"layers": layers, "packed": packed, "mesh": mesh, "error": err, "runs": []}

    from common import GpuSampler  # noqa: PLC0415
    with GpuSampler() as gpu:   # the first GPU's clock and power while the workers run
        for i, group in enumerate(groups):
            share = left() / (len(groups) - i)
            if share < 60:
                out["not_run"] += [f"{c} ({layers} layers, mesh {mesh}): time budget" for mesh, c, layers, _ in group]
                continue
            if len(group) == 1:
                mesh = group[0][0]
                out["results"].append(run_job(group[0], share, 0 if mesh == "1x1" and n_gpus > 1 else None))
            else:
                with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                    out["results"] += list(pool.map(lambda jg: run_job(jg[0], share, jg[1]), zip(group, range(len(group)))))
    for r in out["results"]:
        for run in r.get("runs", []):
            if "timed_unix_s" in run and "ms_per_step" in run:
                run["gpu0"] = gpu.summary(*run["timed_unix_s"])
                watts = run["gpu0"]["power_w"]
                run["joules_per_token"] = None if watts is None else watts * run["ms_per_step"] / 1e3 / run["batch"]
    out["dense_layers"] = dense_layers
    out["table"] = table(out["results"])
    out["speedups"] = speedups(out["results"])
    out["scaling"] = scaling(out["results"])
    print("\n" + out["table"] + "\n\n" + out["speedups"] + ("\n\n" + out["scaling"] if out["scaling"] else ""))
    if out["not_run"]:
        print("not run:", "; ".join(out["not_run"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
