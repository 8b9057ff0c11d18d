"""End-to-end ``python -m convert`` speed on a real-size-shaped checkpoint, page cache cold.

Writes a random bf16 checkpoint with the layer shapes of a real model (HF Hub layout, 2 GB shards)
to local disk, measures the disk's sequential read rate on it (alone, and while writing the share of
it a conversion writes back), then runs the converter as a user
would (a subprocess): once with the CLI's defaults (run "default": the pipelined converter), once
per ``--variant``, and once with ``--sequential`` (the plain one-thread host path), each from a cold
page cache; ``--repeat N`` runs every setting N times, in rounds.
Reports GB/s of input, seconds per layer, the read/merge/write time split and peak RSS (with the sampled
peak anonymous RSS beside it: the CUDA libraries count as file pages), as a table
and as JSON under ``benchmarks/results/``.

The page cache is dropped with ``/proc/sys/vm/drop_caches`` when permitted, else each source file's
pages are evicted with ``posix_fadvise(DONTNEED)`` (works unprivileged for clean pages); the
output says which.

    PYTHONPATH=. python3 benchmarks/bench_convert.py --shape mixtral --layers 8 --out-dir /tmp/bench
    PYTHONPATH=. python3 benchmarks/bench_convert.py --shape small --layers 4   # CPU-sized
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from puzzlemoe_jax.config import ModelConfig  # noqa: E402
from puzzlemoe_jax.hf_layout import hf_plan  # noqa: E402
from puzzlemoe_jax.random_checkpoint import tiny_config  # noqa: E402
from puzzlemoe_jax.safetensors_io import INDEX  # noqa: E402

SHAPES = {  # arch, full depth, tiny_config sizes
    "mixtral": ("mixtral", 32, dict(hidden_size=4096, num_heads=32, num_kv_heads=8, num_experts=8, top_k=2,
                                    moe_intermediate_size=14336, vocab_size=32000)),
    "deepseek": ("deepseek", 28, dict(hidden_size=2048, num_heads=16, num_kv_heads=16, num_experts=64, top_k=6,
                                      moe_intermediate_size=1408, intermediate_size=10944, vocab_size=102400)),
    "small": ("mixtral", 32, dict(hidden_size=1024, num_heads=8, num_kv_heads=2, num_experts=8, top_k=2,
                                  moe_intermediate_size=2816, vocab_size=32000)),
}
SHARD = 2 * 10**9
CHUNK = 64 << 20


def write_checkpoint(out: Path, arch: str, layers: int, sizes: dict) -> int:
    """Random bf16 checkpoint (HF Hub layout) streamed to 2 GB shards; returns the bytes written.
    Tensors are slices of one random pool at random offsets: cheap to make, distinct per expert."""
    out.mkdir(parents=True, exist_ok=True)
    hf = tiny_config(arch, num_layers=layers, **sizes)
    plan = hf_plan(ModelConfig.from_hf(hf), (), layout="hub")
    rng = np.random.default_rng(0)
    pool = (0.02 * rng.standard_normal(1 << 24, np.float32)).astype(ml_dtypes.bfloat16)
    pool = np.concatenate([pool, pool]).view(np.uint16)
    norm = np.ones(1 << 16, ml_dtypes.bfloat16).view(np.uint16)
    tensors = [(it.src, it.shape) for it in plan.head[:1]]
    for items, experts in plan.layers:
        tensors += [(it.src, it.shape) for it in items]
        tensors += list(experts.sources().items()) if experts else []
    tensors += [(it.src, it.shape) for it in plan.head[1:]]
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += 2 * int(np.prod(shape))
        if size >= SHARD:
            shards.append(cur)
            cur, size = [], 0
    shards += [cur] if cur else []
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in shard:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                n = int(np.prod(shape))
                if name.endswith("norm.weight"):
                    f.write(norm[:n].tobytes())
                    continue
                for s in range(0, n, 1 << 24):
                    m = min(1 << 24, n - s)
                    o = int(rng.integers(0, 1 << 24))
                    f.write(memoryview(pool[o:o + m]))
            f.flush()
            os.fsync(f.fileno())
        weight_map.update({name: fname for name, _ in shard})
        total += (out / fname).stat().st_size
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def drop_cache(d: Path) -> str:
    """Drop the page cache (all of it when permitted, else ``d``'s files); returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for p in d.iterdir():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed (no permission for /proc/sys/vm/drop_caches)"


def read_rate(d: Path) -> float:
    """Sequential read rate of ``d``'s shards in GB/s (one pass, 64 MiB reads)."""
    buf, n, t = bytearray(CHUNK), 0, time.perf_counter()
    for p in sorted(d.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    return n / 1e9 / (time.perf_counter() - t)


def read_write_rate(d: Path, out: Path, write_share: float) -> tuple[float, float]:
    """The disk's rate with a converter's mix of traffic: ``d``'s shards read once (64 MiB reads) while
    another thread writes ``write_share`` of their bytes to a scratch file in ``out`` (then removed).
    Returns (read GB/s, read + written GB/s)."""
    total = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "bench_write_scratch"
    block = np.zeros(CHUNK, np.uint8)

    def write():
        with open(scratch, "wb", buffering=0) as f:
            for _ in range(int(write_share * total) // CHUNK):
                f.write(block)
            os.fsync(f.fileno())
    t = time.perf_counter()
    writer = threading.Thread(target=write)
    writer.start()
    read = read_rate(d)
    writer.join()
    both = time.perf_counter() - t
    written = scratch.stat().st_size
    scratch.unlink()
    return read, (total + written) / 1e9 / both


def sample_rss(proc: subprocess.Popen, peak: dict, timed: bool, every: float = 0.05) -> None:
    """Largest RssAnon / RssFile (KiB) of the converter process seen while it runs (sampled; the
    CUDA libraries' mappings count as file pages, the converter's buffers as anonymous ones)."""
    pid = None
    while proc.poll() is None:
        try:
            if pid is None:   # under /usr/bin/time the converter is its child
                pid = (int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
                       if timed else proc.pid)
            status = Path(f"/proc/{pid}/status").read_text()
            for key, field in (("anon", "RssAnon"), ("file", "RssFile")):
                m = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
                peak[key] = max(peak[key], int(m.group(1)) if m else 0)
        except (OSError, IndexError, ValueError):
            pass   # not started yet, or gone
        time.sleep(every)


def run_convert(arch: str, src: Path, out: Path, ratio: float, extra: list[str]) -> dict:
    """Run the CLI (with the ``extra`` arguments) in a subprocess; wall time, peak RSS and the
    summary's time split."""
    settings = dict(t.split("=", 1) for t in extra if re.match(r"[A-Z_][A-Z0-9_]*=", t))   # VAR=VALUE: environment
    cmd = [sys.executable, "-m", "convert", arch, "--src", str(src), "--out", str(out), "--ratio", str(ratio),
           "--overwrite", "--compile-cache", "none"] + [t for t in extra if t.split("=", 1)[0] not in settings]
    # (--compile-cache none: every run compiles, as a first conversion does)
    timed = Path("/usr/bin/time").exists()
    env = dict(os.environ, **settings, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    proc = subprocess.Popen((["/usr/bin/time", "-v"] if timed else []) + cmd, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0, "file": 0}
    sampler = threading.Thread(target=sample_rss, args=(proc, peak, timed), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    sampler.join()
    p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if p.returncode:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    if timed:
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 2**20
    else:
        import resource  # noqa: PLC0415
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # max over children so far
    m = re.search(r"time split[^:]*: (.*)", p.stdout)
    split = {k: float(v) for k, v in re.findall(r"(\w[\w -]*?) ([\d.]+) s", m.group(1) if m else "")}
    return {"command": " ".join([*(f"{k}={v}" for k, v in settings.items()), *cmd]), "wall_s": wall,
            "peak_rss_gib": rss, "peak_rss_anon_gib": peak["anon"] / 2**20, "peak_rss_file_gib": peak["file"] / 2**20, "split_s": split,
            "summary_tail": p.stdout.splitlines()[-4:]}


def git_commit() -> str:
    """The tree's commit: $PUZZLEMOE_COMMIT, else git's short HEAD, else "unknown"."""
    return os.environ.get("PUZZLEMOE_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"


def save_result(path: Path, result: dict, src: Path, keep: bool) -> None:
    """Write the run's JSON to ``path`` and remove the written checkpoint ``src`` unless ``keep``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if not keep:
        shutil.rmtree(src, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--layers", type=int, help="layers to write (default: as many as the disk holds, "
                                               "up to the model's depth)")
    ap.add_argument("--out-dir", default="/tmp/bench_convert", help="where the checkpoint and output go")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-sequential", action="store_true", help="skip the --sequential comparison run")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint for a later run")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="one more run with these CLI arguments, e.g. 'read4=--read-threads 4', and VAR=VALUE "
                         "environment settings, e.g. 'noprealloc=XLA_PYTHON_CLIENT_PREALLOCATE=false' "
                         "(repeatable; runs after the default run)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every setting N times, in rounds (the later rounds' runs are named NAME#2, ...)")
    ap.add_argument("--dst-dir", help="where the output goes (default: --out-dir, the source's disk)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    arch, depth, sizes = SHAPES[args.shape]
    work = Path(args.out_dir)
    src, out = work / f"src-{args.shape}", Path(args.dst_dir or work) / f"out-{args.shape}"
    work.mkdir(parents=True, exist_ok=True)
    i, h, e = sizes["moe_intermediate_size"], sizes["hidden_size"], sizes["num_experts"]
    layer_bytes = 3 * e * i * h * 2
    layers = args.layers
    if layers is None:  # source + one output (<= the source's size) must fit, with 10 % to spare
        free = shutil.disk_usage(work).free + (sum(p.stat().st_size for p in src.glob("*")) if src.exists() else 0)
        layers = max(1, min(depth, int(0.9 * free / (2 * layer_bytes)) - 1))
    cfg_file = src / "config.json"
    if not (cfg_file.exists() and json.loads(cfg_file.read_text())["num_hidden_layers"] == layers):
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        print(f"writing {layers} {args.shape}-shaped layers to {src} ...", flush=True)
        write_checkpoint(src, arch, layers, sizes)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    how = drop_cache(src)
    disk = read_rate(src)
    drop_cache(src)
    # the converter writes about half its input back to the same disk (ratio 0.5) while it reads
    mixed_read, mixed_total = read_write_rate(src, out.parent, min(1.0, 1.05 - args.ratio))
    probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                            "print(jax.default_backend(), '|', d.device_kind, '|', jax.device_count())"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    device = probe.stdout.strip() or probe.stderr.strip()[-200:]
    commit = git_commit()
    runs = {}
    variants = {"default": []}
    for v in args.variant:
        name, sep, rest = v.partition("=")
        if not sep or not name or name in ("default", "sequential"):
            ap.error(f"--variant takes NAME=ARGS with a new name, got {v!r}")
        variants[name] = rest.split()
    if not args.no_sequential:
        variants["sequential"] = ["--sequential"]
    # rounds: every run once per round, so no setting always goes first (the first conversion after the
    # source was written measured slowest on the H200 machines, whatever its setting)
    order = [(f"{name}#{k + 1}" if k else name, extra) for k in range(args.repeat) for name, extra in variants.items()]
    for name, extra in order:
        drop_cache(src)
        r = run_convert(arch, src, out, args.ratio, extra)
        r.update(gb_per_s=gb / r["wall_s"], s_per_layer=r["wall_s"] / layers)
        runs[name] = r
        shutil.rmtree(out, ignore_errors=True)
        print(f"{name}: {r['wall_s']:.1f} s, {r['gb_per_s']:.3f} GB/s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(sampled peak RssAnon {r['peak_rss_anon_gib']:.2f}, RssFile {r['peak_rss_file_gib']:.2f})",
              flush=True)
    rss_limit = (3 * layer_bytes + 1e9) / 2**30   # issue 21: 3 layers' expert bytes + 1 GB
    result = {"shape": args.shape, "arch": arch, "layers": layers, "input_gb": gb,
              "expert_gb_per_layer": layer_bytes / 1e9, "rss_limit_gib": rss_limit, "ratio": args.ratio, "cache": how,
              "disk_read_gb_per_s": disk, "disk_mixed_read_gb_per_s": mixed_read,
              "disk_mixed_read_write_gb_per_s": mixed_total, "device": device, "cpus": os.cpu_count(), "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "output_dir": str(out.parent), "runs": runs}
    cols = ("run", "wall s", "GB/s", "s/layer", "read s", "read others s", "wait read s", "merge s", "write s",
            "peak RSS GiB", "peak RssAnon GiB")
    print(f"\n{args.shape}: {layers} layers, {gb:.2f} GB input, {layer_bytes / 1e9:.2f} GB experts/layer, "
          f"ratio {args.ratio}; device {device}; {os.cpu_count()} CPUs; disk sequential read "
          f"{disk:.2f} GB/s (cache: {how}), {mixed_read:.2f} GB/s while writing ({mixed_total:.2f} GB/s read + "
          f"written); commit {commit}; peak RSS limit (3 layers' experts + 1 GB) "
          f"{rss_limit:.2f} GiB")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name, r in runs.items():
        s = r["split_s"]
        print(f"| {name} | {r['wall_s']:.1f} | {r['gb_per_s']:.3f} | {r['s_per_layer']:.2f} | "
              f"{s.get('read', 0):.1f} | {s.get('read others', 0):.1f} | {s.get('wait read', 0):.1f} | "
              f"{s.get('merge', 0):.1f} | {s.get('write', 0):.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['peak_rss_anon_gib']:.2f} |")
    if "sequential" in runs:
        print(f"speed-up {runs['sequential']['wall_s'] / runs['default']['wall_s']:.2f}x")
    dev = re.sub(r"\W+", "_", device.split("|")[1].strip().lower()) if "|" in device else "unknown"
    save_result(ROOT / "benchmarks" / "results" / f"bench_convert_{args.shape}_{dev}.json", result, src, args.keep)


if __name__ == "__main__":
    main()
