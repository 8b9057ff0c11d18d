"""Our checkpoint format: ``save_pretrained`` and ``load_pretrained``.

* ``save_pretrained`` writes an in-memory model in the format ``python -m convert`` writes
  (``conversion.convert_checkpoint``).
* ``load_pretrained`` rebuilds the model from a converted directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import resolve_impl
from puzzlemoe_jax import codec
from puzzlemoe_jax.config import ConfigError, ModelConfig
from puzzlemoe_jax.models import QKV_NAMES, CausalLM, PackedExpertsModule, fuse_qkv, qkv_part_shapes, split_qkv
from puzzlemoe_jax.safetensors_io import INDEX, CheckpointError, SafetensorsDir
from puzzlemoe_jax.writer import FORMAT_VERSION, HASHES, ID_TENSORS, CheckpointWriter, check_expert_ids, file_hash


def _np(a) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def stored_names(name: str) -> tuple[str, ...]:
    """The checkpoint tensors behind one model variable: ``attn.qkv_proj``'s kernel or bias is
    stored as the q, k and v projections' (``models.fuse_qkv``), everything else under its own name."""
    if ".qkv_proj." not in name:
        return (name,)
    prefix, leaf = name.split(".qkv_proj.")
    return tuple(f"{prefix}.{n}.{leaf}" for n in QKV_NAMES)


def flat_params(model: CausalLM) -> dict[str, np.ndarray]:
    """Model state as ``{"layers.0.attn.q_proj.kernel": array}`` (our checkpoint names); layers in
    the Mosaic layout (``CausalLM.use_mosaic``) give their ``packed_*`` [P, K, N] words, as stored,
    and fused q/k/v projections their three tensors (``stored_names``)."""
    flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model))}
    for path in [p for p in flat if p.endswith(".mosaic_gate_up")]:
        prefix = path[: -len("mosaic_gate_up")]
        del flat[prefix + "mosaic_gate_up"], flat[prefix + "mosaic_down"]
        module = model.moe_layers()[int(prefix.split(".")[1])].experts
        flat.update({prefix + "packed_" + n: w for n, w in module.weights().packed.items()})
    heads, kv_heads = model.config.num_heads, model.config.num_kv_heads
    out = {}
    for name, v in flat.items():
        names, a = stored_names(name), _np(v[...])
        out.update(zip(names, split_qkv(a, heads, kv_heads) if len(names) > 1 else (a,)))
    return out


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

    def read(name, shape, dtype):
        if name not in ckpt.tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected {list(shape)} {dtype})")
        a = ckpt.read(name)
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise CheckpointError(f"{ckpt.tensors[name].file}: tensor {name!r} is {list(a.shape)} {a.dtype}, "
                                  f"expected {list(shape)} {dtype}")
        return a

    flat, ids, used = {}, {}, set()
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    for key, var in nnx.to_flat_state(state):
        name, want = ".".join(map(str, key)), var.get_value()
        names = stored_names(name)
        if len(names) == 1:
            a = read(name, want.shape, want.dtype)
        else:   # q, k and v, each checked against its share of the fused shape
            shapes = qkv_part_shapes(want.shape, heads, kv_heads)
            a = fuse_qkv(*(read(n, shape, want.dtype) for n, shape in zip(names, shapes)), kv_heads)
        used.update(names)
        if name.rsplit(".", 1)[-1] in ID_TENSORS:
            ids[name] = a
        flat[key] = jnp.asarray(a)
    check_expert_ids(ids, str(path))
    extra = sorted(set(ckpt.tensors) - used)
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
