"""``python -m convert``: compressed round trips, dtypes, layouts, and every kind of bad input.

Round trips and error cases use ``puzzlemoe_jax.random_checkpoint`` checkpoints (numpy-written, HF layout);
parity with transformers is in test_models.py.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import main
from puzzlemoe_jax import load_pretrained
from puzzlemoe_jax.config import ARCHS, ModelConfig
from puzzlemoe_jax.experts import MATRICES
from puzzlemoe_jax.hf_layout import hf_plan, read_experts
from puzzlemoe_jax.merge import MergeConfig
from puzzlemoe_jax.models import forward
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint
from puzzlemoe_jax.safetensors_io import INDEX, SafetensorsDir
from tests import hf_fixtures as F

ROOT = Path(__file__).resolve().parents[1]
IDS = jnp.asarray(np.arange(14).reshape(2, 7) * 13 % 256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> bf16 3-layer sharded tiny checkpoint (written once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: write_tiny_checkpoint(root / a, a, num_layers=3) for a in ARCHS}


def run(args, capsys):
    """main(args) -> (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_round_trip(arch, tiny, tmp_path, capsys):
    src = tiny[arch]
    assert len(list(src.glob("model-*.safetensors"))) >= 3
    dense_out, packed_out = tmp_path / "dense", tmp_path / "packed"
    assert run([arch, "--src", src, "--out", dense_out, "--ratio", 0], capsys)[0] == 0
    code, _ = run([arch, "--src", src, "--out", packed_out, "--ratio", 0.5], capsys)
    assert code == 0
    cfg = json.loads((packed_out / "config.json").read_text())
    section = cfg["puzzlemoe"]
    assert cfg["model_type"] == arch and section["ratio"] == 0.5 and section["layout_version"] == 1
    assert section["pairing"] == "min_error" and section["merge"]["similarity_threshold"] > 0
    mc = ModelConfig.from_hf(cfg)
    assert set(section["packed_pairs"]) == {str(i) for i in mc.moe_layers}
    assert all(v == mc.num_experts // 2 for v in section["packed_pairs"].values())

    # expert bytes: (1 - ratio) of the original (bf16 in, packed uint16 + bf16 out)
    def expert_bytes(d):
        t = SafetensorsDir(d).tensors
        return sum(i.nbytes for n, i in t.items() if ".experts." in n and not n.endswith(("pairs", "dense_ids", "dropped_ids")))
    src_experts = sum(i.nbytes for n, i in SafetensorsDir(src).tensors.items() if ".experts." in n)
    assert expert_bytes(dense_out) == src_experts
    assert abs(expert_bytes(packed_out) / src_experts - 0.5) < 1e-9

    dense, packed = load_pretrained(dense_out), load_pretrained(packed_out)
    a, b = np.asarray(forward(dense, IDS), np.float32), np.asarray(forward(packed, IDS), np.float32)
    assert np.isfinite(b).all() and a.shape == b.shape == (2, 7, 256)
    assert 0 < np.abs(a - b).max() < 0.5 * np.abs(a).max()
    # the stored words are exactly what compress_layer makes of the original experts
    ckpt = SafetensorsDir(src)
    layer, experts = next((i, ex) for i, (_, ex) in enumerate(hf_plan(mc, ckpt.tensors).layers) if ex)
    expect, _ = compress_layer(read_experts(ckpt, experts, ml_dtypes.bfloat16), 0.5, MergeConfig())
    got = packed.moe_layers()[layer].experts.weights()
    np.testing.assert_array_equal(np.asarray(got.pairs), np.asarray(expect.pairs))
    for n in MATRICES:
        np.testing.assert_array_equal(np.asarray(got.packed[n]), np.asarray(expect.packed[n]))
        assert got.packed[n].dtype == jnp.uint16


def test_summary_output(tiny, tmp_path, capsys):
    code = main(["mixtral", "--src", str(tiny["mixtral"]), "--out", str(tmp_path / "o"), "--ratio", "0.25"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "convert mixtral" in err and "3/3" in err          # tqdm progress over layers
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["layer", "kind", "pairs"]
    assert [ln.split()[1] for ln in lines[1:4]] == ["packed"] * 3 and lines[1].split()[2] == "2"
    assert "(0.750 of the original)" in out and "experts:" in out and "total:" in out


def test_help_and_exit_code(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    h = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert h.returncode == 0 and all(a in h.stdout for a in ARCHS)
    bad = subprocess.run([sys.executable, "-m", "convert", "mixtral", "--src", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--src" in bad.stderr and "no such directory" in bad.stderr


def test_converter_imports_neither_the_model_nor_the_kernels():
    """``python -m convert`` starts without Flax and the kernels (a second of imports from a cold
    page cache, in front of every conversion)."""
    code = ("import sys, convert, puzzlemoe_jax.conversion; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'kernels') or m == 'puzzlemoe_jax.models'))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("preset", [None, "true"])
def test_cli_grows_the_device_pool_unless_told(preset, tmp_path, monkeypatch):
    """The converter turns jax's up-front GPU reservation off (it costs host RSS in proportion), and
    leaves a user's own setting alone."""
    if preset is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preset)
    assert main(["mixtral", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == (preset or "false")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_fp32_checkpoints(dtype, tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", "qwen3_moe", num_layers=2, dtype=dtype, max_shard_bytes=1 << 30)
    assert (src / "model.safetensors").exists() and not (src / INDEX).exists()    # single file
    for ratio, out_dtype in ((0, "auto"), (0.5, "auto"), (0.5, "bfloat16")):
        out = tmp_path / f"o{ratio}{out_dtype}"
        assert run(["qwen3_moe", "--src", src, "--out", out, "--ratio", ratio, "--dtype", out_dtype], capsys)[0] == 0
        m = load_pretrained(out)
        want = dtype if out_dtype == "auto" else out_dtype
        assert m.embed[...].dtype == jnp.dtype(want)
        assert np.isfinite(np.asarray(forward(m, IDS), np.float32)).all()
    a = load_pretrained(tmp_path / "o0auto").layers[0].mlp.experts.w_up[...]
    ref = load_file(src / "model.safetensors")["model.layers.0.mlp.experts.3.up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(a[3]), ref.T)


def test_hf_fixture_converted_with_overwrite(tmp_path, capsys):
    src = F.checkpoint("deepseek")
    out = tmp_path / "o"
    assert run(["deepseek", "--src", src, "--out", out], capsys)[0] == 0
    code, err = run(["deepseek", "--src", src, "--out", out], capsys)
    assert code == 2 and "already exists" in err
    assert run(["deepseek", "--src", src, "--out", out, "--ratio", 0.5, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["puzzlemoe"]["ratio"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ---- bad input: specific message, exit code 2, nothing left behind -----------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _shard_of(d: Path, tensor: str) -> Path:
    return d / json.loads((d / INDEX).read_text())["weight_map"][tensor]


def _rewrite(d: Path, tensor: str, fn):
    """Apply fn(dict of the shard's tensors) and rewrite that shard (and the index's names)."""
    shard = _shard_of(d, tensor)
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((d / INDEX).read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name or n in tensors}
    index["weight_map"].update({n: shard.name for n in tensors})
    (d / INDEX).write_text(json.dumps(index))


EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def _missing_shard(d):
    _shard_of(d, EXPERT).unlink()


def _truncated(d):
    p = _shard_of(d, EXPERT)
    p.write_bytes(p.read_bytes()[:-100])


def _corrupt_header(d):
    p = _shard_of(d, EXPERT)
    raw = bytearray(p.read_bytes())
    raw[8:20] = b"#garbage!#{}"
    p.write_bytes(bytes(raw))


def _set(value):
    def fn(t):
        a = t[EXPERT].astype(np.float32)
        a[3, 5] = value
        t[EXPERT] = a.astype(t[EXPERT].dtype)
    return lambda d: _rewrite(d, EXPERT, fn)


def _config(**change):
    def fn(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
    return fn


def _pickle_only(d):
    for p in d.iterdir():
        if p.name != "config.json":
            p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


BAD = {
    "missing_shard": (_missing_shard, r"shard model-\d+-of-\d+\.safetensors is missing"),
    "truncated": (_truncated, "truncated safetensors file"),
    "corrupt": (_corrupt_header, "corrupt safetensors header"),
    "wrong_shape": (lambda d: _rewrite(d, EXPERT, lambda t: t.update({EXPERT: t[EXPERT][:-1]})),
                    rf"tensor '{EXPERT}' has shape \[87, 64\], expected \[88, 64\]"),
    "unexpected_name": (lambda d: _rewrite(d, EXPERT, lambda t: t.update({"model.layers.1.block_sparse_moe.experts.8.w1.weight": t[EXPERT]})),
                        r"unexpected tensor 'model.layers.1.block_sparse_moe.experts.8.w1.weight'"),
    "missing_tensor": (lambda d: _rewrite(d, EXPERT, lambda t: t.pop(EXPERT)),
                       rf"missing tensor '{EXPERT}' \(expected shape \[88, 64\]"),
    "unknown_model_type": (_config(model_type="gpt_neox"), "unknown model_type 'gpt_neox'"),
    "other_arch": (_config(model_type="qwen3_moe"), "model_type is 'qwen3_moe', not 'mixtral'"),
    "nan": (_set(np.nan), rf"tensor '{EXPERT}' has 1 NaN/Inf values"),
    "inf": (_set(np.inf), rf"tensor '{EXPERT}' has 1 NaN/Inf values"),
    "pickle": (_pickle_only, r"pytorch_model\.bin.*never unpickled.*Convert them to safetensors"),
    "bad_json": (lambda d: (d / "config.json").write_text("{nope"), r"config\.json: not valid JSON"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tiny, tmp_path, capsys):
    src = _copy(tiny["mixtral"], tmp_path / "src")
    damage, message = BAD[case]
    damage(src)
    out = tmp_path / "out"
    code, err = run(["mixtral", "--src", src, "--out", out, "--ratio", 0.5], capsys)
    assert code == 2, err
    # one line on a terminal: only a cleared progress bar (ending in \r) may precede it
    assert re.split(r"[\r\n]", err.strip())[-1].startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]     # no output, no temp dir


def test_bad_ratio_and_failure_midway_leave_nothing(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:   # argparse's usage error
        run(["mixtral", "--src", tiny["mixtral"], "--out", tmp_path / "o", "--ratio", 0.7], capsys)
    assert e.value.code == 2 and "expected a number in [0, 0.5]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(["mixtral", "--src", tiny["mixtral"], "--out", tmp_path / "o", "--read-threads", 0], capsys)
    assert e.value.code == 2 and "--read-threads" in capsys.readouterr().err
    # NaN in the last layer: found after earlier layers were written to the temp dir
    src = _copy(tiny["mixtral"], tmp_path / "src")
    last = "model.layers.2.block_sparse_moe.experts.7.w2.weight"

    def fn(t):
        t[last] = np.full(t[last].shape, np.nan, np.float32).astype(t[last].dtype)
    _rewrite(src, last, fn)
    code, err = run(["mixtral", "--src", src, "--out", tmp_path / "o"], capsys)
    assert code == 2 and last in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_load_pretrained_refuses_hf_dir(tiny):
    with pytest.raises(ValueError, match="no 'puzzlemoe' section; convert"):
        load_pretrained(tiny["qwen2_moe"])




def test_tokenizer_and_generation_config_are_carried_over(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", "mixtral", num_layers=1)
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert run(["mixtral", "--src", src, "--out", tmp_path / "out", "--ratio", 0.5], capsys)[0] == 0
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_text() == (src / name).read_text()
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()   # only files the source has


@pytest.mark.parametrize("arch,layout,ratio,src_dtype,dtype", [
    ("mixtral", "hub", 0.5, "bfloat16", "auto"), ("deepseek", "hub", 0.25, "bfloat16", "auto"),
    ("qwen2_moe", "fused", 0.5, "bfloat16", "auto"), ("qwen3_moe", "fused", 0.25, "float32", "bfloat16"),
    ("mixtral", "hub", 0.0, "bfloat16", "float16"), ("deepseek", "fused", 0.5, "float16", "float32")])
def test_pipeline_output_bit_identical_to_sequential(arch, layout, ratio, src_dtype, dtype, tmp_path, monkeypatch):
    """The pipelined converter (threads; experts stacked on the host or transposed/cast where jax
    runs, read from the mapped files or into fresh or reused buffers, one or three layers ahead)
    writes exactly what the plain one-thread host path (the converter before the pipeline) writes:
    every tensor, the index and config.json."""
    from puzzlemoe_jax.conversion import convert_checkpoint
    src = write_tiny_checkpoint(tmp_path / "src", arch, layout=layout, num_layers=3, dtype=src_dtype)
    outs = {}
    variants = [dict(pipeline=False), dict(device_layout=True, warm_up=True), dict(device_layout=False),
                dict(device_layout=True, warm_up=False, read_threads=1, read_mode="fresh"),
                dict(device_layout=True, warm_up=False, read_mode="reuse")]
    for k, kw in enumerate(variants):
        out = tmp_path / f"out-{k}"
        # the last variant reads three layers ahead, as on accelerators with room for it
        monkeypatch.setattr("puzzlemoe_jax.conversion.read_ahead", lambda *_: 3 if k == len(variants) - 1 else 1)
        convert_checkpoint(src, out, arch, ratio=ratio, dtype=dtype, **kw)
        ckpt = SafetensorsDir(out)
        outs[k] = ({n: ckpt.read(n, check_finite=False) for n in ckpt.tensors},
                   (out / "config.json").read_text(), json.loads((out / INDEX).read_text()))
    ref, ref_cfg, ref_index = outs[0]
    for got, got_cfg, got_index in list(outs.values())[1:]:
        assert got_cfg == ref_cfg and got_index == ref_index and sorted(got) == sorted(ref)
        for n in ref:
            assert got[n].dtype == ref[n].dtype and got[n].shape == ref[n].shape, n
            assert got[n].tobytes() == ref[n].tobytes(), n


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_pipeline_names_nonfinite_expert_tensor(layout, tmp_path):
    """NaN in an expert: the device path raises the host reader's error (file and tensor named)."""
    from puzzlemoe_jax.conversion import convert_checkpoint
    from puzzlemoe_jax.safetensors_io import CheckpointError
    src = write_tiny_checkpoint(tmp_path / "src", "qwen3_moe", layout=layout, num_layers=2)
    name = ("model.layers.1.mlp.experts.down_proj" if layout == "fused" else
            "model.layers.1.mlp.experts.5.up_proj.weight")

    def fn(t):
        a = t[name].astype(np.float32)
        a.reshape(-1)[7] = np.nan
        t[name] = a.astype(t[name].dtype)
    _rewrite(src, name, fn)
    errors = []
    for k, kw in enumerate([dict(pipeline=False), dict(device_layout=True)]):
        with pytest.raises(CheckpointError) as e:
            convert_checkpoint(src, tmp_path / f"o{k}", "qwen3_moe", ratio=0.5, **kw)
        errors.append(str(e.value))
        assert not (tmp_path / f"o{k}").exists()
    assert errors[0] == errors[1] and name in errors[0] and "NaN/Inf" in errors[0]


def test_pipeline_error_order_with_other_tensors_read_beside_experts(tmp_path):
    """NaN in an expert and in a non-expert tensor of the same layer: the pipeline (which reads the
    layer's other tensors on their own thread beside the experts) names the non-expert tensor, as
    the one-thread path does, on the host and the device read path."""
    from puzzlemoe_jax.conversion import convert_checkpoint
    from puzzlemoe_jax.safetensors_io import CheckpointError
    src = write_tiny_checkpoint(tmp_path / "src", "qwen3_moe", layout="hub", num_layers=2)
    bad = ["model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    for name in bad:
        def fn(t, name=name):
            a = t[name].astype(np.float32)
            a.reshape(-1)[3] = np.nan
            t[name] = a.astype(t[name].dtype)
        _rewrite(src, name, fn)
    errors = []
    for k, kw in enumerate([dict(pipeline=False), dict(device_layout=False), dict(device_layout=True)]):
        with pytest.raises(CheckpointError) as e:
            convert_checkpoint(src, tmp_path / f"o{k}", "qwen3_moe", ratio=0.5, **kw)
        errors.append(str(e.value))
        assert not (tmp_path / f"o{k}").exists()
    assert errors[0] == errors[1] == errors[2] and bad[1] in errors[0]


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (128, 128), (257, 129), (0, 5)])
def test_transpose_into_is_the_transpose(shape):
    """The tiled host transpose equals numpy's, on shapes below, at and past the tile size."""
    from puzzlemoe_jax.hf_layout import transpose_into
    a = np.random.default_rng(shape[0]).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    got = transpose_into(np.empty(shape[::-1], a.dtype), a)
    assert np.array_equal(got, a.T)


def test_mapped_tensor_equals_read_and_survives_unmap(tmp_path):
    """A tensor viewed in the mapped file (the accelerators' read path) is the tensor ``read`` gives,
    read-only, and still readable after ``unmap`` dropped its pages from the process."""
    src = write_tiny_checkpoint(tmp_path / "src", "mixtral", num_layers=1)
    ckpt = SafetensorsDir(src)
    for name in ckpt.tensors:
        a, ref = ckpt.mapped(name), ckpt.read(name)
        assert not a.flags.writeable and a.dtype == ref.dtype and a.shape == ref.shape
        assert a.tobytes() == ref.tobytes(), name
        ckpt.unmap(name)
        assert a.tobytes() == ref.tobytes(), name


@pytest.mark.parametrize("seed", range(4))
def test_write_file_byte_identical_to_save_file(seed, tmp_path):
    """The streaming writer gives exactly safetensors' bytes (every dtype it writes, empty and 0-d
    tensors, names in any order, numpy or jax arrays), and its hash is the file's."""
    import jax
    from puzzlemoe_jax.safetensors_io import WRITE_CODES, write_file
    from puzzlemoe_jax.writer import file_hash
    rng = np.random.default_rng(seed)
    dtypes = list(WRITE_CODES)
    tensors = {}
    for k in range(int(rng.integers(1, 24))):
        shape = tuple(int(d) for d in rng.integers(0 if k % 7 == 0 else 1, 5, size=int(rng.integers(0, 4))))
        dt = dtypes[int(rng.integers(len(dtypes)))]
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        tensors[f"layers.{int(rng.integers(30))}.t{k}.{dt.name}"] = raw.view(dt).reshape(shape)
    if seed % 2:   # jax arrays where jax holds the dtype
        tensors = {n: jax.device_put(a) if a.dtype.itemsize < 8 else a for n, a in tensors.items()}
    names = list(tensors)
    rng.shuffle(names)
    tensors = {n: tensors[n] for n in names}
    meta = {"format": "flax"} if seed < 2 else None
    save_file({n: np.asarray(a) for n, a in tensors.items()}, tmp_path / "ref.safetensors", metadata=meta)
    h = write_file(tmp_path / "got.safetensors", tensors, meta)
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert h == file_hash(tmp_path / "got.safetensors")
    # release: the same bytes, each tensor dropped from the dict once written
    left = dict(tensors)
    assert write_file(tmp_path / "rel.safetensors", left, meta, release=True) == h and not left
