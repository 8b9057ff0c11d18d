"""The implementation switch (kernels/api.py), the shared decode, one layer-equivalence test
across every implementation, and the package structure (no import cycles; kernels/ below the model)."""
import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import kernels
from kernels import ImplError, packed_moe_ffn, pair_gemm, resolve_impl
from kernels.api import PAIR_KERNEL_MAX_M_SMALL, pair_kernel_wins
from kernels.gpu import decode
from puzzlemoe_jax import codec
from puzzlemoe_jax.moe import dense_moe_ffn, moe_ffn
from tests.kernel_cases import check, random_layer, random_routing, random_words, rng_for

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_in_kernel_decode_is_bit_identical_to_codec_on_every_word():
    words = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16).reshape(256, 256)

    def kernel(w_ref, i_ref, j_ref):
        w_i, w_j = decode(w_ref[...])
        i_ref[...], j_ref[...] = w_i, w_j

    out = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    got_i, got_j = pl.pallas_call(kernel, out_shape=[out, out], interpret=True)(words)
    bits_i, bits_j = codec.decode_words(words)
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))  # noqa: E731
    np.testing.assert_array_equal(bits(got_i), np.asarray(bits_i))
    np.testing.assert_array_equal(bits(got_j), np.asarray(bits_j))


def test_resolve_impl_refuses_what_cannot_run_here():
    assert jax.default_backend() == "cpu"       # CI: no GPU
    assert resolve_impl("auto") == "reference" and resolve_impl("reference") == "reference"
    for impl in ("triton", "pallas", "mosaic"):
        with pytest.raises(ImplError, match="runs Pallas GPU kernels and this machine's JAX backend is cpu"):
            resolve_impl(impl)
        assert resolve_impl(impl, interpret=True) == ("triton" if impl == "pallas" else impl)
    with pytest.raises(ImplError, match="impl must be one of auto, reference, triton, mosaic, pallas"):
        resolve_impl("cuda")
    assert kernels.IMPL_CHOICES == ("auto", "reference", "triton", "mosaic", "pallas")
    x, ids, tw = random_routing(rng_for(1), 3, 8, 2, 64)
    with pytest.raises(ImplError):    # the layer refuses too: never silently an interpreter
        packed_moe_ffn(x, ids, tw, random_layer(rng_for(1), 8, 64, 96, 0.5), impl="triton")


def test_auto_is_mosaic_on_hopper_triton_on_other_gpus(monkeypatch):
    from kernels import gpu
    for cc, want in (((9, 0), "mosaic"), ((8, 0), "triton"), ((10, 0), "triton"), (None, "reference")):
        monkeypatch.setattr(gpu, "compute_capability", lambda cc=cc: cc)
        assert resolve_impl("auto") == want, cc


@pytest.mark.parametrize("e,h,i,t,k,dtype", [
    (8, 128, 192, 1, 2, jnp.bfloat16),     # 2 experts with tokens, 6 never read
    (8, 64, 96, 9, 2, jnp.bfloat16),       # masked K and N edges (96 is no multiple of 64)
    (6, 96, 176, 5, 3, jnp.float32),       # f32 activations and weights (weights rounded to bf16)
])
def test_dense_grouped_kernel_matches_ragged_dot(e, h, i, t, k, dtype):
    """kernels.dense_moe_ffn (grouped Triton kernel, interpreter) against the ragged_dot reference."""
    rng = rng_for(e * h + t + 3)
    w = {n: jnp.asarray(rng.normal(0, 0.05, s), dtype) for n, s in
         (("w_gate", (e, h, i)), ("w_up", (e, h, i)), ("w_down", (e, i, h)))}
    x, ids, tw = random_routing(rng, t, e, k, h, dtype)
    ids = ids.at[0, 0].set(e)                # an id the layer does not hold: contributes nothing
    ref = dense_moe_ffn(x, ids, tw, {n: v.astype(jnp.bfloat16) for n, v in w.items()}, out_dtype=jnp.float32)
    got = jax.jit(functools.partial(kernels.dense_moe_ffn, impl="triton", interpret=True))(x, ids, tw, w)
    assert got.dtype == dtype
    check(got, ref, "dense_moe_ffn(impl='triton')")
    jaxpr = str(jax.make_jaxpr(kernels.dense_moe_ffn)(x, ids, tw, w))   # auto on CPU: ragged_dot
    assert "pallas_call" not in jaxpr and "ragged_dot" in jaxpr


def test_pair_auto_takes_decode_and_dots_past_the_table():
    rng = rng_for(7)
    words = random_words(rng, (128, 64))
    a = jnp.asarray(rng.standard_normal((PAIR_KERNEL_MAX_M_SMALL + 1, 128)), jnp.bfloat16)
    assert pair_kernel_wins(128, 4096, 14336) and not pair_kernel_wins(129, 4096, 14336)
    assert not pair_kernel_wins(65, 2048, 1408)
    jaxpr = str(jax.make_jaxpr(functools.partial(pair_gemm, impl="triton", interpret=True))(a[:8], a[:8], words))
    assert "pallas_call" in jaxpr
    jaxpr = str(jax.make_jaxpr(pair_gemm)(a, a, words))   # auto on CPU: the reference
    assert "pallas_call" not in jaxpr
    got = pair_gemm(a[:3], a[:5], words.T, transposed=True, impl="mosaic", interpret=True)
    ref = pair_gemm(a[:3], a[:5], words.T, transposed=True, impl="reference", out_dtype=jnp.float32)
    for g, r in zip(got, ref):
        check(g, r, "pair_gemm(impl='mosaic')")
    with pytest.raises(ValueError, match="transposed words"):
        pair_gemm(a, a, words, impl="mosaic", interpret=True)


@pytest.mark.parametrize("e,h,i,t,k,ratio,drop,dtype", [
    (8, 128, 192, 1, 2, 0.5, False, jnp.bfloat16),
    (8, 128, 192, 7, 2, 0.25, False, jnp.bfloat16),   # 4 experts left dense: ragged_dot beside the kernel
    (8, 64, 96, 6, 3, 0.25, True, jnp.bfloat16),      # pairs, dense and dropped experts (routed to anyway)
    (6, 96, 176, 5, 3, 0.5, False, jnp.float32),      # non-power-of-2 H and I, f32 activations
])
def test_every_implementation_computes_the_same_layer(e, h, i, t, k, ratio, drop, dtype):
    """reference, triton and mosaic (interpreters) against the dense layer on the decoded experts."""
    rng = rng_for(e * h + t)
    experts = random_layer(rng, e, h, i, ratio, drop)
    x, ids, tw = random_routing(rng, t, e, k, h, dtype)
    if drop:
        assert np.isin(np.asarray(ids), np.asarray(experts.dropped_ids)).any()
    ref = dense_moe_ffn(x, ids, tw, experts.unpack(dtype))
    impls = ("reference", "triton") + (("mosaic",) if h % 64 == 0 and i % 64 == 0 else ())
    for impl in impls:
        got = jax.jit(functools.partial(moe_ffn, impl=impl, interpret=True))(x, ids, tw, experts)
        assert got.dtype == dtype
        check(got, ref, f"impl={impl!r}", tol=1e-5 if impl == "reference" else None)


def test_model_mosaic_layout_matches_reference_impl():
    """set_impl("mosaic"): every packed layer holds its words in the Mosaic layout (same bytes), the
    forward pass (interpreter) equals the reference path, the [K, N] words are still available."""
    from puzzlemoe_jax.config import ModelConfig
    from puzzlemoe_jax.models import CausalLM, PackedExpertsModule, forward
    cfg = ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=32, intermediate_size=192, moe_intermediate_size=192,
                      num_experts=8, top_k=2, moe_layers=(0,), norm_topk_prob=True)
    model = CausalLM(cfg, dtype=jnp.bfloat16, impl="reference")
    experts = random_layer(rng_for(41), 8, 128, 192, 0.25)          # 2 pairs + 4 dense experts
    model.set_experts(0, experts)
    ids = jnp.asarray(rng_for(42).integers(0, 64, (2, 9)), jnp.int32)
    ref = forward(model, ids)
    before = model.moe_layers()[0].experts.weights().nbytes()
    model.set_impl("mosaic", interpret=True)
    module = model.moe_layers()[0].experts
    assert isinstance(module, PackedExpertsModule) and module.mosaic and model.moe_layers()[0].impl == "mosaic"
    assert not hasattr(module, "packed_w_gate") and module.weights().nbytes() == before
    for n in ("w_gate", "w_up", "w_down"):
        assert bool(jnp.array_equal(module.weights().packed[n], experts.packed[n]))
    check(forward(model, ids), ref, "mosaic forward")
    # the forward pass hands the kernels the Mosaic words only (no transposed copy); an implementation
    # that needs [K, N] words gets them transposed back, and without words the call is refused
    thin = module.weights(with_words=False)
    assert thin.packed == {} and thin.nbytes() < before
    model.set_impl("reference")
    check(forward(model, ids), ref, "Mosaic layout, reference impl", tol=1e-5)
    x, tid, tw = random_routing(rng_for(43), 5, 8, 2, 128, jnp.bfloat16)
    want = packed_moe_ffn(x, tid, tw, experts, impl="reference")
    got = packed_moe_ffn(x, tid, tw, thin, impl="reference", mosaic_words=module.mosaic_words())
    assert bool(jnp.array_equal(got, want))
    with pytest.raises(ValueError, match="mosaic_words"):
        packed_moe_ffn(x, tid, tw, thin, impl="reference")
    with pytest.raises(ImplError, match="one of"):
        model.set_impl("nope")
    with pytest.raises(ImplError, match="backend is cpu"):
        model.set_impl("triton")


def _module_graph():
    """Library module -> the library modules it imports (anywhere in the file, lazy imports too);
    ``from pkg import submodule`` depends on the submodule, not on the package's __init__."""
    mods = {}
    for pkg in ("puzzlemoe_jax", "kernels", "convert"):
        for f in (ROOT / pkg).rglob("*.py"):
            mods[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(mods)
                deps |= subs or {node.module}
        graph[m] = {t for t in deps if t in mods and t != m}
    return graph


def find_cycle(graph) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules) as a path, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t, path + [t])):
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_import_cycles_and_kernels_sit_below_the_library():
    graph = _module_graph()
    for m in (m for m in graph if m.startswith("kernels")):
        ours = {t for t in graph[m] if not t.startswith("kernels")}
        assert ours <= {"puzzlemoe_jax.codec"}, f"{m} imports {ours}: kernels/ may use only puzzlemoe_jax.codec"
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]   # it finds one
