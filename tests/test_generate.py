"""Generation with the KV cache (puzzlemoe_jax.generate) against transformers and full recompute.

Greedy output of dense converted tiny models equals ``transformers``' ``generate`` token for token
(batched prompts of different lengths, left padding; Mixtral's fixture has sliding_window=5, so
the window is crossed).  Cached decode logits equal a full forward of each unpadded sequence.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import hf_fixtures as F
from puzzlemoe_jax import load_pretrained
from puzzlemoe_jax import generate as G
from puzzlemoe_jax.generate import GenerateError, Generator, generate, prepare_batch, sample_logits
from puzzlemoe_jax.models import forward

PROMPTS = [[5, 17, 33, 2, 99, 140, 7], [8, 9, 150], [1, 2, 3, 4, 5]]


def hf_greedy(arch, prompts, n):
    m, _ = F.model(arch)
    L = max(map(len, prompts))
    ids = torch.zeros((len(prompts), L), dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        am[i, L - len(p):] = 1
    with torch.no_grad():
        out = m.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[:, L:].tolist()


@pytest.fixture(scope="module")
def mixtral():
    return load_pretrained(F.converted("mixtral"))


@pytest.fixture(scope="module")
def mixtral_packed():
    return load_pretrained(F.converted("mixtral", ratio=0.5))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek"])
def test_greedy_matches_transformers(arch):
    model = load_pretrained(F.converted(arch))
    got = generate(model, PROMPTS, 12)
    assert got == hf_greedy(arch, PROMPTS, 12)
    assert generate(model, PROMPTS[1:2], 12) == got[1:2]    # padding does not change a sequence


def _cached_logits(model, prompts, tokens, chunk):
    """Logits the cache path gives for each generated token's successor (eager, step by step)."""
    n = len(tokens[0])
    b = prepare_batch(prompts, n, model.config.vocab_size)
    L = b.prompt_len
    cache = model.init_cache(len(prompts), L + n)
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        logits, cache = model.forward_cached(b.ids[:, s0:s1], b.positions[:, s0:s1], b.valid, cache, s0)
    steps = [logits[:, -1]]
    for j in range(n - 1):
        tok = jnp.asarray([t[j] for t in tokens], jnp.int32)[:, None]
        logits, cache = model.forward_cached(tok, (b.next_pos + j)[:, None], b.valid, cache, L + j)
        steps.append(logits[:, -1])
    return np.stack([np.asarray(s) for s in steps], 1)            # [B, n, V]


@pytest.mark.parametrize("chunk", [7, 2])
def test_cached_decode_equals_full_recompute(mixtral_packed, chunk):
    model = mixtral_packed
    tokens = generate(model, PROMPTS, 6)
    cached = _cached_logits(model, PROMPTS, tokens, chunk)
    for i, (p, t) in enumerate(zip(PROMPTS, tokens)):
        full = np.asarray(forward(model, jnp.asarray([p + t])))[0]
        want = full[len(p) - 1: len(p) - 1 + len(t)]
        assert np.isfinite(cached[i]).all()
        np.testing.assert_allclose(cached[i], want, atol=2e-5, rtol=0)
        assert np.argmax(want, -1).tolist() == t


def test_chunked_prefill_same_tokens(mixtral_packed):
    gen = Generator(mixtral_packed)
    b = prepare_batch(PROMPTS, 5, 160)
    outs = []
    for chunk in (7, 3, 1):
        first, cache, ok = gen.prefill(b, 5, chunk=chunk)
        out, steps, ok2, after = gen.decode(b, first, cache, 5)
        assert bool(ok) and bool(ok2) and int(steps) == 5
        outs.append(np.asarray(out))
        # the decode took the prefill's cache over in place: no second cache held beside it
        assert all(c.is_deleted() for kv in cache for c in kv)
        assert [c.shape for kv in after for c in kv] == [c.shape for kv in cache for c in kv]
    assert all((o == outs[0]).all() for o in outs)


def test_packed_generation_runs(mixtral, mixtral_packed):
    got = generate(mixtral_packed, PROMPTS, 8)
    assert [len(t) for t in got] == [8, 8, 8]
    assert all(0 <= x < 160 for t in got for x in t)
    assert got != generate(mixtral, PROMPTS, 8)    # the packed weights really are used


def test_sampling_reproducible_and_edge_cases(mixtral):
    greedy = generate(mixtral, PROMPTS, 8)
    a = generate(mixtral, PROMPTS, 8, greedy=False, temperature=1.5, seed=3)
    assert a == generate(mixtral, PROMPTS, 8, greedy=False, temperature=1.5, seed=3)
    assert a != generate(mixtral, PROMPTS, 8, greedy=False, temperature=1.5, seed=4)
    assert a != greedy
    # top_p -> 0 keeps only the most likely token; temperature -> 0 concentrates on it
    assert generate(mixtral, PROMPTS, 8, greedy=False, top_p=1e-6, seed=5) == greedy
    assert generate(mixtral, PROMPTS, 8, greedy=False, temperature=1e-4, seed=5) == greedy


def test_sample_logits_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    draw = lambda **kw: np.asarray(sample_logits(logits, key, greedy=False, **kw))  # noqa: E731
    only = draw(temperature=1.0, top_p=0.75)          # nucleus {0, 1}: 0.5 < 0.75 <= 0.8
    assert set(only.tolist()) == {0, 1}
    assert abs(np.mean(only == 0) - 0.5 / 0.8) < 0.03
    full = draw(temperature=1.0, top_p=1.0)
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert abs(np.mean(full == 3) - 0.05) < 0.015
    assert set(draw(temperature=1.0, top_p=0.5).tolist()) == {0}   # boundary: 0.5 reached by token 0
    hot = draw(temperature=100.0, top_p=1.0)                        # near uniform
    assert abs(np.mean(hot == 3) - 0.25) < 0.03
    assert np.asarray(sample_logits(logits, key, greedy=True, temperature=1.0, top_p=1.0)).tolist() == [0] * 4000


def test_stop_tokens(mixtral):
    full = generate(mixtral, PROMPTS, 10)
    stop = full[0][3]
    got = generate(mixtral, PROMPTS, 10, stop_tokens=[stop])
    for f, g in zip(full, got):
        k = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:k]
    # every sequence stops at once: one token each, the loop ends early
    firsts = sorted({f[0] for f in full})
    assert generate(mixtral, PROMPTS, 10, stop_tokens=firsts) == [[f[0]] for f in full]


@pytest.mark.parametrize("max_new, chunk", [(2, G.DECODE_CHUNK), (G.DECODE_CHUNK + 3, G.DECODE_CHUNK),
                                            (2 * G.DECODE_CHUNK + 1, G.DECODE_CHUNK), (G.DECODE_CHUNK + 3, 1),
                                            (2 * G.DECODE_CHUNK + 1, 64)])
def test_chunked_decode_counts_steps_and_tokens_as_a_plain_loop(mixtral, max_new, chunk):
    """The decode runs in chunks of ``chunk`` steps: the steps it reports and the tokens it
    returns are those of a loop that checks for stops before every step, whatever the overrun."""
    full = [row[:max_new] for row in generate(mixtral, PROMPTS, 2 * G.DECODE_CHUNK + 2)]
    assert generate(mixtral, PROMPTS, max_new) == full            # the overrun changes no token
    gen = Generator(mixtral)
    b = prepare_batch(PROMPTS, max_new, 160)
    stop = sorted({f[min(2, max_new - 1)] for f in full})       # every row stops by its third token
    first, cache, _ = gen.prefill(b, max_new)
    out, steps, ok, _ = gen.decode(b, first, cache, max_new, stop=jnp.asarray(stop, jnp.int32), chunk=chunk)
    ends = [next(i for i, t in enumerate(f) if t in stop) + 1 for f in full]
    assert bool(ok) and int(steps) == max(ends)
    out = np.asarray(out)
    assert out.shape == (len(PROMPTS), max_new)
    for row, f, e in zip(out.tolist(), full, ends):
        assert row == f[:e] + [G.PAD_ID] * (max_new - e)


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_decode_chunk_must_be_a_positive_integer(mixtral, chunk):
    gen = Generator(mixtral)
    b = prepare_batch(PROMPTS, 4, 160)
    first, cache, _ = gen.prefill(b, 4)
    with pytest.raises(GenerateError, match="chunk must be a positive integer"):
        gen.decode(b, first, cache, 4, chunk=chunk)


def test_decode_never_rehashes_the_model_graph(mixtral, monkeypatch):
    """jit hashes static arguments per call; the graph's hash is taken once (StaticGraph), and a
    second Generator over the same model reuses the compiled decode."""
    gen = Generator(mixtral)
    b = prepare_batch(PROMPTS, 4, 160)
    first, cache, _ = gen.prefill(b, 4)
    gen.decode(b, first, cache, 4)
    compiled = G._decode._cache_size()
    hashed = []
    graph_type = type(gen.graphdef.graph)
    real = graph_type.__hash__
    monkeypatch.setattr(graph_type, "__hash__", lambda self: hashed.append(1) or real(self))
    for _ in range(2):
        first, cache, _ = gen.prefill(b, 4)
        gen.decode(b, first, cache, 4)
    assert hashed == []
    other = Generator(mixtral)                                    # hashes its graph once, at split
    first, cache, _ = other.prefill(b, 4)
    other.decode(b, first, cache, 4)
    assert len(hashed) == 1 and G._decode._cache_size() == compiled


def test_non_finite_logits_raise():
    model = load_pretrained(F.converted("mixtral"))
    model.lm_head.kernel.set_value(jnp.full_like(model.lm_head.kernel[...], jnp.nan))
    with pytest.raises(FloatingPointError):
        generate(model, PROMPTS, 3)


@pytest.mark.parametrize("prompts, kw, msg", [
    ([], {}, "non-empty list"),
    ([[]], {}, "non-empty 1-D"),
    ([[1, 2], [3, 160]], {}, r"\[0, 160\)"),
    ([[1, -1]], {}, r"\[0, 160\)"),
    ([[1.5, 2.0]], {}, "integers"),
    ([[1, 2]], {"max_new_tokens": 0}, "positive integer"),
    ([[1, 2]], {"greedy": False, "temperature": 0.0}, "temperature"),
    ([[1, 2]], {"greedy": False, "top_p": 0.0}, "top_p"),
    ([[1, 2]], {"greedy": False, "top_p": 1.5}, "top_p"),
    ([[1, 2]], {"stop_tokens": [999]}, "stop tokens"),
])
def test_bad_inputs(mixtral, prompts, kw, msg):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(GenerateError, match=msg):
        generate(mixtral, prompts, **kw)


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_prompt_ids_output_ids(mixtral, capsys):
    path = F.converted("mixtral")
    assert G.main(["--model", str(path), "--prompt-ids", "5,17,33", "--max-new-tokens", "6", "--output-ids"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == ",".join(map(str, generate(mixtral, [[5, 17, 33]], 6)[0]))
    assert G.main(["--model", str(path), "--prompt-ids", "5,17,33", "--max-new-tokens", "6",
                   "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--output-ids"]) == 0
    sampled = capsys.readouterr().out.strip().splitlines()[-1]
    assert sampled == ",".join(map(str, generate(mixtral, [[5, 17, 33]], 6, greedy=False, temperature=0.8,
                                                 top_p=0.9, seed=1)[0]))


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    from convert import main as convert_main
    from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint
    src = write_tiny_checkpoint(tmp_path_factory.mktemp("bytes") / "src", "mixtral", dtype="float32")
    out = src.parent / "out"
    assert convert_main(["mixtral", "--src", str(src), "--out", str(out), "--ratio", "0.5", "--quiet"]) == 0
    return out


def test_cli_byte_level_prompt(byte_model, capsys):
    assert G.main(["--model", str(byte_model), "--prompt", "def f(x):", "--max-new-tokens", "5",
                   "--output-ids", "--stop", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ids = [int(t) for t in lines[-1].split(",")]
    want = generate(load_pretrained(byte_model), [list(b"def f(x):")], 5, stop_tokens=[10])[0]
    assert ids == want
    assert json.loads((byte_model / "config.json").read_text())["puzzlemoe"]["packed_pairs"]


def test_cli_tokenizer_json(tmp_path, capsys):
    """A model directory with tokenizer.json: --prompt is encoded with it, the output decoded."""
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    model_dir = tmp_path / "m"
    shutil.copytree(F.converted("mixtral"), model_dir)
    vocab = {f"w{i}": i for i in range(F.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()    # joins with spaces
    tok.save(str(model_dir / "tokenizer.json"))
    assert G.main(["--model", str(model_dir), "--prompt", "w5 w17 w33", "--max-new-tokens", "4", "--output-ids"]) == 0
    text, ids = capsys.readouterr().out.strip().splitlines()[-2:]
    want = generate(load_pretrained(model_dir), [[5, 17, 33]], 4)[0]
    assert ids == ",".join(map(str, want))
    assert text == " ".join(f"w{i}" for i in want)


@pytest.mark.parametrize("argv, msg", [
    (["--prompt", "hello"], "pass --prompt-ids"),        # vocab 160, no tokenizer.json
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,999"], r"\[0, 160\)"),
    (["--prompt-ids", ""], "non-empty"),
])
def test_cli_bad_inputs(argv, msg, capsys):
    model = str(F.converted("mixtral"))
    capsys.readouterr()   # (building the fixture may print progress)
    assert G.main(["--model", model, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and __import__("re").search(msg, err), err


def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--model", str(F.converted("mixtral")), "--prompt-ids", "1", "--greedy", "--temperature", "0.5"])
    assert e.value.code == 2
    assert G.main(["--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_load_pretrained_mosaic_relays_the_words_and_keeps_them(mixtral_packed):
    """impl="mosaic" at load: every packed layer holds the Mosaic layout, the [K, N] words it gives
    the other paths are the checkpoint's, and the routed layers are set to impl "mosaic"."""
    model = load_pretrained(F.converted("mixtral", ratio=0.5), impl="mosaic", interpret=True)
    for i, moe in model.moe_layers().items():
        want = mixtral_packed.moe_layers()[i].experts.weights()
        got = moe.experts.weights()
        assert moe.impl == "mosaic" and moe.experts.mosaic
        assert not hasattr(moe.experts, "packed_w_up")
        for n in ("w_gate", "w_up", "w_down"):
            assert bool(jnp.array_equal(got.packed[n], want.packed[n])), (i, n)


def test_save_pretrained_of_a_mosaic_model_writes_the_stored_layout(tmp_path, mixtral_packed):
    from puzzlemoe_jax import save_pretrained
    src = F.converted("mixtral", ratio=0.5)
    model = load_pretrained(src, impl="mosaic", interpret=True)
    hf = json.loads((src / "config.json").read_text())
    back = load_pretrained(save_pretrained(model, tmp_path / "out", hf))
    for i, moe in back.moe_layers().items():
        want = mixtral_packed.moe_layers()[i].experts.weights()
        assert not moe.experts.mosaic
        for n in ("w_gate", "w_up", "w_down"):
            assert bool(jnp.array_equal(moe.experts.weights().packed[n], want.packed[n])), (i, n)
