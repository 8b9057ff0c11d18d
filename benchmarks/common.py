"""Shared helpers for the GPU benchmarks: CUPTI timing, bandwidth ceilings, error checks."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

L2_BYTES = 50 * 2 ** 20   # H100 SXM L2


def cupti_time(fn, args, *, iterations: int = 30, per_call: int = 1, by_kernel: bool = False):
    """Median device time in ms of ONE call (fn runs ``per_call`` rotated calls per launch).

    Returns (outputs of the first iteration, median ms, spread (p90-p10) ms, kernel names).
    All kernels a call launches are summed (CUPTI), so padding/split-K reductions count.
    ``by_kernel``: instead of the names, {kernel name: median ms per call} (where the time goes).
    """
    if os.environ.get("BENCH_FAKE_TIMER"):  # CPU smoke test of the scripts: wall clock, no CUPTI
        out = jax.block_until_ready(fn(*args))
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ms = (time.perf_counter() - t) * 1e3 / per_call
        return out, ms, 0.0, {"wall": ms} if by_kernel else ["wall"]
    from jax.experimental.mosaic.gpu import profiler  # noqa: PLC0415
    out, timings = profiler.measure(fn, iterations=iterations, aggregate=False)(*args)
    if timings is None:
        raise RuntimeError("CUPTI returned no kernel timings")
    per_iter = sorted(sum(ms for _, ms in it) / per_call for it in timings)
    q = lambda f: per_iter[min(len(per_iter) - 1, int(f * len(per_iter)))]
    names = sorted({name for name, _ in timings[0]})
    if by_kernel:
        per_name = lambda it, n: sum(ms for name, ms in it if name == n) / per_call  # noqa: E731
        names = {n: statistics.median(per_name(it, n) for it in timings) for n in names}
    return out, statistics.median(per_iter), q(0.9) - q(0.1), names


class GpuSampler:
    """``nvidia-smi`` sampling the first GPU's SM clock, board power and clock-event reasons every
    ``period_ms`` in a background thread, each sample stamped with this host's ``time.time()`` on
    arrival (no clock or time-zone parsing).  A context manager; without ``nvidia-smi`` it records
    nothing.  ``summary(t0, t1)``: means over a window, and the share of samples at the software power
    cap (reason bit 0x4)."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"

    def __init__(self, period_ms: int = 100):
        self.period_ms, self.samples, self.proc, self.thread = period_ms, [], None, None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", str(self.period_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self

        def read():
            for line in self.proc.stdout:
                try:
                    mhz, watts, reasons = (v.strip() for v in line.split(","))
                    self.samples.append((time.time(), float(mhz), float(watts), int(reasons, 16)))
                except ValueError:
                    pass
        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    def summary(self, t0: float = float("-inf"), t1: float = float("inf")) -> dict:
        s = [r for r in self.samples if t0 <= r[0] <= t1]
        if not s:
            return {"samples": 0, "sm_mhz": None, "power_w": None, "power_capped": None}
        return {"samples": len(s), "sm_mhz": statistics.mean(r[1] for r in s),
                "power_w": statistics.mean(r[2] for r in s), "power_capped": sum(bool(r[3] & 0x4) for r in s) / len(s)}


def sustained_time(fn, args, *, warm_s: float = 1.0, calls: int = 200) -> dict:
    """Wall-clock ms per call of ``calls`` back-to-back calls after ``warm_s`` seconds of them: the GPU
    as a serving loop keeps it, at its power cap (burst timings such as ``cupti_time``'s run at the
    boost clock between idle gaps).  Also the SM clock and board power ``GpuSampler`` read during the
    timed calls (None where it read nothing).  Host dispatch must be shorter than a call."""
    jax.block_until_ready(fn(*args))
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        out = fn(*args)
    jax.block_until_ready(out)
    with GpuSampler(period_ms=50) as gpu:
        for _ in range(8):   # keep the GPU busy while the sampler starts
            out = fn(*args)
        t0, t = time.time(), time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - t) * 1e3 / calls
        t1 = time.time()
    return {"ms": ms, "calls": calls, "warm_s": warm_s, **gpu.summary(t0, t1)}


def bandwidth_ceilings(gib: float = 1.0, iterations: int = 20):
    """Measured device-to-device copy bandwidth (bytes read + written) and read-only bandwidth."""
    n = int(gib * 2 ** 30) // 2
    x = jax.random.bits(jax.random.key(0), (n,), jnp.uint16)
    copy = jax.jit(lambda a: a ^ jnp.uint16(0x5A5A))
    read = jax.jit(lambda a: jnp.max(a))
    _, t_copy, s_copy, _ = cupti_time(copy, (x,), iterations=iterations)
    _, t_read, s_read, _ = cupti_time(read, (x,), iterations=iterations)
    nbytes = 2 * n
    return {"copy_GBps": 2 * nbytes / t_copy / 1e6, "copy_ms": t_copy, "copy_spread_ms": s_copy,
            "read_GBps": nbytes / t_read / 1e6, "read_ms": t_read, "read_spread_ms": s_read,
            "bytes": nbytes}


def rel_err(got, ref) -> tuple[float, bool]:
    """(‖got − ref‖ / ‖ref‖ in f64, all finite)."""
    g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    finite = bool(np.isfinite(g).all())
    den = np.linalg.norm(r)
    return (float(np.linalg.norm(g - r) / den) if den > 0 else float(np.abs(g).max(initial=0))), finite


def device_info() -> dict:
    d = jax.devices()[0]
    info = {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def device_timeline(fn, args, *, top: int = 12):
    """Run ``fn(*args)`` once under ``jax.profiler`` and summarise when the GPU was busy
    (``gap_summary``): where a call's wall clock goes beyond the kernels' own time."""
    import glob  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from jax.profiler import ProfileData, TraceAnnotation  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            with TraceAnnotation("timeline_call"):
                out = jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return out, {"error": "the profiler wrote no trace"}
        data = ProfileData.from_file(paths[0])
    kernels, host, window = [], [], None
    for plane in data.planes:
        on_gpu = plane.name.startswith("/device:GPU")
        for line in plane.lines:
            if on_gpu and not line.name.startswith("Stream"):
                continue                 # derived lines ("XLA Ops", "XLA Modules") repeat the stream events
            for e in line.events:
                if on_gpu:
                    kernels.append((e.start_ns, e.end_ns, e.name))
                elif plane.name.startswith("/host"):
                    if e.name == "timeline_call":
                        window = (e.start_ns, e.end_ns)
                    host.append((e.start_ns, e.end_ns, e.name, line.name))
    if not kernels or window is None:
        return out, {"error": "no GPU stream events in the trace" if not kernels else "call not found in the trace"}
    return out, gap_summary(kernels, host, window, top=top)


GAP_BINS_US = (2, 10, 50, 200, 1000)


def gap_summary(kernels, host, window, *, top: int = 12) -> dict:
    """GPU busy and idle time of one call from trace events (times in ns).

    ``kernels``: (start, end, name) on the GPU's streams; ``host``: (start, end, name, thread);
    ``window``: (start, end) of the host call.  Idle = the call's window minus the union of the
    kernels: before the first kernel (``lead``), between kernels (histogram by gap length, the
    kernel pairs around the most idle time, the longest gaps with the host events inside them)
    and after the last one (``tail``); and each kernel name's count and time."""
    ks = sorted(kernels)
    merged = []                                   # [start, end, first name, last name]
    for s, e, n in ks:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1][1], merged[-1][3] = e, n
        else:
            merged.append([s, e, n, n])
    busy = sum(e - s for s, e, _, _ in merged)
    gaps = [(b[0] - a[1], a[3], b[2], a[1], b[0]) for a, b in zip(merged, merged[1:])]
    us = lambda ns: round(ns / 1e3, 2)  # noqa: E731
    bins, lo = [], 0
    for hi in (*GAP_BINS_US, float("inf")):
        sel = [g for g, *_ in gaps if lo * 1e3 <= g < hi * 1e3]
        bins.append({"us": f"{lo}-{hi}", "count": len(sel), "total_us": us(sum(sel))})
        lo = hi
    pairs = _tally(((a, b), g) for g, a, b, _, _ in gaps)
    short = (window[1] - window[0]) / 4          # host events shorter than this say what the host did

    def inside(s0, e0):
        hits = [(min(e, e0) - max(s, s0), n, t) for s, e, n, t in host
                if s < e0 and e > s0 and e - s < short and n != "timeline_call"]
        return [f"{n} [{t}] {us(o)} us" for o, n, t in sorted(hits, reverse=True)[:4]]

    by_name = _tally((n, e - s) for s, e, n in ks)
    return {
        "by_kernel": [{"name": n, "count": c, "total_us": us(t)}
                      for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:3 * top]],
        "kernels": len(ks), "window_us": us(window[1] - window[0]), "busy_us": us(busy),
        "lead_us": us(merged[0][0] - window[0]), "tail_us": us(window[1] - merged[-1][1]),
        "between_us": us(sum(g for g, *_ in gaps)), "gap_bins": bins,
        "top_pairs": [{"after": a, "before": b, "count": c, "total_us": us(t)}
                      for (a, b), (c, t) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]],
        "longest": [{"us": us(g), "after": a, "before": b, "host": inside(s, e)}
                    for g, a, b, s, e in sorted(gaps, reverse=True)[:top]],
    }


def _tally(items) -> dict:
    """{key: [count, total]} of (key, value) pairs."""
    out: dict = {}
    for key, value in items:
        c = out.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += value
    return out
