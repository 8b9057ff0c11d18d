"""Bad input to ``python -m convert``, ``evaluate`` and ``generate``: one row per case (argv, exit
code, message fragment, files afterwards), run in-process through each CLI's ``main(argv)``;
plus hypothesis property tests of ``ModelConfig.from_hf`` and the flag parsers (issue #18).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import convert
from puzzlemoe_jax import cli, evaluate, generate
from puzzlemoe_jax.checkpoint import load_pretrained
from puzzlemoe_jax.config import ConfigError, ModelConfig
from puzzlemoe_jax.random_checkpoint import tiny_config, write_tiny_checkpoint
from puzzlemoe_jax.safetensors_io import INDEX, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"convert": convert.main, "evaluate": evaluate.main, "generate": generate.main}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Workspace: S (tiny mixtral HF checkpoint), M (its 50 % conversion), bad configs, token files."""
    root = tmp_path_factory.mktemp("bad")
    s = write_tiny_checkpoint(root / "S", "mixtral", num_layers=2)
    assert convert.main(["mixtral", "--src", str(s), "--out", str(root / "M"), "--ratio", "0.5", "--quiet"]) == 0
    np.save(root / "tok.npy", (np.arange(400) * 7 % 200).astype(np.int32))
    (root / "file.txt").write_text("not a dir")
    short = root / "M16"                       # M with a 16-position context
    shutil.copytree(root / "M", short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 16}))
    for name, change in BAD_CONFIGS.items():   # S with one bad config.json value
        d = root / f"S-{name}"
        shutil.copytree(s, d)
        hf = json.loads((s / "config.json").read_text())
        hf.update(change)
        (d / "config.json").write_text(json.dumps(hf))
    return root


BAD_CONFIGS = {
    "window": {"sliding_window": -5}, "topk0": {"num_experts_per_tok": 0}, "topk9": {"num_experts_per_tok": 99},
    "theta": {"rope_theta": 0}, "heads0": {"num_attention_heads": 0}, "kvdiv": {"num_key_value_heads": 3},
    "eps": {"rms_norm_eps": -1e-6}, "vocab": {"vocab_size": "256"}, "layers": {"num_hidden_layers": 2.5},
}

# (cli, argv with {S}/{M}/{W} placeholders, exit code, message fragment, paths that must not exist after)
CASES = [
    # --out safety
    ("convert", "mixtral --src {S} --out {S} --overwrite", 2, "overlaps --src", []),
    ("convert", "mixtral --src {S} --out {S}/sub --overwrite", 2, "overlaps --src", ["{S}/sub"]),
    ("convert", "mixtral --src {S} --out {W} --overwrite", 2, "overlaps --src", []),
    ("convert", "mixtral --src {W}/link-S --out {S} --overwrite", 2, "overlaps --src", []),
    ("convert", "mixtral --src {S} --out {W}/f16 --dtype float16", 0, "", []),
    ("convert", "mixtral --src {S} --out {W}/file.txt --overwrite", 2, "not a directory", []),
    ("convert", "mixtral --src {W}/file.txt --out {W}/o1", 2, "--src", ["{W}/o1"]),
    ("convert", "mixtral --src {W}/nope --out {W}/o2", 2, "no such directory", ["{W}/o2"]),
    # config values
    *[("convert", f"mixtral --src {{W}}/S-{n} --out {{W}}/o-{n}", 2, next(iter(c)),
       [f"{{W}}/o-{n}"]) for n, c in BAD_CONFIGS.items()],
    ("evaluate", "--model {W}/S --tokens {W}/tok.npy --seq-len 8", 2, "no 'puzzlemoe' section", []),
    # numeric flags (argparse usage errors)
    ("convert", "mixtral --src {S} --out {W}/o3 --ratio 0.7", 2, "[0, 0.5]", ["{W}/o3"]),
    ("convert", "mixtral --src {S} --out {W}/o3 --ratio nan", 2, "finite", ["{W}/o3"]),
    ("convert", "mixtral --src {S} --out {W}/o3 --pairing-sample 0", 2, "positive integer", ["{W}/o3"]),
    ("convert", "mixtral --src {S} --out {W}/o3 --similarity-threshold -1", 2, "[0, 1]", ["{W}/o3"]),
    ("evaluate", "--model {M} --tokens {W}/tok.npy --seq-len 8 --batch-size -1", 2, "positive integer", []),
    ("evaluate", "--model {M} --tokens {W}/tok.npy --seq-len 8 --batch-size 0", 2, "positive integer", []),
    ("evaluate", "--model {M} --tokens {W}/tok.npy --seq-len 8 --max-windows -1", 2, "positive integer", []),
    ("evaluate", "--model {M} --tokens {W}/tok.npy --seq-len 0", 2, "positive integer", []),
    ("generate", "--model {M} --prompt-ids 1,2 --max-new-tokens 0", 2, "positive integer", []),
    ("generate", "--model {M} --prompt-ids 1,2 --temperature 0", 2, "> 0", []),
    ("generate", "--model {M} --prompt-ids 1,2 --top-p 1.5", 2, "(0, 1]", []),
    ("generate", "--model {M} --prompt-ids 1,2 --top-p 0", 2, "(0, 1]", []),
    # path kinds
    ("evaluate", "--model {W}/file.txt --tokens {W}/tok.npy --seq-len 8", 2, "not a directory", []),
    ("evaluate", "--model {M} --tokens {W} --seq-len 8", 2, "is a directory", []),
    ("evaluate", "--model {M} --tokens {W}/tok.npy --seq-len 8 --json {W}", 2, "is a directory", []),
    ("generate", "--model {W}/nope --prompt-ids 1", 2, "no such directory", []),
    # context length
    ("evaluate", "--model {W}/M16 --tokens {W}/tok.npy --seq-len 32", 2, "context of 16", []),
    ("evaluate", "--model {W}/M16 --tokens {W}/tok.npy --seq-len 16", 0, "", []),
    ("generate", "--model {W}/M16 --prompt-ids 1,2,3 --max-new-tokens 14", 2, "context of 16", []),
    ("generate", "--model {M} --prompt-ids 1 --max-new-tokens 1000000000000", 2, "context of 4096", []),
    ("generate", "--model {W}/M16 --prompt-ids 1,2,3 --max-new-tokens 13", 0, "", []),
]


def _fill(text, w):
    return text.format(S=w / "S", M=w / "M", W=w)


@pytest.mark.parametrize("tool,argv,code,fragment,absent", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_table(w, capsys, tool, argv, code, fragment, absent):
    if not (w / "link-S").exists():
        (w / "link-S").symlink_to(w / "S")
    before = sorted(p.name for p in (w / "S").iterdir())
    try:
        got = MAINS[tool](_fill(argv, w).split())
    except SystemExit as e:            # argparse usage errors
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    assert fragment in err
    assert "Traceback" not in err
    if code:
        assert "error: " in err.strip().splitlines()[-1], err
    for p in absent:
        assert not Path(_fill(p, w)).exists()
    assert sorted(p.name for p in (w / "S").iterdir()) == before     # the source is never touched
    assert not list(w.glob(".*.tmp-*")) and not list(w.glob(".*.lock"))


def _flip_byte(path: Path, offset_from_end: int = 100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_named_and_no_verify_skips_hash(w, tmp_path, capsys):
    m = tmp_path / "M"
    shutil.copytree(w / "M", m)
    shard = sorted(m.glob("model-*.safetensors"))[0]
    _fill_ok = load_pretrained(m)             # untouched copy verifies
    _flip_byte(shard)
    with pytest.raises(CheckpointError, match=shard.name):
        load_pretrained(m)
    load_pretrained(m, verify=False)          # a flipped weight bit still loads without the hash check
    assert evaluate.main(["--model", str(m), "--tokens", str(w / "tok.npy"), "--seq-len", "8"]) == 2
    assert "content hash" in capsys.readouterr().err


@pytest.mark.parametrize("bad,fragment", [({"pairs": 99}, "outside [0, 8)"), ({"pairs": "dup"}, "repeats expert"),
                                          ({"pairs": -1}, "holds expert -1")])
def test_expert_id_tensors_range_checked(w, tmp_path, bad, fragment):
    m = tmp_path / "M"
    shutil.copytree(w / "M", m)
    for shard in m.glob("model-*.safetensors"):
        t = load_file(shard)
        name = next((k for k in t if k.endswith("." + next(iter(bad)))), None)
        if name is None or t[name].size == 0:
            continue
        v = next(iter(bad.values()))
        a = t[name].copy().reshape(-1)
        if v == "dup":
            a[1] = a[0]
        else:
            a[0] = v
        t[name] = a.reshape(t[name].shape)
        save_file(t, shard, metadata={"format": "flax"})
        break
    else:
        pytest.skip("no such tensor")
    with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        load_pretrained(m, verify=False)


def test_float16_overflow_refused(w, tmp_path, capsys):
    s = tmp_path / "S"
    shutil.copytree(w / "S", s)
    shard = sorted(s.glob("model-*.safetensors"))[-1]
    t = load_file(shard)
    name = sorted(t)[0]
    t[name] = np.full_like(t[name], 1e6)      # representable in bf16, inf in float16
    save_file(t, shard)
    assert convert.main(["mixtral", "--src", str(s), "--out", str(tmp_path / "o"), "--dtype", "float16",
                         "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and name.rsplit(".", 1)[0] in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_modes_follow_umask_and_hashes_recorded(w):
    m = w / "M"
    meta = json.loads((m / "model.safetensors.index.json").read_text())["metadata"]
    assert set(meta["puzzlemoe_hashes"]) == {p.name for p in m.glob("model-*.safetensors")}
    old = os.umask(0)
    os.umask(old)
    for p in m.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~old, p


def test_second_conversion_to_the_same_out_fails_fast(w, tmp_path, capsys):
    from filelock import FileLock
    out = tmp_path / "o"
    with FileLock(tmp_path / ".o.lock"):
        assert convert.main(["mixtral", "--src", str(w / "S"), "--out", str(out), "--quiet"]) == 2
    assert "another conversion is writing" in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_removes_temp_output(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "S", "mixtral", num_layers=16, hidden_size=256)   # converts for seconds
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, "-m", "convert", "mixtral", "--src", str(src), "--out",
                          str(tmp_path / "o"), "--ratio", "0.5"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1].decode()[-2000:]
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    assert p.returncode == 128 + signal.SIGTERM, p.communicate()[1].decode()[-2000:]
    assert not list(tmp_path.glob(".o*")) and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- properties

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=3), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok",
        "rope_theta", "rms_norm_eps", "sliding_window", "max_position_embeddings", "decoder_sparse_step",
        "mlp_only_layers", "rope_scaling", "rope_parameters", "n_routed_experts", "moe_layer_freq",
        "first_k_dense_replace", "n_shared_experts", "routed_scaling_factor", "shared_expert_intermediate_size",
        "n_group", "topk_group", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
        "partial_rotary_factor", "topk_method", "scoring_func"]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "olmoe", "glm4_moe", "deepseek_v2",
                             "deepseek_v3"]),
       changes=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_from_hf_clean_error_or_valid(arch, changes):
    hf = {**tiny_config(arch), **changes}
    try:
        c = ModelConfig.from_hf(hf)
    except ConfigError:
        return
    assert min(c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) > 0
    assert c.num_heads % c.num_kv_heads == 0 and c.rope_theta > 0 and c.rms_norm_eps > 0
    assert not c.moe_layers or 1 <= c.top_k <= c.num_experts
    assert c.sliding_window is None or c.sliding_window >= 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(max_size=8), st.integers().map(str), st.floats().map(str)),
       kind=st.sampled_from([cli.positive_int, cli.positive_float, cli.probability, cli.ratio, cli.unit_float]))
def test_flag_types_clean_error_or_in_range(text, kind):
    import argparse
    try:
        v = kind(text)
    except argparse.ArgumentTypeError:
        return
    assert isinstance(v, int) if kind is cli.positive_int else np.isfinite(v)   # any size of int is fine
    assert {cli.positive_int: v >= 1, cli.positive_float: v > 0, cli.probability: 0 < v <= 1,
            cli.ratio: 0 <= v <= 0.5, cli.unit_float: 0 <= v <= 1}[kind]


def test_huge_whole_float_sizes_refused_not_allocated():
    """A size given as a huge whole float (1e300) is an error, not a billion-layer model."""
    with pytest.raises(ConfigError, match="num_hidden_layers must be below 2"):
        ModelConfig.from_hf({**tiny_config("mixtral"), "num_hidden_layers": 1e300})


@pytest.mark.parametrize("change,fragment", [
    ("shape", r"tensor 'layers\.0\.attn\.k_proj\.kernel' is \[\d+, \d+\] bfloat16, expected \[\d+, \d+\] bfloat16"),
    ("missing", r"missing tensor 'layers\.0\.attn\.k_proj\.kernel' \(expected \[\d+, \d+\] bfloat16\)")])
def test_qkv_parts_checked_by_their_stored_names(w, tmp_path, change, fragment):
    """The model holds q, k and v as one weight; a bad stored part is named as stored."""
    m = tmp_path / "M"
    shutil.copytree(w / "M", m)
    name = "layers.0.attn.k_proj.kernel"
    shard = next(s for s in m.glob("model-*.safetensors") if name in load_file(s))
    t = load_file(shard)
    if change == "shape":
        t[name] = t[name][:, :-1].copy()
    else:   # gone from the shard and the index
        del t[name]
        index = json.loads((m / INDEX).read_text())
        del index["weight_map"][name]
        (m / INDEX).write_text(json.dumps(index))
    save_file(t, shard, metadata={"format": "flax"})
    with pytest.raises(CheckpointError, match=fragment):
        load_pretrained(m, verify=False)
