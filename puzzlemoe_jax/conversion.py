"""HF safetensors checkpoint -> our checkpoint format, one layer at a time (``convert_checkpoint``).

Experts are merged and packed when ``ratio > 0``; the output goes through a ``writer.CheckpointWriter``
(a temp directory renamed into place only when complete).  This module does not import the model
(Flax) or the kernels: ``python -m convert`` starts without them.
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

from puzzlemoe_jax import codec, fp8
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.config import CLI_ARCHS, ConfigError, ModelConfig, canonical_arch
from puzzlemoe_jax.experts import MATRICES
from puzzlemoe_jax.hf_layout import (READ_MODES, check_plan, device_reader, experts_to_flax, hf_plan, raise_nonfinite,
                                     read_experts, read_experts_raw, read_items)
from puzzlemoe_jax.merge import MergeConfig
from puzzlemoe_jax.pairing import pairs_for_ratio
from puzzlemoe_jax.report import ConvertReport, LayerReport
from puzzlemoe_jax.safetensors_io import DTYPES, CheckpointError, SafetensorsDir
from puzzlemoe_jax.writer import DTYPE_NAMES, FORMAT_VERSION, ID_TENSORS, CheckpointWriter

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
            pairs_of[L], dropped_of[L], pairs_list[L] = p, d, np.asarray(packed.pairs).tolist()
            tensors[experts.dst + ".pairs"] = np.asarray(packed.pairs)
            tensors[experts.dst + ".dense_ids"] = np.asarray(packed.dense_ids)
            tensors[experts.dst + ".dropped_ids"] = np.asarray(packed.dropped_ids)
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
