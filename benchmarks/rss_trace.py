"""Host memory (RSS) of a jax GPU process, by stage or over time (issue 21's peak-RSS question).

    python3 benchmarks/rss_trace.py probe [--merge]     # RSS after import, after one op (and after a
                                                        # DeepSeek-MoE-16B merge compile); the largest mappings
    python3 benchmarks/rss_trace.py timeline CMD ...    # CMD's smaps_rollup every 0.1 s: a line a second, the peaks,
                                                        # the last lines of its output

Prints JSON (probe) or text (timeline); GiB throughout.
"""
import json
import os
import subprocess
import sys
import threading
import time


def rollup(pid="self"):
    """GiB of ``/proc/PID/smaps_rollup``: Rss, Anonymous, Shmem, Pss_File."""
    d = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                d[parts[0].rstrip(":")] = int(parts[1]) / 2**20
    return {k: round(d.get(k, 0), 3) for k in ("Rss", "Anonymous", "Shmem", "Pss_File")}


def top_maps(n=12):
    """The ``n`` largest mappings of this process by Rss: (file, Rss GiB, Anonymous GiB)."""
    maps, cur = {}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            f = line.split()
            if f and "-" in f[0] and len(f) >= 5 and not f[0].endswith(":"):
                cur = f[5] if len(f) > 5 else f"[anon {f[0]}]"   # each anonymous mapping on its own
            elif f and f[0] in ("Rss:", "Anonymous:"):
                m = maps.setdefault(cur, [0, 0])
                m[0 if f[0] == "Rss:" else 1] += int(f[1])
    top = sorted(maps.items(), key=lambda kv: -kv[1][0])[:n]
    return [(os.path.basename(k), round(v[0] / 2**20, 3), round(v[1] / 2**20, 3)) for k, v in top]


def probe(merge: bool) -> None:
    """RSS at each stage of a bare jax process (optionally a merge compile after it), as one JSON line."""
    out = {"env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "MALLOC_", "XLA_"))}}
    out["start"] = rollup()
    import jax  # noqa: PLC0415 (measured: RSS before and after the import)
    import jax.numpy as jnp  # noqa: PLC0415
    out["import"] = rollup()
    jax.devices()
    out["devices"] = rollup()
    jnp.ones(4).block_until_ready()
    out["first_op"] = rollup()
    out["top_after_first_op"] = top_maps()
    if merge:
        from puzzlemoe_jax.compress import compress_layer  # noqa: PLC0415
        k = jax.random.key(0)
        E, H, I = 64, 2048, 1408
        shapes = {"w_gate": (H, I), "w_up": (H, I), "w_down": (I, H)}
        w = {n: jax.random.normal(k, (E, *s), jnp.bfloat16) for n, s in shapes.items()}
        jax.block_until_ready(compress_layer(w, 0.5, chunk_elems=1 << 26))
        out["after_merge_compile"] = rollup()
        out["top_after_merge"] = top_maps()
    print(json.dumps(out))


def timeline(cmd: list[str]) -> None:
    """Run ``cmd``, sampling its RSS every 0.1 s; print a line a second, the peaks and its output's tail."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, peak, lines = [], {}, []

    def pump():
        for line in p.stdout:
            lines.append((round(time.time() - t0, 2), line.rstrip()[-200:]))
    threading.Thread(target=pump, daemon=True).start()
    while p.poll() is None:
        try:
            r = rollup(p.pid)
        except OSError:   # the process is gone
            break
        t = round(time.time() - t0, 2)
        samples.append((t, r))
        for k, v in r.items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(0.1)
    p.wait()
    last = -1
    for t, r in samples:
        if t - last >= 1.0:
            print(f"t={t:6.1f} rss={r['Rss']:.2f} anon={r['Anonymous']:.2f} shmem={r['Shmem']:.2f}")
            last = t
    print("PEAK", json.dumps(peak))
    for t, l in lines[-25:]:
        print(f"[{t}] {l}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        probe("--merge" in sys.argv)
    elif sys.argv[1:2] == ["timeline"] and len(sys.argv) > 2:
        timeline(sys.argv[2:])
    else:
        sys.exit(__doc__)
