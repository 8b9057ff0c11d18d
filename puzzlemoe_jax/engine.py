"""Continuous-batching engine: fixed decode slots, a scheduler thread, and the compiled steps.

The engine owns a KV cache of ``max_batch`` rows (slots) of ``max_len`` cache positions.  A
request waits in a bounded queue until a slot is free; it is then prefilled (its prompt
right-padded to a bucket length, so a handful of prefill shapes are compiled), its cache row is
written into its slot, and it joins the shared decode step, which advances every slot by one
token with its own position.  Requests admitted in the same step whose prompts share a bucket are
prefilled together, ``prefill_batch`` prompts a call (one compiled shape per bucket and size, the
missing rows padded), so a burst of arrivals costs a few prefill calls and one readback each, not
one of each per request; the "exact" decode prefills one prompt a call (see below).  A request
leaves its slot when it emits a stop token, its stop function says so, it reaches ``max_tokens`` or
the end of the context, or it is cancelled.

The decode step is one compiled function of the slot count.  Two ways to compute it:

* ``"batched"``: all slots go through the model together (the MoE layers see all slots' tokens);
  attention and the cache write are per slot.  This is the fast path on the GPU.
* ``"exact"``: a ``lax.map`` over slots, each running ``CausalLM.forward_cached`` on one token,
  the very call ``generate`` makes for one prompt alone.  XLA's CPU matmuls round differently for
  different row counts, so only this way gives a greedy request exactly the tokens ``generate``
  returns for it alone, whatever else is being served.  ``"auto"``: exact on CPU, batched elsewhere.

Sampling is per slot (temperature 0 means greedy); the key of a request's i-th token is
``fold_in(key(seed), i)``, so a seeded request samples the same tokens in any batch.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puzzlemoe_jax.generate import PAD_ID, sample_logits, split_static

log = logging.getLogger("puzzlemoe_jax.engine")
MODES = ("auto", "batched", "exact")
# prompts of a bucket prefilled in one call by default (batched decode), while their padded tokens
# stay within PREFILL_TOKENS; longer buckets prefill one prompt a call
PREFILL_BATCH, PREFILL_TOKENS = 8, 2048


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation.  ``temperature`` 0: greedy.  ``on_tokens(new_ids, finish_reason)`` is called
    from the engine thread after each step that produced tokens (``finish_reason`` None while it
    runs, else "stop", "length" or "cancelled"); ``stop_fn(ids)`` may end it after any token."""
    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()
    stop_fn: Callable[[list[int]], bool] | None = None
    on_tokens: Callable[[list[int], str | None], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request (it leaves its slot at the next step)."""
        self.cancelled = True


def prefill_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from ``smallest``, and ``max_len`` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


# ----------------------------------------------------------------------------------------------
# Compiled steps


def _sample_rows(logits, seeds, counts, temperature, top_p):
    """Per-row tokens from fp32 logits ``[B, V]``: argmax where ``temperature == 0``, else
    temperature + top-p sampling with key ``fold_in(key(seed), count)``."""
    greedy = temperature <= 0

    def one(lg, seed, count, t, p):
        key = jax.random.fold_in(jax.random.key(seed), count)
        return sample_logits(lg[None], key, greedy=False, temperature=t, top_p=p)[0]

    args = (logits, seeds, counts, jnp.where(greedy, 1.0, temperature), top_p)
    sampled = jax.lax.cond(jnp.all(greedy), lambda *a: jnp.zeros(logits.shape[:1], jnp.int32),  # skip the sorts
                           lambda *a: jax.vmap(one)(*a), *args)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, ids, lengths, seeds, temperature, top_p, *, max_len: int):
    """Prompts ``ids [B, P]`` (right-padded, ``lengths [B]`` real tokens) into fresh cache rows of
    ``max_len`` positions; returns (first tokens [B], row caches, logits finite [B]).  Only the hidden
    state of each row's last real token reaches the head."""
    model = nnx.merge(graphdef.graph, state)
    B, P = ids.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (B, P))
    logits, new = model.forward_cached(ids, positions, jnp.ones((B, max_len), bool),
                                       model.init_cache(B, max_len), 0, last_index=lengths - 1)
    logits = logits[:, -1].astype(jnp.float32)
    toks = _sample_rows(logits, seeds, jnp.zeros((B,), jnp.int32), temperature, top_p)
    return toks, new, jnp.all(jnp.isfinite(logits), axis=-1)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache, rows, slots):
    """Write prefilled row caches into slots ``slots [B]`` of the engine cache (a slot out of range,
    a padding row: dropped)."""
    return [(k.at[slots].set(rk, mode="drop"), v.at[slots].set(rv, mode="drop"))
            for (k, v), (rk, rv) in zip(cache, rows)]


def _decode_exact(model, tokens, pos, active, cache):
    """Slot by slot, ``forward_cached`` on one token each (``generate``'s call for one prompt);
    free slots are skipped."""
    s = cache[0][0].shape[1]
    v = model.config.vocab_size

    def one(args):
        tok, p, busy, row = args

        def run(row):
            row = [(k[None], v[None]) for k, v in row]
            logits, row = model.forward_cached(tok[None, None], p[None, None], jnp.ones((1, s), bool), row, p)
            return logits[0, -1], [(k[0], v[0]) for k, v in row]

        skip = lambda row: (jnp.zeros((v,), model.embed[...].dtype), row)  # noqa: E731
        return jax.lax.cond(busy, run, skip, row)

    return jax.lax.map(one, (tokens, pos, active, cache))


def _decode_batched(model, tokens, pos, active, cache):
    """All slots through the model at once; attention and the cache write per slot (``vmap``)."""
    s = cache[0][0].shape[1]
    valid = jnp.ones((1, s), bool)
    x = model.embed[...][tokens[:, None]]
    new = []
    for layer, (ck, cv) in zip(model.layers, cache):
        def attend(h, p, k, v, attn=layer.attn):
            out, (k, v) = attn(h[None], p[None, None], model.cache_mask(valid, p, 1), (k[None], v[None], p))
            return out[0], k[0], v[0]
        a, k, v = jax.vmap(attend)(layer.input_norm(x), pos, ck, cv)
        x = x + a
        x = x + layer.mlp(layer.post_norm(x))
        new.append((k, v))
    return model.head(x)[:, -1], new


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, tokens, pos, active, seeds, counts, temperature, top_p, *, mode: str):
    """One token for every slot: ``tokens [B]`` go into cache position ``pos [B]``; returns
    (next tokens [B], cache, finite [B])."""
    model = nnx.merge(graphdef.graph, state)
    step = _decode_exact if mode == "exact" else _decode_batched
    logits, cache = step(model, tokens, pos, active, cache)
    logits = logits.astype(jnp.float32)
    nxt = _sample_rows(logits, seeds, counts, temperature, top_p)
    return nxt, cache, jnp.all(jnp.isfinite(logits), axis=-1)


# ----------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Slots, queue and scheduler thread around one model.  ``submit`` a ``Request``; ``start``
    runs the loop in a daemon thread (``step`` runs one iteration, for tests)."""

    def __init__(self, model, *, max_len: int, max_batch: int = 16, max_queue: int = 256,
                 mode: str = "auto", buckets: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 prefill_batch: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if prefill_batch is not None and prefill_batch < 1:
            raise ValueError(f"prefill_batch must be >= 1, got {prefill_batch}")
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.max_len = int(max_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.mode = mode if mode != "auto" else ("exact" if jax.default_backend() == "cpu" else "batched")
        if self.mode == "exact" and (prefill_batch or 1) > 1:
            raise ValueError("the exact decode prefills one prompt a call (prefill_batch 1): a prompt prefilled "
                             "beside others may round differently from generate alone")
        self.prefill_batch = 1 if self.mode == "exact" else min(prefill_batch or PREFILL_BATCH, max_batch)
        self.buckets = tuple(sorted(b for b in set(buckets or prefill_buckets(self.max_len)) if b < self.max_len))
        self.buckets += (self.max_len,)
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.graphdef, self.state = split_static(model)
        self.cache = model.init_cache(max_batch, self.max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.tokens = np.zeros(max_batch, np.int32)
        self.pos = np.zeros(max_batch, np.int32)
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: BaseException | None = None
        self.steps = 0
        self.peak_active = 0      # the most slots busy at once

    # ---- public ----------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue ``req``; raises ``QueueFull`` when ``max_queue`` requests are waiting."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            req.t_submit = time.perf_counter()
            self.waiting.append(req)
            self.lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Drop ``req``: at once if it still waits, else when its slot next steps (any thread)."""
        req.cancel()
        with self.lock:
            try:
                self.waiting.remove(req)
            except ValueError:
                return
        self._finish(None, "cancelled", req)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def prefill_sizes(self, bucket: int) -> tuple[int, ...]:
        """Prompts per prefill call at ``bucket`` tokens: 1, and ``prefill_batch`` while the padded
        tokens stay within ``PREFILL_TOKENS``."""
        if self.prefill_batch == 1 or self.prefill_batch * bucket > PREFILL_TOKENS:
            return (1,)
        return (1, self.prefill_batch)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every compiled prefill shape, (prompts a call, bucket)."""
        return [(size, b) for b in self.buckets for size in self.prefill_sizes(b)]

    def warmup(self) -> float:
        """Compile every prefill shape (bucket and prompts a call) and the decode step, once each;
        returns the seconds taken."""
        t0 = time.perf_counter()
        for size, b in self.prefill_shapes():
            ones, zeros = [1] * size, [0] * size
            _, rows, _ = self._prefill(np.zeros((size, b), np.int32), ones, zeros, [0.0] * size, [1.0] * size)
            self.cache = _insert(self.cache, rows, np.full(size, self.max_batch, np.int32))   # dropped
        self._decode_step()
        jax.block_until_ready(self.cache)
        return time.perf_counter() - t0

    def compiled(self) -> dict[str, int]:
        """How many shapes each compiled step holds (the decode step: one)."""
        return {"prefill": _prefill._cache_size(), "insert": _insert._cache_size(), "decode": _decode._cache_size()}

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def generate(self, req: Request, timeout: float | None = None) -> list[int]:
        """Submit and wait (for scripts and tests): the generated ids."""
        self.submit(req)
        if not req.done.wait(timeout):
            raise TimeoutError("generation timed out")
        return req.tokens

    # ---- loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    while self.running and not self.waiting and not self.active:
                        self.lock.wait()
                    if not self.running:
                        break
                self.step()
        except BaseException as e:   # a crashed engine fails every request it holds
            log.exception("engine loop failed")
            self.error = e
            for i, r in enumerate(self.slots):
                if r is not None:
                    self._finish(i, "error")
            with self.lock:
                waiting, self.waiting = list(self.waiting), collections.deque()
            for r in waiting:
                self._finish(None, "error", r)

    def step(self) -> None:
        """Admit waiting requests into free slots, then one decode step for the busy slots."""
        admitted = []   # (slot, request), in queue order into the lowest free slots
        with self.lock:
            for i in range(self.max_batch):
                if self.slots[i] is None and self.waiting:
                    admitted.append((i, self.waiting.popleft()))
        for r in [r for _, r in admitted if r.cancelled]:
            self._finish(None, "cancelled", r)
        by_bucket = collections.defaultdict(list)
        for i, req in admitted:
            if not req.cancelled:
                by_bucket[next(b for b in self.buckets if b >= len(req.prompt))].append((i, req))
        for bucket, group in by_bucket.items():
            size = max(self.prefill_sizes(bucket))
            for k in range(0, len(group), size):
                self._admit(bucket, group[k:k + size])
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._finish(i, "cancelled")
        if not self.active:
            return
        self.peak_active = max(self.peak_active, self.active)
        nxt, finite = self._decode_step()
        self.steps += 1
        for i, r in enumerate(self.slots):
            if r is None:
                continue
            if not finite[i]:
                self._finish(i, "error")
                continue
            self.pos[i] += 1
            self._emit(i, int(nxt[i]))

    def _prefill(self, ids, lengths, seeds, temperature, top_p):
        return _prefill(self.graphdef, self.state, jnp.asarray(ids, jnp.int32), np.asarray(lengths, np.int32),
                        np.asarray(seeds, np.uint32), np.asarray(temperature, np.float32),
                        np.asarray(top_p, np.float32), max_len=self.max_len)

    def _decode_step(self):
        reqs = self.slots
        seeds = np.array([r.seed if r else 0 for r in reqs], np.uint32)
        counts = np.array([len(r.tokens) if r else 0 for r in reqs], np.int32)
        temp = np.array([r.temperature if r else 0.0 for r in reqs], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in reqs], np.float32)
        active = np.array([r is not None for r in reqs])
        nxt, self.cache, finite = _decode(self.graphdef, self.state, self.cache, self.tokens, self.pos, active,
                                          seeds, counts, temp, top_p, mode=self.mode)
        return np.asarray(nxt), np.asarray(finite)

    def _admit(self, bucket: int, group: list[tuple[int, Request]]) -> None:
        """Prefill ``group``'s prompts (one bucket) in one call of a compiled size, write their rows
        into their slots and emit their first tokens."""
        size = 1 if len(group) == 1 else max(self.prefill_sizes(bucket))
        ids = np.full((size, bucket), PAD_ID, np.int32)
        lengths, slots = np.ones(size, np.int32), np.full(size, self.max_batch, np.int32)   # padding rows: dropped
        seeds, temperature, top_p = np.zeros(size, np.uint32), np.zeros(size, np.float32), np.ones(size, np.float32)
        for r, (i, req) in enumerate(group):
            ids[r, :len(req.prompt)] = req.prompt
            lengths[r], slots[r], seeds[r] = len(req.prompt), i, req.seed
            temperature[r], top_p[r] = req.temperature, req.top_p
        toks, rows, ok = self._prefill(ids, lengths, seeds, temperature, top_p)
        self.cache = _insert(self.cache, rows, slots)
        toks, ok = np.asarray(toks), np.asarray(ok)
        for r, (i, req) in enumerate(group):
            if not ok[r]:
                self._finish(None, "error", req)
                continue
            self.slots[i] = req
            self.pos[i] = len(req.prompt)   # where the first generated token goes
            self._emit(i, int(toks[r]))

    def _emit(self, i: int, tok: int) -> None:
        req = self.slots[i]
        if req.t_first is None:
            req.t_first = time.perf_counter()
        req.tokens.append(tok)
        self.tokens[i] = tok
        reason = None
        if tok in self.stop_ids or tok in req.stop_ids or (req.stop_fn is not None and req.stop_fn(req.tokens)):
            reason = "stop"
        elif len(req.tokens) >= req.max_tokens or self.pos[i] >= self.max_len:
            reason = "length"
        if reason is None:
            if req.on_tokens is not None:
                req.on_tokens([tok], None)
        else:
            self._finish(i, reason, new=[tok])

    def _finish(self, i: int | None, reason: str, req: Request | None = None, new: list[int] = ()) -> None:
        if i is not None:
            req, self.slots[i] = self.slots[i], None
        req.finish_reason = reason
        if req.on_tokens is not None:
            req.on_tokens(list(new), reason)
        req.done.set()
