"""Checkpoints: streaming safetensors reading, HF -> Flax conversion, saving and ``load_pretrained``.

* ``SafetensorsDir`` reads a directory of safetensors (one ``model.safetensors`` or shards named by
  ``model.safetensors.index.json``) tensor by tensor with plain file reads: no torch, no mmap, so
  host memory holds only what was asked for.  Headers are validated up front (missing shard,
  truncated/corrupt file, unsupported dtype) with errors naming the file and tensor.
* ``hf_plan`` maps a Hugging Face checkpoint of one of ``models.ARCHS`` onto our parameter names
  (the NNX state paths of ``models.CausalLM`` joined with "."), and checks every name and shape
  against the config before anything is converted.
* ``convert_checkpoint`` converts layer by layer (experts merged and packed when ``ratio > 0``)
  into a temp directory that is renamed into place only when everything succeeded.
* ``load_pretrained`` rebuilds the model from a converted directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from kernels import resolve_impl
from puzzlemoe_jax import codec
from puzzlemoe_jax.merge import MATRICES, MergeConfig, compress_layer, pairs_for_ratio
from puzzlemoe_jax.models import ARCHS, CausalLM, ConfigError, ModelConfig, PackedExpertsModule

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FORMAT_VERSION = 1
# files of an HF checkpoint directory that the converted model keeps (tokenizer, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")
DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
          "U16": np.uint16, "I32": np.int32}
DTYPE_NAMES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
FLOAT_CODES = ("BF16", "F16", "F32")
MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """Bad input checkpoint or output directory; the message names the file/tensor at fault."""


# ----------------------------------------------------------------------------------------------
# Reading


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

    def read(self, name: str, check_finite: bool = True) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16)."""
        info = self.tensors[name]
        buf = np.empty(info.nbytes, np.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != info.nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        a = buf.view(DTYPES[info.dtype]).reshape(info.shape)
        if check_finite and info.dtype in FLOAT_CODES and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{info.file}: tensor {name!r} has {bad} NaN/Inf values")
        return a

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        return sum(self.tensors[n].nbytes for n in (self.tensors if names is None else names))


# ----------------------------------------------------------------------------------------------
# HF name/shape plan


@dataclasses.dataclass(frozen=True)
class Item:
    """One HF tensor -> one of our parameters (transposed for torch ``[out, in]`` kernels)."""
    src: str
    dst: str
    shape: tuple[int, ...]   # expected HF shape
    transpose: bool


@dataclasses.dataclass(frozen=True)
class ExpertsItem:
    """One MoE layer's routed experts: per-expert Hub tensors or the fused v5 pair."""
    dst: str                                  # e.g. "layers.3.mlp.experts"
    per_expert: Mapping[str, tuple[str, ...]] | None   # our matrix name -> E HF names
    fused: tuple[str, str] | None             # (gate_up_proj [E,2I,H], down_proj [E,H,I])
    num_experts: int
    hidden: int
    inter: int

    def sources(self) -> dict[str, tuple[int, ...]]:
        e, h, i = self.num_experts, self.hidden, self.inter
        if self.fused:
            return {self.fused[0]: (e, 2 * i, h), self.fused[1]: (e, h, i)}
        shape = {"w_gate": (i, h), "w_up": (i, h), "w_down": (h, i)}
        return {n: shape[m] for m, names in self.per_expert.items() for n in names}


@dataclasses.dataclass
class Plan:
    head: list[Item]                      # embeddings, final norm, lm_head
    layers: list[tuple[list[Item], ExpertsItem | None]]
    ignored: list[str]                    # present but deliberately unused (tied lm_head, inv_freq)


def _linear(src, dst, dout, din, bias=False):
    items = [Item(src + ".weight", dst + ".kernel", (dout, din), True)]
    return items + ([Item(src + ".bias", dst + ".bias", (dout,), False)] if bias else [])


def _mlp(src, dst, h, i, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return (_linear(f"{src}.{g}", f"{dst}.gate", i, h) + _linear(f"{src}.{u}", f"{dst}.up", i, h)
            + _linear(f"{src}.{d}", f"{dst}.down", h, i))


def hf_plan(cfg: ModelConfig, names: Iterable[str], layout: str = "auto") -> Plan:
    """Which HF tensor feeds which parameter.

    ``layout`` "hub" (per-expert tensors), "fused" (v5 ``experts.gate_up_proj``/``down_proj``) or
    "auto": chosen per layer from the names present.
    """
    names = set(names)
    h, nh, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    head = [Item("model.embed_tokens.weight", "embed", (cfg.vocab_size, h), False),
            Item("model.norm.weight", "final_norm.scale", (h,), False)]
    ignored = sorted(n for n in names if n.endswith("rotary_emb.inv_freq"))
    if cfg.tie_word_embeddings:
        ignored += ["lm_head.weight"] if "lm_head.weight" in names else []
    else:
        head += _linear("lm_head", "lm_head", cfg.vocab_size, h)
    layers = []
    for L in range(cfg.num_layers):
        p, q = f"model.layers.{L}.", f"layers.{L}."
        items = [Item(p + "input_layernorm.weight", q + "input_norm.scale", (h,), False),
                 Item(p + "post_attention_layernorm.weight", q + "post_norm.scale", (h,), False)]
        a, qa = p + "self_attn.", q + "attn."
        items += (_linear(a + "q_proj", qa + "q_proj", nh * d, h, cfg.qkv_bias)
                  + _linear(a + "k_proj", qa + "k_proj", kv * d, h, cfg.qkv_bias)
                  + _linear(a + "v_proj", qa + "v_proj", kv * d, h, cfg.qkv_bias)
                  + _linear(a + "o_proj", qa + "o_proj", h, nh * d, cfg.o_bias))
        if cfg.qk_norm:
            items += [Item(a + "q_norm.weight", qa + "q_norm.scale", (d,), False),
                      Item(a + "k_norm.weight", qa + "k_norm.scale", (d,), False)]
        if L not in cfg.moe_layers:
            layers.append((items + _mlp(p + "mlp", q + "mlp", h, cfg.intermediate_size), None))
            continue
        m = p + "mlp."
        if cfg.model_type == "mixtral" and (layout == "hub" or layout == "auto" and any(
                n.startswith(p + "block_sparse_moe.") for n in names)):
            m = p + "block_sparse_moe."
        e, i = cfg.num_experts, cfg.moe_intermediate_size
        items += _linear(m + "gate", q + "mlp.router", e, h)
        if cfg.shared_intermediate_size:
            src = m + ("shared_expert" if cfg.shared_gate else "shared_experts")
            items += _mlp(src, q + "mlp.shared", h, cfg.shared_intermediate_size)
            if cfg.shared_gate:
                items += _linear(m + "shared_expert_gate", q + "mlp.shared_gate", 1, h)
        if layout == "fused" or layout == "auto" and m + "experts.gate_up_proj" in names:
            experts = ExpertsItem(q + "mlp.experts", None, (m + "experts.gate_up_proj", m + "experts.down_proj"), e, h, i)
        else:
            hub = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            experts = ExpertsItem(q + "mlp.experts", {mat: tuple(f"{m}experts.{x}.{src}.weight" for x in range(e))
                                                      for mat, src in zip(MATRICES, hub)}, None, e, h, i)
        layers.append((items, experts))
    return Plan(head, layers, ignored)


def check_plan(plan: Plan, ckpt: SafetensorsDir, arch: str) -> None:
    """Every expected tensor present with its shape and a float dtype; nothing unexpected."""
    expected = {it.src: it.shape for it in plan.head}
    for items, experts in plan.layers:
        expected.update({it.src: it.shape for it in items})
        expected.update(experts.sources() if experts else {})
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{ckpt.dir}: missing tensor {name!r} (expected shape {list(shape)} "
                                  f"for this {arch} config)")
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)} from config.json")
        if info.dtype not in FLOAT_CODES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                  f"{', '.join(FLOAT_CODES)}")
    extra = sorted(set(ckpt.tensors) - set(expected) - set(plan.ignored))
    if extra:
        raise CheckpointError(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} unexpected in all) for a {arch} model with this config.json")


def read_items(ckpt: SafetensorsDir, items: Iterable[Item], dtype) -> dict[str, np.ndarray]:
    out = {}
    for it in items:
        a = ckpt.read(it.src)
        out[it.dst] = np.ascontiguousarray(a.T if it.transpose else a).astype(dtype, copy=False)
    return out


def read_experts(ckpt: SafetensorsDir, ex: ExpertsItem, dtype) -> dict[str, np.ndarray]:
    """Routed experts as ``{w_gate, w_up: [E,H,I], w_down: [E,I,H]}``, filled expert by expert."""
    e, h, i = ex.num_experts, ex.hidden, ex.inter
    out = {"w_gate": np.empty((e, h, i), dtype), "w_up": np.empty((e, h, i), dtype),
           "w_down": np.empty((e, i, h), dtype)}
    if ex.fused:
        gate_up = ckpt.read(ex.fused[0])
        out["w_gate"][...] = gate_up[:, :i].transpose(0, 2, 1)
        out["w_up"][...] = gate_up[:, i:].transpose(0, 2, 1)
        del gate_up
        out["w_down"][...] = ckpt.read(ex.fused[1]).transpose(0, 2, 1)
    else:
        for mat, names in ex.per_expert.items():
            for x, name in enumerate(names):
                out[mat][x] = ckpt.read(name).T
    return out


# ----------------------------------------------------------------------------------------------
# Writing


class CheckpointWriter:
    """Writes shards into a temp sibling of ``out_dir``; ``finish`` renames it into place.

    Used as a context manager: on any exception the temp directory is removed, so a failed
    conversion leaves nothing behind.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out_dir).resolve()
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out}: output directory already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self.weight_map: dict[str, str] = {}
        self.nbytes = 0

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, *_):
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def write_shard(self, tensors: Mapping[str, np.ndarray]) -> None:
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, self.tmp / name, metadata={"format": "flax"})
        self.weight_map.update({k: name for k in tensors})
        self.nbytes += sum(v.nbytes for v in tensors.values())

    def copy_files(self, src: Path, names: Iterable[str]) -> None:
        """Copy the files of ``names`` that exist in ``src`` (tokenizer, generation config) as they are."""
        for name in names:
            if (src / name).is_file():
                shutil.copyfile(src / name, self.tmp / name)

    def finish(self, config: Mapping[str, Any]) -> Path:
        (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": self.nbytes},
                                                  "weight_map": self.weight_map}, indent=1))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        old = None
        if self.out.exists():
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


def load_pretrained(path, *, impl: str = "auto", interpret: bool = False) -> CausalLM:
    """Load a directory written by ``python -m convert`` (or ``save_pretrained``) as a CausalLM.
    ``impl``/``interpret``: as ``CausalLM.set_impl`` ("mosaic" also re-lays the packed words out)."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot read ({e})") from e
    section = hf.get("puzzlemoe")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path / 'config.json'}: no 'puzzlemoe' section; convert the Hugging Face "
                              f"checkpoint first: python -m convert {hf.get('model_type', '<arch>')} --src DIR --out DIR")
    if section.get("format_version") != FORMAT_VERSION or section.get("layout_version") != codec.LAYOUT_VERSION:
        raise CheckpointError(f"{path}: format {section.get('format_version')} / bit layout "
                              f"{section.get('layout_version')} not supported (need {FORMAT_VERSION} / {codec.LAYOUT_VERSION})")
    cfg = ModelConfig.from_hf(hf)
    dtype = jnp.dtype(section["dtype"])
    packed = {int(k): int(v) for k, v in section.get("packed_pairs", {}).items()}
    dropped = {int(k): int(v) for k, v in section.get("dropped_experts", {}).items()}
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, packed_pairs=packed, dropped_experts=dropped,
                                               impl=impl, interpret=interpret))
    graphdef, state = nnx.split(abstract)
    ckpt = SafetensorsDir(path)
    flat = {}
    for key, var in nnx.to_flat_state(state):
        name, want = ".".join(map(str, key)), var.get_value()
        if name not in ckpt.tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected {list(want.shape)} {want.dtype})")
        a = ckpt.read(name)
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(f"{ckpt.tensors[name].file}: tensor {name!r} is {list(a.shape)} {a.dtype}, "
                                  f"expected {list(want.shape)} {want.dtype}")
        flat[key] = jnp.asarray(a)
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


# ----------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class LayerReport:
    layer: int
    kind: str                 # "dense-mlp" | "experts" | "packed"
    pairs: int = 0
    dropped: int = 0
    expert_bytes_in: int = 0
    expert_bytes_out: int = 0
    frac_similar: float = float("nan")
    rel_err: float = float("nan")
    stats: dict | None = None  # merge.compress_layer statistics (per pair and matrix)


@dataclasses.dataclass
class ConvertReport:
    out: Path
    arch: str
    ratio: float
    dtype: str
    bytes_in: int
    bytes_out: int
    expert_bytes_in: int
    expert_bytes_out: int
    seconds: float
    layers: list[LayerReport]


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
                                                   frequencies=cal.get("frequencies"), chunk_elems=1 << 22)
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
