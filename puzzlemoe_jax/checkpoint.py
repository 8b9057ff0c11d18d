"""Our checkpoint format: HF -> Flax conversion, ``save_pretrained`` and ``load_pretrained``.

* ``convert_checkpoint`` converts layer by layer (experts merged and packed when ``ratio > 0``)
  into a temp directory that is renamed into place only when everything succeeded.
* ``save_pretrained`` writes an in-memory model in the same format.
* ``load_pretrained`` rebuilds the model from a converted directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import xxhash
from filelock import FileLock, Timeout
from flax import nnx
from safetensors.numpy import save_file

from kernels import resolve_impl
from puzzlemoe_jax import codec
from puzzlemoe_jax.config import ARCHS, ConfigError, ModelConfig
from puzzlemoe_jax.experts import MATRICES
from puzzlemoe_jax.hf_layout import check_plan, hf_plan, read_experts, read_items
from puzzlemoe_jax.merge import MergeConfig
from puzzlemoe_jax.models import CausalLM, PackedExpertsModule
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.pairing import pairs_for_ratio
from puzzlemoe_jax.report import ConvertReport, LayerReport
from puzzlemoe_jax.safetensors_io import INDEX, CheckpointError, SafetensorsDir

FORMAT_VERSION = 1
# files of an HF checkpoint directory that the converted model keeps (tokenizer, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")
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
    if a.dtype in FLOAT_DTYPES and not np.isfinite(a.astype(np.float32)).all():
        raise CheckpointError(f"{where}: tensor {name!r} has non-finite values in {a.dtype} "
                              f"(overflow after the dtype cast? try --dtype bfloat16 or float32)")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


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
            self._old_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        try:
            if self.out.exists() and not self.overwrite:   # created while we waited for the lock
                raise CheckpointError(f"{self.out}: output directory already exists (pass --overwrite to replace it)")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except BaseException:
            self.__exit__(None)
            raise
        return self

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

    def write_shard(self, tensors: Mapping[str, np.ndarray]) -> None:
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        for k, v in tensors.items():
            _check_finite(k, v, str(self.out))
        check_expert_ids(tensors, str(self.out))
        save_file(tensors, self.tmp / name, metadata={"format": "flax"})
        self._written(self.tmp / name)
        self.hashes[name] = file_hash(self.tmp / name)
        self.weight_map.update({k: name for k in tensors})
        self.nbytes += sum(v.nbytes for v in tensors.values())

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


def _np(a) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def flat_params(model: CausalLM) -> dict[str, np.ndarray]:
    """Model state as ``{"layers.0.attn.q_proj.kernel": array}`` (our checkpoint names); layers in
    the Mosaic layout (``CausalLM.use_mosaic``) give their ``packed_*`` [P, K, N] words, as stored."""
    flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model))}
    for path in [p for p in flat if p.endswith(".mosaic_gate_up")]:
        prefix = path[: -len("mosaic_gate_up")]
        del flat[prefix + "mosaic_gate_up"], flat[prefix + "mosaic_down"]
        module = model.moe_layers()[int(prefix.split(".")[1])].experts
        flat.update({prefix + "packed_" + n: w for n, w in module.weights().packed.items()})
    return {k: _np(v[...]) for k, v in flat.items()}


def compressed_layers_of(model: CausalLM) -> dict[str, dict[str, int]]:
    """Config-section entries: {layer: merged pairs} and {layer: dropped experts} of packed layers."""
    packed = {i: m.experts for i, m in model.moe_layers().items() if isinstance(m.experts, PackedExpertsModule)}
    return {"packed_pairs": {str(i): int(x.pairs.shape[0]) for i, x in packed.items()},
            "dropped_experts": {str(i): int(x.dropped_ids.shape[0]) for i, x in packed.items()}}


def save_pretrained(model: CausalLM, out_dir, hf_config: Mapping[str, Any], puzzlemoe: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Save an in-memory model (dense or packed layers) in the ``load_pretrained`` format."""
    params = flat_params(model)
    dtype = str(model.embed[...].dtype)
    section = {"format_version": FORMAT_VERSION, "dtype": dtype, "layout_version": codec.LAYOUT_VERSION,
               **compressed_layers_of(model), **(puzzlemoe or {})}
    with CheckpointWriter(out_dir, overwrite) as w:
        for L in range(model.config.num_layers):
            w.write_shard({k: v for k, v in params.items() if k.startswith(f"layers.{L}.")})
        w.write_shard({k: v for k, v in params.items() if not k.startswith("layers.")})
        return w.finish({**hf_config, "puzzlemoe": section})


def read_config(path) -> tuple[dict, ModelConfig]:
    """(config.json dict, ModelConfig) of a converted directory; every mistake a CheckpointError
    naming the file (and the key)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot read ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
    section = hf.get("puzzlemoe")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path / 'config.json'}: no 'puzzlemoe' section; convert the Hugging Face "
                              f"checkpoint first: python -m convert {hf.get('model_type', '<arch>')} --src DIR --out DIR")
    if section.get("format_version") != FORMAT_VERSION or section.get("layout_version") != codec.LAYOUT_VERSION:
        raise CheckpointError(f"{path}: format {section.get('format_version')} / bit layout "
                              f"{section.get('layout_version')} not supported (need {FORMAT_VERSION} / {codec.LAYOUT_VERSION})")
    try:
        return hf, ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e


def verify_hashes(path: Path) -> None:
    """Compare every shard with the xxh3_64 the converter recorded; names the first bad shard.
    Checkpoints written before hashes were recorded have none and pass."""
    try:
        meta = json.loads((path / INDEX).read_text()).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return   # SafetensorsDir reports a missing or broken index
    for name, want in (meta.get(HASHES) or {}).items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: shard listed in {INDEX} is missing")
        if file_hash(path / name) != want:
            raise CheckpointError(f"{path / name}: content hash differs from the one recorded at conversion "
                                  f"(corrupted or modified); convert again, or pass --no-verify to load anyway")


def load_pretrained(path, *, impl: str = "auto", interpret: bool = False, verify: bool = True) -> CausalLM:
    """Load a directory written by ``python -m convert`` (or ``save_pretrained``) as a CausalLM.
    ``impl``/``interpret``: as ``CausalLM.set_impl`` ("mosaic" also re-lays the packed words out).
    ``verify``: check each shard's recorded hash first (expert-id tensors are always range-checked)."""
    path = Path(path)
    hf, cfg = read_config(path)
    section = hf["puzzlemoe"]
    if verify:
        verify_hashes(path)
    dtype = jnp.dtype(section["dtype"])
    packed = {int(k): int(v) for k, v in section.get("packed_pairs", {}).items()}
    dropped = {int(k): int(v) for k, v in section.get("dropped_experts", {}).items()}
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, packed_pairs=packed, dropped_experts=dropped,
                                               impl=impl, interpret=interpret))
    graphdef, state = nnx.split(abstract)
    ckpt = SafetensorsDir(path)
    flat, ids = {}, {}
    for key, var in nnx.to_flat_state(state):
        name, want = ".".join(map(str, key)), var.get_value()
        if name not in ckpt.tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected {list(want.shape)} {want.dtype})")
        a = ckpt.read(name)
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(f"{ckpt.tensors[name].file}: tensor {name!r} is {list(a.shape)} {a.dtype}, "
                                  f"expected {list(want.shape)} {want.dtype}")
        if name.rsplit(".", 1)[-1] in ID_TENSORS:
            ids[name] = a
        flat[key] = jnp.asarray(a)
    check_expert_ids(ids, str(path))
    extra = sorted(set(ckpt.tensors) - {".".join(map(str, k)) for k in flat})
    if extra:
        raise CheckpointError(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]!r}")
    pure = {}
    for key, a in flat.items():
        node = pure
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = a
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    if resolve_impl(impl, interpret=interpret) == "mosaic":
        del state, pure, flat   # the [K, N] words must be freed layer by layer as use_mosaic replaces them
        model.use_mosaic()
    return model


def load_hf_config(src: Path) -> dict:
    try:
        return json.loads((src / "config.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{src}: no config.json") from e
    except ValueError as e:
        raise CheckpointError(f"{src / 'config.json'}: not valid JSON ({e})") from e


def convert_checkpoint(src, out, arch: str, *, ratio: float = 0.0, merge: MergeConfig = MergeConfig(),
                       dtype: str = "auto", overwrite: bool = False,
                       progress: Callable[[Iterable], Iterable] = lambda it: it,
                       calibration: Mapping[int, Mapping[str, Any]] | None = None) -> ConvertReport:
    """Convert an HF safetensors checkpoint of ``arch`` to our format, one layer at a time.

    ``ratio`` 0 keeps every expert dense; ``ratio`` r in (0, 0.5] merges r*E pairs per MoE layer
    into packed uint16 words (or, for ``merge.method == "drop"``, drops r*E experts).
    ``dtype`` "auto" keeps the checkpoint's float dtype.  ``calibration`` maps MoE layers to
    ``{"frequencies": [E], "importance": {name: [E, K]}}`` (``puzzlemoe_jax.calibrate``), needed
    by activation saliency and the frequency/drop baselines.
    """
    t0 = time.perf_counter()
    src = Path(src)
    if not 0.0 <= ratio <= 0.5:
        raise CheckpointError(f"--ratio must be in [0, 0.5] (pairwise merging saves at most half), got {ratio}")
    hf = load_hf_config(src)
    if hf.get("model_type") != arch:
        if hf.get("model_type") in ARCHS:
            raise CheckpointError(f"{src / 'config.json'}: model_type is {hf['model_type']!r}, not {arch!r}; "
                                  f"use: python -m convert {hf['model_type']}")
    try:
        cfg = ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from e
    ckpt = SafetensorsDir(src)
    plan = hf_plan(cfg, ckpt.tensors)
    check_plan(plan, ckpt, arch)
    if dtype == "auto":
        codes = {ckpt.tensors[it.src].dtype for it in plan.head}
        dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[sorted(codes)[0]]
    if dtype not in DTYPE_NAMES:
        raise CheckpointError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    np_dtype = DTYPE_NAMES[dtype]
    reports, pairs_of, dropped_of, pairs_list = [], {}, {}, {}
    with CheckpointWriter(out, overwrite) as w:
        for L in progress(range(cfg.num_layers)):
            items, experts = plan.layers[L]
            tensors = read_items(ckpt, items, np_dtype)
            if experts is None:
                reports.append(LayerReport(L, "dense-mlp"))
            else:
                rep = LayerReport(L, "experts", expert_bytes_in=ckpt.nbytes(experts.sources()))
                weights = read_experts(ckpt, experts, np_dtype)
                if pairs_for_ratio(experts.num_experts, ratio):
                    cal = (calibration or {}).get(L, {})
                    packed, stats = compress_layer(weights, ratio, merge, importance=cal.get("importance"),
                                                   frequencies=cal.get("frequencies"), chunk_elems=1 << 22,
                                                   calibration=cal, layer=L)
                    del weights
                    p, d = int(packed.pairs.shape[0]), int(packed.dropped_ids.shape[0])
                    pairs_of[L], dropped_of[L], pairs_list[L] = p, d, packed.pairs.tolist()
                    tensors[experts.dst + ".pairs"] = packed.pairs
                    tensors[experts.dst + ".dense_ids"] = packed.dense_ids
                    tensors[experts.dst + ".dropped_ids"] = packed.dropped_ids
                    for n in MATRICES:
                        tensors[f"{experts.dst}.packed_{n}"] = packed.packed[n]
                        tensors[f"{experts.dst}.dense_{n}"] = packed.dense[n]
                    del packed
                    rep.kind, rep.pairs, rep.dropped, rep.stats = "packed", p, d, stats
                    if not p and not d:   # weight-editing baselines (hc-smoe, wanda-2:4): plain dense experts
                        for n in MATRICES:
                            del tensors[f"{experts.dst}.packed_{n}"]
                            tensors[f"{experts.dst}.{n}"] = tensors.pop(f"{experts.dst}.dense_{n}")
                        for t in ID_TENSORS:
                            del tensors[f"{experts.dst}.{t}"]
                        rep.kind = "experts"
                    if p:
                        rep.frac_similar = float(np.mean([stats[n]["frac_similar"] for n in MATRICES]))
                        rep.rel_err = float(np.mean([np.concatenate([stats[n]["rel_err_i"], stats[n]["rel_err_j"]])
                                                     for n in MATRICES]))
                else:
                    tensors.update({f"{experts.dst}.{n}": weights[n] for n in MATRICES})
                    del weights
                rep.expert_bytes_out = sum(v.nbytes for k, v in tensors.items() if k.startswith(experts.dst + "."))
                reports.append(rep)
            w.write_shard(tensors)
            del tensors
        w.write_shard(read_items(ckpt, plan.head, np_dtype))
        section = {
            "format_version": FORMAT_VERSION, "ratio": ratio, "dtype": dtype,
            "layout_version": codec.LAYOUT_VERSION, "layout": codec.LAYOUT,
            "merge": dataclasses.asdict(merge), "pairing": merge.pairing,
            "packed_pairs": {str(k): v for k, v in pairs_of.items()},
            "dropped_experts": {str(k): v for k, v in dropped_of.items()},
            "pairs": {str(k): v for k, v in pairs_list.items()},
            "source": {"dtype": sorted({i.dtype for i in ckpt.tensors.values()}), "bytes": ckpt.nbytes()},
        }
        bytes_out = w.nbytes
        w.copy_files(src, SIDE_FILES)
        w.finish({**hf, "puzzlemoe": section})
    return ConvertReport(Path(out), arch, ratio, dtype, ckpt.nbytes(), bytes_out,
                         sum(r.expert_bytes_in for r in reports), sum(r.expert_bytes_out for r in reports),
                         time.perf_counter() - t0, reports)
