"""Where each thread of ``python -m convert`` spends its time: the converter run in this process
while a sampler thread records every thread's stack at a fixed interval, plus a probe of how long a
thread waits for the GIL (the overshoot of a 1 ms sleep).  Prints, per thread group, the share of
samples at each innermost frame and at each innermost frame of our own code, and writes JSON.

    PYTHONPATH=. python3 benchmarks/sample_threads.py --out $OUT/threads.json -- mixtral --src SRC --out DST --ratio 0.5 --overwrite
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OURS = re.compile(r"/(puzzlemoe_jax|kernels|convert)/")


def frame_names(frame) -> tuple[str, str]:
    """(innermost frame, innermost frame in our code) as ``file:function:line``."""
    inner = ours = None
    while frame is not None:
        name = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
        inner = inner or name
        if ours is None and OURS.search(frame.f_code.co_filename):
            ours = name
        frame = frame.f_back
    return inner, ours or "-"


def group(thread_name: str) -> str:
    return re.sub(r"_\d+$", "", thread_name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between stack samples")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the convert CLI's arguments")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    from convert import main as convert_main   # noqa: PLC0415
    stop = threading.Event()
    samples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ours: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    waits: list[float] = []

    def sample():
        names, me = {}, threading.get_ident()
        while not stop.is_set():
            for t in threading.enumerate():
                names[t.ident] = t.name
            for ident, frame in sys._current_frames().items():
                if ident in (me, probe.ident):
                    continue
                g = group(names.get(ident, "?"))
                inner, own = frame_names(frame)
                samples[g][inner] += 1
                ours[g][own] += 1
            time.sleep(args.interval)

    def gil_probe():   # a 1 ms sleep's overshoot is mostly the wait for the GIL
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            waits.append(time.perf_counter() - t - 0.001)
    probe = threading.Thread(target=gil_probe, name="gil-probe", daemon=True)
    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    probe.start()
    sampler.start()
    t = time.perf_counter()
    code = convert_main(argv)
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    probe.join()
    waits.sort()
    q = lambda f: waits[min(len(waits) - 1, int(f * len(waits)))] * 1e3 if waits else float("nan")  # noqa: E731
    result = {"argv": argv, "exit": code, "wall_s": wall, "interval_s": args.interval,
              "gil_wait_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": 1e3 * sum(waits) / max(1, len(waits))},
              "threads": {g: {"samples": sum(c.values()), "top": c.most_common(12), "ours": ours[g].most_common(12)}
                          for g, c in samples.items()}}
    print(f"wall {wall:.1f} s; GIL wait of a 1 ms sleep (ms): " +
          ", ".join(f"{k} {v:.2f}" for k, v in result["gil_wait_ms"].items()))
    for g, r in result["threads"].items():
        print(f"\n{g}: {r['samples']} samples")
        for name, n in r["top"][:8]:
            print(f"  {100 * n / r['samples']:5.1f}%  {name}")
        print("  ours:", "; ".join(f"{name} {100 * n / r['samples']:.0f}%" for name, n in r["ours"][:5]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
