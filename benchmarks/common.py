"""Shared helpers for the GPU benchmarks: CUPTI timing, bandwidth ceilings, error checks."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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
