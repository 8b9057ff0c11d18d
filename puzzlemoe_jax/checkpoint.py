"""Our checkpoint format: HF -> Flax conversion, ``save_pretrained`` and ``load_pretrained``.

* ``convert_checkpoint`` converts layer by layer (experts merged and packed when ``ratio > 0``)
  through a ``writer.CheckpointWriter`` (a temp directory renamed into place only when complete).
* ``save_pretrained`` writes an in-memory model in the same format.
* ``load_pretrained`` rebuilds the model from a converted directory.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import resolve_impl
from puzzlemoe_jax import codec, fp8
from puzzlemoe_jax.config import CLI_ARCHS, ConfigError, ModelConfig, canonical_arch
from puzzlemoe_jax.experts import MATRICES
from puzzlemoe_jax.hf_layout import (READ_MODES, check_plan, device_reader, experts_to_flax, hf_plan, raise_nonfinite,
                                     read_experts, read_experts_raw, read_items)
from puzzlemoe_jax.merge import MergeConfig
from puzzlemoe_jax.models import CausalLM, PackedExpertsModule
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.pairing import pairs_for_ratio
from puzzlemoe_jax.report import ConvertReport, LayerReport
from puzzlemoe_jax.safetensors_io import DTYPES, INDEX, CheckpointError, SafetensorsDir
from puzzlemoe_jax.writer import DTYPE_NAMES, HASHES, ID_TENSORS, CheckpointWriter, check_expert_ids, file_hash

FORMAT_VERSION = 1
# files of an HF checkpoint directory that the converted model keeps (tokenizer, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")


class StageTimer:
    """Seconds spent in each named stage, summed over threads (stages overlap in the pipeline)."""

    def __init__(self):
        self.seconds, self._lock = defaultdict(float), threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - t


def read_ahead(jobs, ckpt: SafetensorsDir) -> int:
    """Layers the device path reads ahead of the merge (the reads go on while the first merge
    waits for its compile; host memory holds only the reads in flight): up to four, as long as
    those layers' experts take at most an eighth of the device memory, at least one."""
    largest = max((ckpt.nbytes(ex.sources()) for _, _, ex in jobs if ex is not None), default=0)
    stats = jax.local_devices()[0].memory_stats() or {}
    return max(1, min(4, stats.get("bytes_limit", 0) // max(1, 8 * largest)))


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
                       calibration: Mapping[int, Mapping[str, Any]] | None = None,
                       pipeline: bool = True, read_threads: int = 8, device_layout: bool | None = None,
                       warm_up: bool | None = None, read_mode: str = "map") -> ConvertReport:
    """Convert an HF safetensors checkpoint of ``arch`` to our format, one layer at a time.

    ``ratio`` 0 keeps every expert dense; ``ratio`` r in (0, 0.5] merges r*E pairs per MoE layer
    into packed uint16 words (or, for ``merge.method == "drop"``, drops r*E experts).
    ``dtype`` "auto" keeps the checkpoint's float dtype.  ``calibration`` maps MoE layers to
    ``{"frequencies": [E], "importance": {name: [E, K]}}`` (``puzzlemoe_jax.calibrate``), needed
    by activation saliency and the frequency/drop baselines.

    ``pipeline`` (default): a reader thread reads the next layer (experts with ``read_threads``
    concurrent reads into stacked buffers, the layer's other tensors on one more thread beside
    them) while this thread transposes, casts and merges the
    current one where jax runs, and a writer thread writes the previous one.  With
    ``device_layout`` (default on an accelerator) each expert matrix goes to the device as soon as
    it is read, everything up to the packed words stays there, and the writer fetches the results
    one tensor at a time (the next one copying while one is written); ``warm_up`` (default
    likewise) compiles that path on a zero layer of the same shapes while the first layer is read.  ``read_mode`` says how the device
    path reads an expert tensor (``hf_layout.device_reader``: from the mapped file by default).
    ``pipeline=False``
    is the plain one-thread host path (numpy stacking), kept as the oracle the pipeline's output
    is tested against bit for bit.  ``progress`` wraps the list of ``(layer, input bytes)`` steps
    (the last step, layer None, is the embeddings and head).
    """
    t0 = time.perf_counter()
    src = Path(src)
    if not 0.0 <= ratio <= 0.5:
        raise CheckpointError(f"--ratio must be in [0, 0.5] (pairwise merging saves at most half), got {ratio}")
    hf = load_hf_config(src)
    if canonical_arch(hf.get("model_type")) != canonical_arch(arch):
        if hf.get("model_type") in CLI_ARCHS:
            raise CheckpointError(f"{src / 'config.json'}: model_type is {hf['model_type']!r}, not {arch!r}; "
                                  f"use: python -m convert {hf['model_type']}")
    try:
        cfg = ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from e
    ckpt = SafetensorsDir(src)
    plan = hf_plan(cfg, ckpt.tensors)
    check_plan(plan, ckpt, arch)
    ckpt = fp8.dequantizing(ckpt, plan.scales) if plan.scales else ckpt   # FP8 weights read dequantized
    if dtype == "auto":
        codes = {ckpt.tensors[it.src].dtype for it in plan.head}
        dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[sorted(codes)[0]]
    if dtype not in DTYPE_NAMES:
        raise CheckpointError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    np_dtype = DTYPE_NAMES[dtype]
    jobs = [(L, *plan.layers[L]) for L in range(cfg.num_layers)] + [(None, plan.head, None)]
    steps = [(L, ckpt.nbytes([it.src for it in items] + list(ex.sources() if ex else ()))) for L, items, ex in jobs]
    reports, pairs_of, dropped_of, pairs_list = [], {}, {}, {}
    timer = StageTimer()
    on_cpu = jax.default_backend() == "cpu"
    chunk = 1 << 22 if on_cpu else 1 << 26
    device_layout = (pipeline and not on_cpu) if device_layout is None else device_layout
    device_layout = device_layout and not plan.scales   # FP8 weights are read through the dequantizing wrapper
    warm_up = (device_layout and not on_cpu) if warm_up is None else warm_up and device_layout
    warm_up = warm_up and calibration is None and not merge.needs_calibration
    if read_mode not in READ_MODES:
        raise CheckpointError(f"--read-mode must be one of {', '.join(READ_MODES)}, got {read_mode!r}")
    if read_threads < 1:
        raise CheckpointError(f"--read-threads must be at least 1, got {read_threads}")
    read_tensor = device_reader(ckpt, read_mode) if device_layout else None

    def read(job):  # reader stage: host arrays of one layer (or the head)
        L, items, experts = job
        with timer("read"):
            # the other tensors (host transposes) on their own thread, beside the expert reads
            others = items_pool.submit(read_others, items) if items_pool else None
            tensors = None if others else read_items(ckpt, items, np_dtype)
            try:
                raw = read_experts_raw(ckpt, experts, read_tensor, io_pool) if experts is not None and device_layout else None
                is_raw = raw is not None
                if experts is not None and raw is None:
                    raw = read_experts(ckpt, experts, np_dtype)
            except Exception:
                if others:
                    others.result()   # their error first, as the one-thread order raises it
                raise
            return [others.result() if others else tensors, raw, is_raw]

    def read_others(items):  # the layer's other tensors (host transposes), beside its experts
        with timer("read others"):
            return read_items(ckpt, items, np_dtype)

    def compile_on_zeros(job):  # warm-up: the device path of one MoE layer on zeros of its shapes
        L, _, experts = job
        zeros = lambda name: jnp.zeros(ckpt.tensors[name].shape, DTYPES[ckpt.tensors[name].dtype])
        raw = ({m: [zeros(n) for n in names] for m, names in experts.per_expert.items()} if experts.per_expert
               else dict(zip(("gate_up", "w_down"), map(zeros, experts.fused))))   # as read_experts_raw gives
        weights, _ = experts_to_flax(raw, jnp.dtype(np_dtype))
        if pairs_for_ratio(experts.num_experts, ratio):
            jax.block_until_ready(compress_layer(weights, ratio, merge, chunk_elems=chunk, layer=L))

    def compress(job, data):  # merge stage: experts -> tensors to write
        L, _, experts = job
        tensors, raw, is_raw = data
        data.clear()  # the stored-layout buffers go as soon as they are on the device
        if L is None:
            return tensors
        if experts is None:
            reports.append(LayerReport(L, "dense-mlp"))
            return tensors
        rep = LayerReport(L, "experts", expert_bytes_in=ckpt.nbytes(experts.sources()))
        weights = raw
        if is_raw:  # stored layout -> ours, on the device
            weights, bad = experts_to_flax(raw, jnp.dtype(np_dtype))
            del raw
            if any(int(v) for v in bad.values()):
                raise_nonfinite(ckpt, experts)
        if pairs_for_ratio(experts.num_experts, ratio):
            cal = (calibration or {}).get(L, {})
            packed, stats = compress_layer(weights, ratio, merge, importance=cal.get("importance"),
                                           frequencies=cal.get("frequencies"), chunk_elems=chunk,
                                           calibration=cal, layer=L)
            del weights
            p, d = int(packed.pairs.shape[0]), int(packed.dropped_ids.shape[0])
            pairs_of[L], dropped_of[L], pairs_list[L] = p, d, _np(packed.pairs).tolist()
            tensors[experts.dst + ".pairs"] = _np(packed.pairs)
            tensors[experts.dst + ".dense_ids"] = _np(packed.dense_ids)
            tensors[experts.dst + ".dropped_ids"] = _np(packed.dropped_ids)
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
        return tensors

    def write(tensors):  # writer stage
        with timer("write"):
            w.write_shard(tensors)

    with CheckpointWriter(out, overwrite) as w:
        # at most three layers in host memory: one being read, one merging, one being written (with
        # device_layout only the reads in flight and the results of two layers: merged, being written;
        # the layers read ahead are on the device)
        ahead = read_ahead(jobs, ckpt) if device_layout else 1
        # reads ahead, the warm-up compile and the writer each on their own thread
        stages = ThreadPoolExecutor(ahead + 2, thread_name_prefix="convert-stage") if pipeline else None
        io_pool = (ThreadPoolExecutor(read_threads, thread_name_prefix="read-experts")
                   if pipeline and read_threads > 1 else None)
        items_pool = ThreadPoolExecutor(1, thread_name_prefix="read-others") if pipeline else None
        try:
            reading = collections.deque(stages.submit(read, job) for job in jobs[:ahead]) if pipeline else None
            first_moe = next((job for job in jobs if job[2] is not None), None)
            warming = stages.submit(compile_on_zeros, first_moe) if warm_up and pipeline and first_moe else None
            writing = None
            for k, _ in enumerate(progress(steps)):
                if pipeline:
                    with timer("wait read"):
                        data = reading.popleft().result()
                    if k + ahead < len(jobs):
                        reading.append(stages.submit(read, jobs[k + ahead]))
                else:
                    data = read(jobs[k])
                if warming and jobs[k][2] is not None:
                    with timer("wait warm-up"):
                        warming = warming.result()
                with timer("merge"):
                    tensors = compress(jobs[k], data)
                if pipeline:
                    with timer("wait write"):
                        writing = writing and writing.result()
                    writing = stages.submit(write, tensors)
                else:
                    write(tensors)
                del tensors
            if writing:
                writing.result()
        finally:
            for pool in (stages, io_pool, items_pool):
                if pool:
                    pool.shutdown(wait=True, cancel_futures=True)
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
        w.finish({**{k: v for k, v in hf.items() if k != "quantization_config"}, "puzzlemoe": section})
    reports.sort(key=lambda r: r.layer)
    return ConvertReport(Path(out), arch, ratio, dtype, ckpt.nbytes(), bytes_out,
                         sum(r.expert_bytes_in for r in reports), sum(r.expert_bytes_out for r in reports),
                         time.perf_counter() - t0, reports, dict(timer.seconds))
