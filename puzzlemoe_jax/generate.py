"""Text generation with a preallocated KV cache: jit-compiled prefill, jit-compiled decode loop.

    python -m puzzlemoe_jax.generate --model OUT_DIR (--prompt "..." | --prompt-ids 1,2,3)
        [--max-new-tokens N] [--greedy | --temperature T --top-p P] [--stop 2,7] [--output-ids]

``generate(model, prompts, max_new_tokens)`` works for every converted family, dense or packed
(packed layers use the Pallas kernel on GPU through ``moe.moe_ffn``).  Prompts of different
lengths are left-padded; positions follow transformers (``cumsum(attention_mask) - 1``), so
greedy output equals ``transformers``' ``generate`` token for token.

Steps: ``prefill`` runs the padded prompts through the model in one call, filling cache slots
``0..L-1`` and sampling the first token; ``decode`` then runs all further steps inside one jit
(one dispatch for the whole generation: fixed-length chunks of steps inside a ``lax.while_loop``
that stops after the chunk in which every sequence has emitted a stop token; the prefill's KV cache is
updated in place).  Non-finite logits raise ``FloatingPointError``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import IMPL_CHOICES, IMPL_HELP, ImplError
from puzzlemoe_jax import cli, compile_cache
from puzzlemoe_jax.text import TextCodec

PAD_ID = 0


class GenerateError(ValueError):
    """Bad generation input (empty prompt, token id out of range, bad sampling settings)."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded prompts: ``ids``/``positions`` ``[B, L]``, ``valid`` ``[B, L + max_new]``."""
    ids: jax.Array
    positions: jax.Array
    valid: jax.Array
    next_pos: jax.Array     # [B] position of the first generated token
    lengths: tuple[int, ...]

    @property
    def prompt_len(self) -> int:
        return int(self.ids.shape[1])


def prepare_batch(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                  max_positions: int | None = None) -> Batch:
    """Validate and left-pad ``prompts`` (lists of token ids); the longest prompt plus
    ``max_new_tokens`` must fit ``max_positions`` (None: unchecked)."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise GenerateError("prompts must be a non-empty list of token-id sequences")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    rows = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0:
            raise GenerateError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise GenerateError(f"prompt {i}: token ids must be integers, got {a.dtype}")
        if a.min() < 0 or a.max() >= vocab_size:
            raise GenerateError(f"prompt {i}: token ids must lie in [0, {vocab_size}), got {a.min()}..{a.max()}")
        rows.append(a.astype(np.int32))
    b, L = len(rows), max(len(r) for r in rows)
    if max_positions is not None and L + max_new_tokens > max_positions:
        raise GenerateError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                            f"context of {max_positions} (max_position_embeddings)")
    ids = np.full((b, L), PAD_ID, np.int32)
    attn = np.zeros((b, L), bool)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        attn[i, L - len(r):] = True
    pos = np.cumsum(attn, axis=1) - 1
    pos = np.where(attn, pos, 1).astype(np.int32)            # transformers: masked_fill(mask == 0, 1)
    valid = np.concatenate([attn, np.ones((b, max_new_tokens), bool)], axis=1)
    return Batch(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(valid),
                 jnp.asarray(attn.sum(1).astype(np.int32)), tuple(len(r) for r in rows))


def sample_logits(logits, key, *, greedy: bool, temperature, top_p):
    """Next tokens ``[B]`` from fp32 logits ``[B, V]``: argmax, or temperature + nucleus (top-p)
    sampling (the smallest set of most likely tokens whose probability reaches ``top_p``; the
    most likely token is always kept)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs               # probability mass ahead of each token
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class StaticGraph:
    """A model's ``nnx`` graph definition as a static jit argument whose hash is computed once.

    jit hashes its static arguments on every call, and hashing a many-layer GraphDef took
    milliseconds, paid before every launch (per token in the serving loop)."""

    def __init__(self, graph):
        self.graph, self._hash = graph, hash(graph)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, StaticGraph) and (self.graph is other.graph or self.graph == other.graph)


def split_static(model) -> tuple[StaticGraph, nnx.State]:
    """``nnx.split`` with the graph wrapped for jit (``StaticGraph``)."""
    graph, state = nnx.split(model)
    return StaticGraph(graph), state


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "chunk"))
def _prefill(graphdef, state, ids, positions, valid, key, temperature, top_p, *, max_new: int, greedy: bool,
             chunk: int):
    model = nnx.merge(graphdef.graph, state)
    b, L = ids.shape
    cache = model.init_cache(b, L + max_new)
    for s0 in range(0, L, chunk):     # chunked prefill: the same function, fewer tokens per step
        s1 = min(L, s0 + chunk)
        logits, cache = model.forward_cached(ids[:, s0:s1], positions[:, s0:s1], valid, cache, jnp.int32(s0),
                                             last_index=s1 - s0 - 1)
    logits = logits[:, -1].astype(jnp.float32)
    tok = sample_logits(logits, key, greedy=greedy, temperature=temperature, top_p=top_p)
    return tok, cache, jnp.all(jnp.isfinite(logits))


DECODE_STATIC = ("graphdef", "max_new", "greedy", "chunk")
# decode steps per inner loop: a loop of known trip count runs without the host reading its condition
# back from the GPU, so its steps are launched back to back; the stop check runs between chunks
DECODE_CHUNK = 8


def decode_steps(graphdef, state, first, cache, valid, next_pos, stop_ids, key, temperature, top_p, *,
                 max_new: int, greedy: bool, chunk: int = DECODE_CHUNK):
    """Every decode step after the prefill's first token, in one jit: returns (tokens ``[B, max_new]``,
    steps run, all logits finite, the cache after the last step).

    The steps run in chunks of ``chunk`` (an inner loop of fixed length inside a
    ``lax.while_loop`` that stops once every sequence has emitted a stop token): a chunk may run past
    the last step or the last stop; such steps write no tokens, count no steps, and put their keys
    and values only in cache slots no returned token depends on (slots past the last step's, the
    last slot at most, where the cache index clamps)."""
    model = nnx.merge(graphdef.graph, state)
    b = first.shape[0]
    start = valid.shape[1] - max_new                          # slot of the first generated token
    n = max_new - 1                                           # steps after the prefill's token
    chunk = max(1, min(chunk, n))
    n_chunks = -(-n // chunk)
    out = jnp.full((b, 1 + n_chunks * chunk), PAD_ID, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def step(i, c):
        tok, cache, done, out, key, finite, steps = c
        live = (i < max_new) & ~jnp.all(done)                 # a step the plain loop would have run
        key, sub = jax.random.split(key)
        pos = (next_pos + i - 1)[:, None]
        logits, cache = model.forward_cached(tok[:, None], pos, valid, cache, start + i - 1)
        logits = logits[:, -1].astype(jnp.float32)
        nxt = sample_logits(logits, sub, greedy=greedy, temperature=temperature, top_p=top_p)
        finite &= jnp.all(jnp.isfinite(logits) | done[:, None]) | ~live
        nxt = jnp.where(done, PAD_ID, nxt)
        out = out.at[:, i].set(nxt)
        steps = jnp.where(live, i + 1, steps)
        return nxt, cache, done | jnp.isin(nxt, stop_ids), out, key, finite, steps

    def cond(c):
        j, carry = c
        return (j < n_chunks) & ~jnp.all(carry[2])

    def body(c):
        j, carry = c
        return j + 1, jax.lax.fori_loop(0, chunk, lambda t, cc: step(1 + j * chunk + t, cc), carry)

    init = (first, cache, done, out, key, jnp.bool_(True), jnp.int32(1))
    _, (_, cache, _, out, _, finite, steps) = jax.lax.while_loop(cond, body, (jnp.int32(0), init))
    return out[:, :max_new], steps, finite, cache


# the prefill's cache is donated and returned, so the loop updates it in place: a long context holds
# one cache, not two
_decode = jax.jit(decode_steps, static_argnames=DECODE_STATIC, donate_argnames=("cache",))


def _check_sampling(greedy, temperature, top_p):
    if greedy:
        return
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise GenerateError(f"temperature must be a finite number > 0 (use greedy=True for argmax), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerateError(f"top_p must lie in (0, 1], got {top_p!r}")


def _stop_array(stop_tokens, vocab_size):
    stop = [int(t) for t in stop_tokens]
    bad = [t for t in stop if not 0 <= t < vocab_size]
    if bad:
        raise GenerateError(f"stop tokens must lie in [0, {vocab_size}), got {bad}")
    return jnp.asarray(stop or [-1], jnp.int32)               # -1 never matches a token


class Generator:
    """Split model + the two jitted steps; ``generate`` is the one-call wrapper around it."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.graphdef, self.state = split_static(model)

    def prefill(self, batch: Batch, max_new_tokens: int, *, greedy=True, temperature=1.0, top_p=1.0, key=None,
                chunk: int | None = None):
        """Fill cache slots ``0..L-1`` and sample the first token.  ``chunk``: slots per model call
        (default: the whole prompt in one call, the fewest model calls);
        smaller chunks bound the activation memory of long prompts."""
        key = jax.random.key(0) if key is None else key
        b, L = batch.ids.shape
        chunk = L if chunk is None else int(chunk)   # slots per prefill step (default: the whole prompt)
        return _prefill(self.graphdef, self.state, batch.ids, batch.positions, batch.valid, key,
                        jnp.float32(temperature), jnp.float32(top_p), max_new=max_new_tokens, greedy=greedy,
                        chunk=chunk)

    def decode(self, batch: Batch, first, cache, max_new_tokens: int, *, stop=None, greedy=True,
               temperature=1.0, top_p=1.0, key=None, chunk: int = DECODE_CHUNK):
        """``decode_steps``: (tokens after ``first``, steps, finite, cache); the ``cache`` passed in
        (the prefill's) is consumed, updated in place into the one returned.  ``chunk``: steps between
        stop checks (each check waits for the GPU; a stop is noticed up to ``chunk - 1`` steps late)."""
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise GenerateError(f"chunk must be a positive integer (decode steps between stop checks), got {chunk!r}")
        key = jax.random.key(1) if key is None else key
        stop = jnp.asarray([-1], jnp.int32) if stop is None else stop
        return _decode(self.graphdef, self.state, first, cache, batch.valid, batch.next_pos, stop, key,
                       jnp.float32(temperature), jnp.float32(top_p), max_new=max_new_tokens, greedy=greedy,
                       chunk=int(chunk))

    def __call__(self, prompts, max_new_tokens, *, greedy=True, temperature=1.0, top_p=1.0, stop_tokens=(),
                 seed=0) -> list[list[int]]:
        _check_sampling(greedy, temperature, top_p)
        stop = _stop_array(stop_tokens, self.vocab_size)
        batch = prepare_batch(prompts, max_new_tokens, self.vocab_size,
                              getattr(self.model.config, "max_position_embeddings", None))
        k0, k1 = jax.random.split(jax.random.key(seed))
        first, cache, ok = self.prefill(batch, max_new_tokens, greedy=greedy, temperature=temperature,
                                        top_p=top_p, key=k0)
        out, steps, ok2, _ = self.decode(batch, first, cache, max_new_tokens, stop=stop, greedy=greedy,
                                         temperature=temperature, top_p=top_p, key=k1)
        if not (bool(ok) and bool(ok2)):
            raise FloatingPointError("non-finite logits during generation")
        out = np.asarray(out)[:, :int(steps)]
        stops = set(int(t) for t in stop_tokens)
        result = []
        for row in out.tolist():
            for j, t in enumerate(row):
                if t in stops:
                    row = row[:j + 1]
                    break
            result.append(row)
        return result


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0
             ) -> list[list[int]]:
    """Generated token ids per prompt (without the prompt; up to and including the first stop token).

    ``greedy=False`` samples with ``temperature`` (> 0) and nucleus ``top_p`` (in (0, 1]) from
    ``jax.random.key(seed)``: the same seed gives the same tokens.
    """
    return Generator(model)(prompts, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                            stop_tokens=stop_tokens, seed=seed)


# ----------------------------------------------------------------------------------------------
# CLI


def _ids(text: str, what: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GenerateError(f"{what} must be comma-separated integers, got {text!r}") from None
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m puzzlemoe_jax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="directory written by python -m convert")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer.json or a byte-level model)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    ap.add_argument("--max-new-tokens", type=cli.positive_int, default=32,
                    help="prompt + new tokens must fit max_position_embeddings")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    ap.add_argument("--temperature", type=cli.positive_float, help="sample with this temperature (> 0)")
    ap.add_argument("--top-p", type=cli.probability, help="nucleus sampling threshold in (0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", default="", help="stop token ids, comma-separated")
    ap.add_argument("--impl", default="auto", choices=IMPL_CHOICES, help=IMPL_HELP)
    compile_cache.add_argument(ap)
    ap.add_argument("--output-ids", action="store_true", help="print the generated ids (comma-separated) last")
    ap.add_argument("--no-verify", action="store_true", help="skip the shard hash check when loading")
    args = ap.parse_args(argv)
    compile_cache.enable(args.compile_cache)
    if args.greedy and (args.temperature is not None or args.top_p is not None):
        ap.error("--greedy excludes --temperature/--top-p")
    greedy = args.temperature is None and args.top_p is None
    from puzzlemoe_jax.checkpoint import load_pretrained, read_config  # noqa: PLC0415
    from puzzlemoe_jax.safetensors_io import CheckpointError  # noqa: PLC0415
    try:
        cli.check_path(args.model, "dir", "--model")
        _, cfg = read_config(args.model)
        try:
            text = TextCodec(args.model, cfg.vocab_size)
        except ValueError as e:
            if args.prompt is not None:
                raise GenerateError(f"{e}: pass --prompt-ids") from None
            text = None
        if args.prompt is not None:
            prompt = text.encode(args.prompt)
        else:
            prompt = _ids(args.prompt_ids, "--prompt-ids")
        cfg.check_context(len(prompt) + args.max_new_tokens, "prompt + --max-new-tokens",
                          Path(args.model) / "config.json")
        model = load_pretrained(args.model, impl=args.impl, verify=not args.no_verify)
        out = generate(model, [prompt], args.max_new_tokens, greedy=greedy,
                       temperature=1.0 if args.temperature is None else args.temperature,
                       top_p=1.0 if args.top_p is None else args.top_p,
                       stop_tokens=_ids(args.stop, "--stop"), seed=args.seed)[0]
    except (GenerateError, CheckpointError, ImplError, FloatingPointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if text is not None:
        print(text.decode(out))
    elif not args.output_ids:
        print(",".join(map(str, out)))
    if args.output_ids:
        print(",".join(map(str, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
