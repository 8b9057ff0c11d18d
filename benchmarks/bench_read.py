"""Where the converter's read stage spends its time: variants of reading a layer's expert tensors
from a safetensors checkpoint (and handing them to the device), each from a cold and a warm page cache.

Writes a random checkpoint with real layer shapes (``bench_convert.write_checkpoint``), measures the
disk's sequential read rate on it, then times each variant over every layer's expert tensors with
``T`` reader threads.  Per run: wall seconds, GB/s, the process's CPU seconds (user/system), minor
page faults, and the reader threads' summed seconds in the file read and in the hand-over to the
device.  Device variants are checked: two tensors per layer fetched back and compared with a host
read.  Table + JSON under ``benchmarks/results/``.

Variants (``--variants``, each ``NAME`` or ``NAME:T``):
  read        plain readinto into a fresh buffer per tensor, no device
  read-reuse  readinto into one reused buffer per thread, no device
  read-huge   readinto into a fresh anonymous mapping advised MADV_HUGEPAGE, no device
  put-only    device_put + wait of an already-filled host buffer (no disk): host -> device alone
  current     ``hf_layout.read_experts_raw`` with ``device_reader`` mode "fresh" (fresh buffer, device_put,
              wait, per tensor: the converter's reader of commit 347a1fb)
  reuse-put   reused buffer per thread, device_put, wait
  huge-put    fresh MADV_HUGEPAGE buffer, device_put, wait
  mmap-put    the file mmapped (MADV_WILLNEED on the tensor), device_put of the view, wait
  runs-put    adjacent tensors of one file merged into runs of up to 1 GiB: one read, one device_put
  nowait-put  fresh buffer, device_put without waiting (wait once per layer)
  pinned-put  a page-locked (cupy) buffer per thread, readinto, device_put, wait (a ceiling probe)
  jaxpin-put  reused buffer per thread, device_put to jax's pinned_host memory, then to the device
  batch-put   fresh buffers, one device_put of a whole matrix's tensors (a list) per thread, wait
  direct      O_DIRECT read of the tensor's page-aligned span into a fresh mapping, no device
  direct-put  the same, device_put of the tensor's view, wait

    PYTHONPATH=. python3 benchmarks/bench_read.py --shape mixtral --layers 2 --out-dir /tmp/br
    PYTHONPATH=. python3 benchmarks/bench_read.py --shape small --layers 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_convert import SHAPES, drop_cache, git_commit, read_rate, save_result, write_checkpoint  # noqa: E402

import jax  # noqa: E402
from puzzlemoe_jax.config import ModelConfig  # noqa: E402
from puzzlemoe_jax.hf_layout import device_reader, hf_plan, read_experts_raw, read_items  # noqa: E402
from puzzlemoe_jax.safetensors_io import DTYPES, SafetensorsDir  # noqa: E402

DEFAULT = ("read:1,read:4,read:8,read:16,read-reuse:4,read-reuse:8,read-huge:4,put-only:1,put-only:4,put-only:8,"
           "current:4,current:8,current:16,reuse-put:4,reuse-put:8,huge-put:4,mmap-put:4,mmap-put:8,runs-put:4,"
           "nowait-put:4,pinned-put:4,pinned-put:8,direct:4,direct:8,direct-put:4,direct-put:8")
RUN_CAP = 1 << 30


def readinto(f, buf: np.ndarray, start: int) -> None:
    f.seek(start)
    view, done = memoryview(buf.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(start)
        done += n


def huge_empty(n: int) -> np.ndarray:
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, np.uint8)


class Reader:
    """One variant over a list of tensor names; per-thread buffers and summed stage seconds."""

    def __init__(self, ckpt: SafetensorsDir, kind: str, threads: int):
        self.ckpt, self.kind, self.threads = ckpt, kind, threads
        self.local, self.lock = threading.local(), threading.Lock()
        self.read_s = self.put_s = 0.0
        self.maps = {}
        self.device = jax.devices()[0]
        if kind == "jaxpin-put":
            self.pinned = jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")

    def add(self, r: float, p: float):
        with self.lock:
            self.read_s += r
            self.put_s += p

    def buffer(self, n: int) -> np.ndarray:
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.nbytes < n:
            if self.kind == "pinned-put":
                import cupy  # noqa: PLC0415
                mem = cupy.cuda.alloc_pinned_memory(n)
                buf = np.frombuffer(mem, np.uint8, n)
                self.local.mem = mem
            else:
                buf = np.empty(n, np.uint8)
                buf[::4096] = 0   # fault the pages in once
            self.local.buf = buf
        return buf[:n]

    def fresh(self, n: int) -> np.ndarray:
        return huge_empty(n) if self.kind in ("read-huge", "huge-put") else np.empty(n, np.uint8)

    def one(self, name: str):
        info = self.ckpt.tensors[name]
        dt, shape = DTYPES[info.dtype], info.shape
        t = time.perf_counter()
        if self.kind in ("direct", "direct-put"):
            lo = info.start - info.start % mmap.PAGESIZE
            hi = -(-(info.start + info.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
            buf = np.frombuffer(mmap.mmap(-1, hi - lo, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
            fd = os.open(info.file, os.O_RDONLY | os.O_DIRECT)
            try:
                view, done = memoryview(buf), 0
                while done < hi - lo:
                    n = os.preadv(fd, [view[done:]], lo + done)
                    if not n:
                        break   # end of file inside the last page
                    done += n
            finally:
                os.close(fd)
            a = buf[info.start - lo:info.start - lo + info.nbytes]
        elif self.kind == "mmap-put":
            m = self.maps.get(info.file)
            if m is None:
                with open(info.file, "rb") as f:
                    m = self.maps.setdefault(info.file, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            lo = info.start - info.start % mmap.PAGESIZE
            m.madvise(mmap.MADV_WILLNEED, lo, info.start + info.nbytes - lo)
            a = np.frombuffer(m, np.uint8, info.nbytes, info.start)
        else:
            reuse = self.kind in ("read-reuse", "reuse-put", "pinned-put", "jaxpin-put")
            a = self.buffer(info.nbytes) if reuse else self.fresh(info.nbytes)
            with open(info.file, "rb", buffering=0) as f:
                readinto(f, a, info.start)
        a = a.view(dt).reshape(shape)
        r = time.perf_counter()
        out = None
        if self.kind == "jaxpin-put":
            out = jax.device_put(jax.device_put(a, self.pinned), self.device)
            out.block_until_ready()
        elif self.kind.endswith("-put") or self.kind == "current":
            out = jax.device_put(a, self.device)
            if self.kind != "nowait-put":
                out.block_until_ready()
        self.add(r - t, time.perf_counter() - r)
        return out

    def layer(self, names: list[str], pool):
        if self.kind == "batch-put":   # one list per thread: names split into `threads` groups
            groups = [names[k::self.threads] for k in range(self.threads)]
            outs = list(pool.map(self.batch, groups) if pool else map(self.batch, groups))
            by_name = {n: o for g, os_ in zip(groups, outs) for n, o in zip(g, os_)}
            return [by_name[n] for n in names]
        return list(pool.map(self.one, names) if pool else map(self.one, names))

    def batch(self, names: list[str]):
        t, arrays = time.perf_counter(), []
        for name in names:
            info = self.ckpt.tensors[name]
            a = np.empty(info.nbytes, np.uint8)
            with open(info.file, "rb", buffering=0) as f:
                readinto(f, a, info.start)
            arrays.append(a.view(DTYPES[info.dtype]).reshape(info.shape))
        r = time.perf_counter()
        outs = jax.device_put(arrays, self.device)
        jax.block_until_ready(outs)
        self.add(r - t, time.perf_counter() - r)
        return outs

    def runs(self, names: list[str], pool):
        """Adjacent tensors of one file as runs of up to RUN_CAP bytes: one read, one put each."""
        infos = sorted((self.ckpt.tensors[n] for n in names), key=lambda i: (str(i.file), i.start))
        runs, cur = [], []
        for i in infos:
            if cur and (i.file != cur[-1].file or i.start != cur[-1].start + cur[-1].nbytes
                        or i.start + i.nbytes - cur[0].start > RUN_CAP):
                runs.append(cur)
                cur = []
            cur.append(i)
        runs += [cur] if cur else []

        def one(run):
            t = time.perf_counter()
            n = run[-1].start + run[-1].nbytes - run[0].start
            buf = np.empty(n, np.uint8)
            with open(run[0].file, "rb", buffering=0) as f:
                readinto(f, buf, run[0].start)
            r = time.perf_counter()
            out = jax.device_put(buf.view(np.uint16), self.device)
            out.block_until_ready()
            self.add(r - t, time.perf_counter() - r)
            return out
        return list(pool.map(one, runs) if pool else map(one, runs)), len(runs)


def put_only(ckpt, layers, threads: int) -> dict:
    """Host -> device of filled, page-faulted buffers of every expert tensor's size (no disk)."""
    dev = jax.devices()[0]
    sizes = {ckpt.tensors[n].nbytes for names in layers for n in names}
    bufs = {s: np.ones(s // 2, np.uint16) for s in sizes}
    names = [n for names in layers for n in names]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outs = list(pool.map(lambda n: jax.device_put(bufs[ckpt.tensors[n].nbytes], dev).block_until_ready(),
                             names))
    wall = time.perf_counter() - t
    del outs
    return {"wall_s": wall, "put_s": wall * threads}


def checked(ckpt, names, outs) -> bool:
    """Two tensors of a layer fetched back equal a fresh host read (buffer reuse must not corrupt)."""
    if not outs or outs[0] is None:
        return True
    ok = True
    for k in (0, len(names) - 1):
        ok &= bool(np.array_equal(np.asarray(outs[k]).view(np.uint16).reshape(-1),
                                  ckpt.read(names[k], check_finite=False).view(np.uint16).reshape(-1)))
    return ok


def run_variant(ckpt, layers, kind: str, threads: int) -> dict:
    if kind == "put-only":
        return put_only(ckpt, layers, threads)
    ru0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rd = Reader(ckpt, kind, threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    ok, nruns, wall = True, 0, 0.0
    try:
        for names in layers:
            t0 = time.perf_counter()
            if kind == "runs-put":
                outs, k = rd.runs(names, pool)
                nruns += k
            elif kind == "current":
                raw = read_experts_raw(ckpt, ckpt_item[names[0]], device_reader(ckpt, "fresh"), pool)
                outs = [a for v in raw.values() for a in (v if isinstance(v, list) else [v])]
            else:
                outs = rd.layer(names, pool)
            jax.block_until_ready([o for o in outs if o is not None])
            wall += time.perf_counter() - t0
            if kind not in ("runs-put", "current"):
                ok &= checked(ckpt, names, outs)
            del outs
    finally:
        if pool:
            pool.shutdown()
        for m in rd.maps.values():
            m.close()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "read_s": rd.read_s, "put_s": rd.put_s, "ok": ok, "runs": nruns or None,
            "user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
            "minflt": ru1.ru_minflt - ru0.ru_minflt, "elapsed_s": time.perf_counter() - t}


ckpt_item = {}   # first expert tensor name of a layer -> its ExpertsItem (for the "current" variant)


def thp() -> dict:
    out = {}
    for k in ("enabled", "defrag"):
        try:
            out[k] = Path(f"/sys/kernel/mm/transparent_hugepage/{k}").read_text().strip()
        except OSError:
            out[k] = "unreadable"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out-dir", default="/tmp/bench_read")
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--no-cold", action="store_true", help="warm page cache only")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining variants after this long")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    arch, _, sizes = SHAPES[args.shape]
    src = Path(args.out_dir) / f"src-{args.shape}"
    cfg_file = src / "config.json"
    if not (cfg_file.exists() and json.loads(cfg_file.read_text())["num_hidden_layers"] == args.layers):
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        write_checkpoint(src, arch, args.layers, sizes)
        print(f"wrote {args.layers} {args.shape} layers in {time.perf_counter() - t:.1f} s", flush=True)
    ckpt = SafetensorsDir(src)
    plan = hf_plan(ModelConfig.from_hf(json.loads(cfg_file.read_text())), ckpt.tensors)
    layers, items = [], []
    for its, ex in plan.layers:
        if ex is not None:
            names = list(ex.sources())
            ckpt_item[names[0]] = ex
            layers.append(names)
        items += its
    gb = sum(ckpt.tensors[n].nbytes for names in layers for n in names) / 1e9
    how = drop_cache(src)
    disk = read_rate(src)
    jax.block_until_ready(jax.device_put(np.zeros(4)))   # backend up before timing
    print(f"{args.shape}: {len(layers)} layers, {gb:.2f} GB of expert tensors ({len(layers[0])} per layer, "
          f"{ckpt.tensors[layers[0][0]].nbytes / 2**20:.1f} MiB each); disk sequential {disk:.2f} GB/s "
          f"(cache: {how}); backend {jax.default_backend()}; THP {thp()}", flush=True)
    rows = []
    # the non-expert tensors as the converter reads them (host transposes), for the share of the stage
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_cache(src)
        t = time.perf_counter()
        for it in plan.head + items:
            read_items(ckpt, [it], DTYPES["BF16"])
        nb = ckpt.nbytes([it.src for it in plan.head + items])
        rows.append({"variant": "items (read_items, 1 thread)", "threads": 1, "cache": cache, "gb": nb / 1e9,
                     "wall_s": time.perf_counter() - t})
    for spec in args.variants.split(","):
        kind, _, th = spec.partition(":")
        threads = int(th or 4)
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: skipping {spec}", flush=True)
            continue
        for cache in (("warm",) if kind == "put-only" or args.no_cold else ("cold", "warm")):
            if cache == "cold":
                drop_cache(src)
            try:
                r = run_variant(ckpt, layers, kind, threads)
            except Exception as e:  # noqa: BLE001  (e.g. no cupy): recorded, next variant
                print(f"{spec} {cache}: failed: {type(e).__name__}: {e}", flush=True)
                rows.append({"variant": kind, "threads": threads, "cache": cache, "error": f"{type(e).__name__}: {e}"})
                break
            r.update(variant=kind, threads=threads, cache=cache, gb=gb)
            rows.append(r)
            print(f"{kind:12s} T={threads:2d} {cache}: {r['wall_s']:6.2f} s {gb / r['wall_s']:6.2f} GB/s  "
                  f"read {r.get('read_s', 0):6.1f} put {r.get('put_s', 0):6.1f} thread-s  user {r.get('user_s', 0):5.1f} "
                  f"sys {r.get('sys_s', 0):5.1f}  minflt {r.get('minflt', 0):8d}  ok {r.get('ok', '-')}", flush=True)
    commit = git_commit()
    dev = jax.devices()[0]
    result = {"shape": args.shape, "layers": len(layers), "expert_gb": gb, "disk_read_gb_per_s": disk, "cache": how,
              "device": f"{jax.default_backend()} | {dev.device_kind}", "cpus": os.cpu_count(), "thp": thp(),
              "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "rows": rows}
    print("\n| variant | T | cache | s | GB/s | read thread-s | put thread-s | user s | sys s | minor faults | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['threads']} | {r['cache']} | failed: {r['error'][:60]} |||||||")
            continue
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if r.get(k) is not None else "–"  # noqa: E731
        print(f"| {r['variant']} | {r['threads']} | {r['cache']} | {r['wall_s']:.2f} | {r['gb'] / r['wall_s']:.2f} | "
              f"{f('read_s')} | {f('put_s')} | {f('user_s')} | {f('sys_s')} | {f('minflt', '{:d}')} | {r.get('ok', '–')} |")
    name = "bench_read_" + args.shape + "_" + dev.device_kind.lower().replace(" ", "_") + ".json"
    save_result(Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results") / name, result, src, args.keep)


if __name__ == "__main__":
    main()
