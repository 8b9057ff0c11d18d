"""Writing our checkpoint directory safely: shards into a temp sibling of the output, renamed into
place only when complete; a lock against a second writer; cleanup on errors, SIGINT and SIGTERM;
finite and expert-id checks on what is written; the user's umask; a content hash of every shard."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
import xxhash
from filelock import FileLock, Timeout
from puzzlemoe_jax.safetensors_io import EXPONENT, INDEX, WRITE_CODES, CheckpointError, count_nonfinite, write_file

# the version of the config.json "puzzlemoe" section and tensor names that converters and
# save_pretrained write and load_pretrained accepts
FORMAT_VERSION = 1
DTYPE_NAMES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
FLOAT_DTYPES = {np.dtype(t) for t in (*DTYPE_NAMES.values(), np.float64)}


HASHES = "puzzlemoe_hashes"   # index metadata: {shard file: xxh3_64 hex of its bytes}
ID_TENSORS = ("pairs", "dense_ids", "dropped_ids")


def file_hash(path: Path) -> str:
    """xxh3_64 of a file's bytes (hex); fast enough to run on every shard at write and load."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def check_expert_ids(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Each packed layer's ``pairs``/``dense_ids``/``dropped_ids`` must together hold every expert
    0..E-1 exactly once (E = their total count); names the first bad tensor."""
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in ID_TENSORS})
    for prefix in prefixes:
        parts = {n: tensors.get(f"{prefix}.{n}") for n in ID_TENSORS}
        missing = [n for n, a in parts.items() if a is None]
        if missing:
            raise CheckpointError(f"{where}: {prefix}.{missing[0]} is missing")
        e = sum(int(a.size) for a in parts.values())
        seen: set[int] = set()
        for n, a in parts.items():
            ids = np.asarray(a).reshape(-1)
            if not np.issubdtype(ids.dtype, np.integer):
                raise CheckpointError(f"{where}: {prefix}.{n} has dtype {ids.dtype}, expected integers")
            bad = ids[(ids < 0) | (ids >= e)]
            if bad.size:
                raise CheckpointError(f"{where}: {prefix}.{n} holds expert {int(bad[0])}, outside [0, {e})")
            for i in ids.tolist():
                if i in seen:
                    raise CheckpointError(f"{where}: {prefix}.{n} repeats expert {i}")
                seen.add(i)


def _check_finite(name: str, a: np.ndarray, where: str) -> None:
    code = WRITE_CODES.get(a.dtype)
    bad = (count_nonfinite(a, code) if code in EXPONENT else
           int(np.count_nonzero(~np.isfinite(a))) if a.dtype in FLOAT_DTYPES else 0)
    if bad:
        raise CheckpointError(f"{where}: tensor {name!r} has non-finite values in {a.dtype} "
                              f"(overflow after the dtype cast? try --dtype bfloat16 or float32)")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


class CheckpointWriter:
    """Writes shards into a temp sibling of ``out_dir``; ``finish`` renames it into place.

    Used as a context manager, it holds a lock on ``.OUT.lock`` (a second writer to the same
    output fails fast) and removes the temp directory on any exception, SIGINT or SIGTERM, so a
    failed or killed conversion leaves nothing behind.  Every float tensor is checked finite,
    expert-id tensors are range-checked, files get the user's umask, and each shard's xxh3_64
    goes into the index metadata (``load_pretrained`` verifies it).
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out_dir).resolve()
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out}: output directory already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self.lock = FileLock(self.out.parent / f".{self.out.name}.lock", timeout=0)
        self.mode = 0o666 & ~_umask()
        self.weight_map: dict[str, str] = {}
        self.hashes: dict[str, str] = {}
        self.nbytes = 0
        self._old_handler = None

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise CheckpointError(f"{self.out}: another conversion is writing this output "
                                  f"(lock {self.lock.lock_file} is held); wait for it or choose another --out") from None
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.out.exists() and not self.overwrite:   # created while we waited for the lock
                raise CheckpointError(f"{self.out}: output directory already exists (pass --overwrite to replace it)")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except BaseException:
            self.__exit__(None)
            raise
        return self

    def _on_sigterm(self, signum, frame):
        """Remove the partial output and the lock, then exit at once: an exception raised from a
        signal handler can be swallowed (e.g. inside a finalizer), leaving the output behind."""
        trash = self.tmp.with_name(self.tmp.name + "-killed")
        try:
            self.tmp.rename(trash)   # writer threads now fail to create files in it
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        Path(self.lock.lock_file).unlink(missing_ok=True)
        os._exit(128 + signum)

    def __exit__(self, exc_type, *_):
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
                self._old_handler = None
            Path(self.lock.lock_file).unlink(missing_ok=True)   # unlinked while held: no stale lock file
            self.lock.release()
        return False

    def _written(self, path: Path) -> None:
        os.chmod(path, self.mode)

    def write_shard(self, tensors: dict[str, Any]) -> None:
        """Write one shard of numpy or jax arrays, emptying ``tensors``: each is fetched to the host
        only when written (a device array's copy starts while the one before it is written) and
        dropped once written, so the shard never sits whole in host memory."""
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        check_expert_ids({k: np.asarray(v) for k, v in tensors.items() if k.rsplit(".", 1)[-1] in ID_TENSORS},
                         str(self.out))
        names, nbytes = list(tensors), sum(int(v.nbytes) for v in tensors.values())
        self.hashes[name] = write_file(self.tmp / name, tensors, {"format": "flax"},
                                       check=lambda k, v: _check_finite(k, v, str(self.out)), release=True)
        self._written(self.tmp / name)
        self.weight_map.update({k: name for k in names})
        self.nbytes += nbytes

    def copy_files(self, src: Path, names: Iterable[str]) -> None:
        """Copy the files of ``names`` that exist in ``src`` (tokenizer, generation config) as they are."""
        for name in names:
            if (src / name).is_file():
                shutil.copyfile(src / name, self.tmp / name)
                self._written(self.tmp / name)

    def finish(self, config: Mapping[str, Any]) -> Path:
        (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": self.nbytes, HASHES: self.hashes},
                                                  "weight_map": self.weight_map}, indent=1))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in (INDEX, "config.json"):
            self._written(self.tmp / f)
        os.chmod(self.tmp, 0o777 & ~_umask())
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise CheckpointError(f"{self.out}: output directory appeared during the conversion (not replaced)")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out
