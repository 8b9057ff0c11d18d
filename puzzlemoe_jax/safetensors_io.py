"""Streaming safetensors I/O: a checkpoint directory's tensors read one at a time, and files
written tensor by tensor (``write_file``).

``SafetensorsDir`` reads a directory of safetensors (one ``model.safetensors`` or shards named by
``model.safetensors.index.json``) tensor by tensor with plain file reads (no torch), so host memory
holds only what was asked for; ``mapped`` views a tensor in the mapped file instead, for readers that
copy it at once (to an accelerator) and then ``unmap`` it.  Headers are validated up front (missing shard,
truncated/corrupt file, unsupported dtype) with errors naming the file and tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import xxhash

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
          "U16": np.uint16, "I32": np.int32, "F8_E4M3": ml_dtypes.float8_e4m3fn}
FLOAT_CODES = ("BF16", "F16", "F32")
# every dtype ``write_file`` writes, in the order safetensors' serializer ranks them (it writes
# the tensors by rank, highest first, then by name)
WRITE_CODES = {np.dtype(t): c for c, t in [
    ("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("I16", np.int16), ("U16", np.uint16),
    ("F16", np.float16), ("BF16", ml_dtypes.bfloat16), ("I32", np.int32), ("U32", np.uint32),
    ("F32", np.float32), ("F64", np.float64), ("I64", np.int64), ("U64", np.uint64)]}
MAX_HEADER = 100 << 20


# exponent bits of each float code: all set means Inf or NaN
EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000)}


def count_nonfinite(a: np.ndarray, code: str) -> int:
    """NaN/Inf elements of ``a`` (stored as ``code``), from the exponent bits: one pass over
    integers, much cheaper than ``np.isfinite`` on ml_dtypes bfloat16."""
    int_t, mask = EXPONENT[code]
    bits = a.reshape(-1).view(int_t)
    bad = 0
    for s in range(0, bits.size, 1 << 22):   # bounded temporaries
        bad += int(np.count_nonzero((bits[s:s + (1 << 22)] & int_t(mask)) == int_t(mask)))
    return bad


class ThreadBuffers:
    """One read buffer per thread, grown as needed and reused for every tensor that thread reads:
    no fresh allocation, page faults and unmapping per tensor.  Only for reads whose array is
    copied (e.g. by ``device_put``) before the thread's next read; freed with this object."""

    def __init__(self):
        self._local = threading.local()

    def get(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            self._local.buf = buf = None   # the old one goes before the larger one comes
            self._local.buf = buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes]


class CheckpointError(ValueError):
    """Bad input checkpoint or output directory; the message names the file/tensor at fault."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str          # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header: {name: TensorInfo}."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} "
                                      f"bytes, file of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size, out = size - 8 - n, {}
    for name, h in header.items():
        try:
            dtype, shape, (s, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from err
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                                  f"{', '.join(FLOAT_CODES)}")
        if e > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes "
                                  f"up to {e} of the data section, which has {data_size}")
        if e - s != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize or s < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} of shape "
                                  f"{list(shape)} {dtype} spans {e - s} bytes")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + s, e - s)
    return out


def _refuse_pickles(d: Path):
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
                     or p.name.endswith(".bin.index.json"))
    if pickles:
        raise CheckpointError(f"{d}: found only PyTorch pickle weights ({', '.join(pickles[:3])}); they are "
                              "never unpickled here. Convert them to safetensors first (e.g. load with "
                              "transformers and call model.save_pretrained(dir), which writes safetensors)")


class SafetensorsDir:
    """All tensors of a safetensors checkpoint directory, read lazily one at a time."""

    def __init__(self, d: str | os.PathLike):
        self.dir = Path(d)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index (no valid weight_map)") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                names = [n for n, f in weight_map.items() if f == missing[0]]
                raise CheckpointError(f"{index}: shard {missing[0]} is missing (it should hold "
                                      f"{len(names)} tensors, e.g. {names[0]})")
        elif (self.dir / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            _refuse_pickles(self.dir)
            raise CheckpointError(f"{self.dir}: no {SINGLE} or {INDEX}")
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._maps_lock = threading.Lock()
        for f in files:
            for name, info in read_header(self.dir / f).items():
                if weight_map is not None and weight_map.get(name) != f:
                    continue  # not this file's tensor according to the index
                self.tensors[name] = info
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.tensors]
            if absent:
                raise CheckpointError(f"{self.dir / weight_map[absent[0]]}: tensor {absent[0]!r} named in "
                                      f"{INDEX} is not in the file")

    def read(self, name: str, check_finite: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16).

        ``out``: a C-contiguous array of the tensor's byte size to read into (no copy), e.g. one
        expert's slot of a stacked buffer; the result is a view of it.
        """
        info = self.tensors[name]
        buf = np.empty(info.nbytes, np.uint8) if out is None else out.reshape(-1).view(np.uint8)
        if buf.nbytes != info.nbytes:
            raise ValueError(f"{name}: buffer of {buf.nbytes} bytes for a tensor of {info.nbytes}")
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            view, done = memoryview(buf), 0
            while done < info.nbytes:   # raw reads may return short counts
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
                done += n
        a = buf.view(DTYPES[info.dtype]).reshape(info.shape)
        if check_finite and info.dtype in FLOAT_CODES:
            bad = count_nonfinite(a, info.dtype)
            if bad:
                raise CheckpointError(f"{info.file}: tensor {name!r} has {bad} NaN/Inf values")
        return a

    def mapped(self, name: str) -> np.ndarray:
        """One tensor as a read-only view of its file mapped into memory: no copy, the pages are read
        as they are touched, with read-ahead asked for the whole tensor.  For callers that copy it
        at once (``device_put``) and then call ``unmap``: until then its pages count as this
        process's memory.  No finite check; a file truncated while mapped faults (SIGBUS)."""
        info = self.tensors[name]
        m = self._map(info.file)
        self._advise(info, mmap.MADV_WILLNEED)
        return np.frombuffer(m, np.uint8, info.nbytes, info.start).view(DTYPES[info.dtype]).reshape(info.shape)

    def unmap(self, name: str) -> None:
        """Drop a ``mapped`` tensor's pages from this process (the page cache keeps them; touching
        the view again reads them back)."""
        self._advise(self.tensors[name], mmap.MADV_DONTNEED)

    def _advise(self, info: TensorInfo, advice: int) -> None:
        """``madvise`` the pages that hold a tensor (from the page its first byte is on)."""
        if info.nbytes:
            lo = info.start - info.start % mmap.PAGESIZE
            self._map(info.file).madvise(advice, lo, info.start + info.nbytes - lo)

    def _map(self, path: Path) -> mmap.mmap:
        with self._maps_lock:
            m = self._maps.get(path)
            if m is None:
                try:
                    with open(path, "rb") as f:
                        m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot map ({e.strerror})") from e
            return m

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        return sum(self.tensors[n].nbytes for n in (self.tensors if names is None else names))


def write_file(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
               check: Callable[[str, np.ndarray], None] | None = None, release: bool = False) -> str:
    """Write ``tensors`` (numpy or jax arrays) as one safetensors file, byte for byte what
    ``safetensors.numpy.save_file`` writes, but straight from each tensor's buffer with one large
    write per tensor (save_file first copies the whole file into memory).  Each tensor is fetched
    with ``np.asarray`` only when its turn comes (a jax array's copy to the host starts while the
    one before it is written, so at most two are on the host) and
    passed to ``check(name, array)`` before it is written; with ``release`` it is then deleted from
    ``tensors`` (a dict), so its host copy can go before the next one is fetched.  Returns the
    file's xxh3_64 (hex)."""
    def code(name, a):
        c = WRITE_CODES.get(np.dtype(a.dtype))
        if c is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
        return c
    rank = list(WRITE_CODES.values())
    order = sorted(tensors, key=lambda n: (-rank.index(code(n, tensors[n])), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for n in order:
        a = tensors[n]
        size = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        header[n] = {"dtype": code(n, a), "shape": list(a.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    h = xxhash.xxh3_64()
    with open(path, "wb", buffering=0) as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            h.update(chunk)
        def start_copy(k):   # a jax array's copy to the host, while the one before it is written
            if k < len(order) and hasattr(tensors[order[k]], "copy_to_host_async"):
                tensors[order[k]].copy_to_host_async()
        start_copy(0)
        for k, n in enumerate(order):
            start_copy(k + 1)
            a = np.ascontiguousarray(np.asarray(tensors[n]))
            if check is not None:
                check(n, a)
            view = memoryview(a.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):   # raw writes may be short
                done += f.write(view[done:])
            h.update(view)
            if release:
                del tensors[n], a, view
    return h.hexdigest()
