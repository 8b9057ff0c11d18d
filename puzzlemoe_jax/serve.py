"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    python -m puzzlemoe_jax.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16]
        [--max-queue 256] [--max-len N] [--impl auto] [--decode auto] [--prefill-buckets 16,64,...]
        [--prefill-batch 8]

Endpoints: ``POST /v1/completions`` (prompt as text or token ids; ``max_tokens``, ``temperature``
(0: greedy), ``top_p``, ``seed``, ``stop``, ``n`` = 1, ``stream``), ``POST /v1/chat/completions``
(when the model directory has a chat template: ``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).  Streams
are server-sent events in the OpenAI format, the last chunk carrying ``usage``.  Each choice (and
each streamed chunk) also carries the generated ``token_ids``.  Bad requests answer 400 and a full
queue 429, with an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from pathlib import Path

from starlette.requests import Request as HTTPRequest

from kernels import IMPL_CHOICES, IMPL_HELP
from puzzlemoe_jax.engine import MODES, Engine, QueueFull, Request
from puzzlemoe_jax.openai_api import BadRequest, load_chat_template, parse_prompt, parse_sampling, render_chat

log = logging.getLogger("puzzlemoe_jax.serve")
def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    from fastapi.responses import JSONResponse  # noqa: PLC0415
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# ----------------------------------------------------------------------------------------------
# App


class Metrics:
    """Prometheus metrics of one app (its own registry)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: PLC0415
        self.registry = r = CollectorRegistry()
        self.requests = Counter("puzzlemoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("puzzlemoe_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("puzzlemoe_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter("puzzlemoe_finished_requests", "requests finished, by reason (stop, length, "
                                "cancelled, error)", ["reason"], registry=r)
        Gauge("puzzlemoe_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_length)
        Gauge("puzzlemoe_active_slots", "slots decoding a request", registry=r).set_function(lambda: engine.active)
        buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("puzzlemoe_time_to_first_token_seconds", "submission to first token", registry=r,
                              buckets=buckets)
        self.itl = Histogram("puzzlemoe_inter_token_latency_seconds", "time between a request's tokens", registry=r,
                             buckets=buckets)


class Served:
    """What the handlers need: engine, text codec, names, limits, chat template."""

    def __init__(self, engine: Engine, codec=None, name: str = "model", chat_template: str | None = None,
                 special: dict | None = None):
        self.engine, self.codec, self.name = engine, codec, name
        self.chat_template, self.special = chat_template, special or {}
        self.context = engine.max_len
        self.device = _device() if hasattr(engine, "model") else None
        self.metrics = Metrics(engine)


def _device() -> str:
    import jax  # noqa: PLC0415
    return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"


def _decode(codec, ids):
    return codec.decode(ids) if codec is not None else ""


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


class Job:
    """One request's bridge from the engine thread to the event loop."""

    def __init__(self, served: Served, ids: list[int], p: dict):
        self.served, self.loop = served, asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stops = p["stop"]
        self.last = None
        codec, keep = served.codec, max((len(s) for s in self.stops), default=0) + 8
        stop_fn = None
        if self.stops and codec is not None:
            stop_fn = lambda toks: _cut(codec.decode(toks[-keep:]), self.stops)[1]  # noqa: E731
        self.req = Request(ids, p["max_tokens"], p["temperature"], p["top_p"], p["seed"], stop_fn=stop_fn,
                           on_tokens=self._on_tokens)

    def _on_tokens(self, new, reason):      # engine thread
        m, now = self.served.metrics, time.perf_counter()
        if new:
            m.generated_tokens.inc(len(new))
            if self.last is None:
                m.ttft.observe(now - self.req.t_submit)
            else:
                m.itl.observe(now - self.last)
            self.last = now
        if reason is not None:
            m.finished.labels(reason).inc()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (new, reason))

    def usage(self):
        n, c = len(self.req.prompt), len(self.req.tokens)
        return {"prompt_tokens": n, "completion_tokens": c, "total_tokens": n + c}

    def text(self, final: bool) -> str:
        """Text so far (all of it when ``final``): cut at a stop string; while running, the last
        characters that could start a stop string or end in an incomplete character are held back."""
        text, found = _cut(_decode(self.served.codec, self.req.tokens), self.stops)
        if final or found:
            return text
        hold = max((len(s) - 1 for s in self.stops), default=0)
        text = text[:len(text) - hold] if hold else text
        return text.rstrip("\ufffd")


def create_app(served: Served):
    """The FastAPI app; the engine is started and stopped with it."""
    import contextlib  # noqa: PLC0415
    from fastapi import FastAPI  # noqa: PLC0415
    from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: PLC0415
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    engine, m = served.engine, served.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="puzzlemoe-jax", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def crash(request, exc):
        log.exception("request failed")
        return _error(500, "internal server error", "server_error")

    @app.get("/health")
    async def health():
        ok = engine.error is None and engine.thread is not None and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "error", "active": engine.active,
                             "queue": engine.queue_length, "max_batch": engine.max_batch,
                             "peak_active": engine.peak_active, "compiled": engine.compiled(),
                             "decode": engine.mode, "device": served.device}, 200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                             "owned_by": "puzzlemoe-jax", "max_model_len": served.context}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    async def body_of(request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def handle(request, endpoint: str, chat: bool):
        try:
            body = await body_of(request)
            p = parse_sampling(body)
            if chat:
                if served.chat_template is None:
                    raise BadRequest("this model has no chat template (no chat_template.jinja or tokenizer_config.json "
                                     "chat_template in its directory); use /v1/completions", "messages")
                if served.codec is None:
                    raise BadRequest("this model has no tokenizer", "messages")
                prompt = render_chat(served.chat_template, body.get("messages"), served.special)
            else:
                prompt = body.get("prompt")
            ids = parse_prompt(prompt, served.codec, engine.vocab_size, served.context)
            job = Job(served, ids, p)
            engine.submit(job.req)
        except BadRequest as e:
            m.requests.labels(endpoint, "400").inc()
            return _error(400, str(e), param=e.param)
        except QueueFull as e:
            m.requests.labels(endpoint, "429").inc()
            return _error(429, f"{e}; retry later", "rate_limit_error", code="queue_full")
        m.requests.labels(endpoint, "200").inc()
        m.prompt_tokens.inc(len(ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "created": created, "model": served.name}
        if p["stream"]:
            return StreamingResponse(stream(request, job, head, chat, p["include_usage"]),
                                     media_type="text/event-stream")
        reason = None
        watcher = asyncio.create_task(watch(request, job))
        try:
            while reason is None:
                _, reason = await job.queue.get()
        finally:
            watcher.cancel()
            if reason is None:
                engine.cancel(job.req)
        if reason == "cancelled":
            return Response(status_code=499)
        if reason == "error":
            return _error(500, "generation failed (non-finite logits or an engine error)", "server_error")
        text, choice = job.text(final=True), {"index": 0, "finish_reason": reason, "token_ids": job.req.tokens}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": job.usage()}

    async def watch(request, job: Job):
        """Cancel ``job`` when its client disconnects (uvicorn reports it on ``receive``)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(job.req)

    async def stream(request, job: Job, head: dict, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent, n_ids, reason = "", 0, None

        def chunk(text, ids, finish, usage=None):
            c = {"index": 0, "finish_reason": finish, "token_ids": ids}
            if chat:
                c["delta"] = ({"role": "assistant"} if not sent and n_ids == 0 else {}) | (
                    {"content": text} if text else {})
            else:
                c.update(text=text, logprobs=None)
            out = {**head, "object": obj, "choices": [c]}
            if usage is not None:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        watcher = asyncio.create_task(watch(request, job))
        try:
            while reason is None:
                _, reason = await job.queue.get()
                if reason == "cancelled":
                    return
                if reason == "error":
                    yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    break
                text = job.text(final=reason is not None)
                ids = job.req.tokens[n_ids:]
                delta = text[len(sent):] if text.startswith(sent) else ""
                if delta or reason is not None or ids:
                    usage = job.usage() if reason is not None else None
                    yield chunk(delta, ids, reason, usage)
                    sent, n_ids = (sent + delta, len(job.req.tokens))
            if include_usage and reason not in (None, "error"):
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': job.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if reason is None:          # the client went away: free the slot
                engine.cancel(job.req)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, "chat", chat=True)

    return app


def run(served: Served, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``served`` with uvicorn until interrupted."""
    import uvicorn  # noqa: PLC0415
    print(f"serving {served.name} on http://{host}:{port} ({served.engine.max_batch} slots, context "
          f"{served.context}, decode {served.engine.mode})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(served), host=host, port=port, log_level="warning")


# ----------------------------------------------------------------------------------------------
# CLI


def _ints(text: str, what: str) -> list[int]:
    try:
        v = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not v or min(v) < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return v


def build(model_dir, *, impl="auto", max_len=None, **engine_args) -> Served:
    """Load a converted model directory and wrap it in an engine (not yet warmed up)."""
    from puzzlemoe_jax.checkpoint import load_pretrained  # noqa: PLC0415
    from puzzlemoe_jax.text import TextCodec  # noqa: PLC0415
    model_dir = Path(model_dir)
    model = load_pretrained(model_dir, impl=impl)
    hf = json.loads((model_dir / "config.json").read_text())
    context = int(hf.get("max_position_embeddings") or max_len or 4096)
    context = min(context, max_len) if max_len else context
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    try:
        codec = TextCodec(model_dir, model.config.vocab_size)
    except ValueError:
        codec = None
    special = {}
    try:
        tc = json.loads((model_dir / "tokenizer_config.json").read_text())
        special = {k: tc[k] for k in ("bos_token", "eos_token") if isinstance(tc.get(k), str)}
    except (OSError, ValueError):
        pass
    engine = Engine(model, max_len=context, stop_ids=eos, **engine_args)
    return Served(engine, codec, model_dir.name, load_chat_template(model_dir), special)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m puzzlemoe_jax.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="directory written by python -m convert")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16, help="decode slots")
    ap.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    ap.add_argument("--max-len", type=int, help="context in tokens (default: the config's max_position_embeddings)")
    ap.add_argument("--prefill-buckets", help="padded prompt lengths, comma-separated (default: powers of two from 16)")
    ap.add_argument("--impl", choices=IMPL_CHOICES, default="auto", help=IMPL_HELP)
    ap.add_argument("--decode", choices=MODES, default="auto",
                    help="decode step: batched (fast), exact (slot by slot, equal to generate alone); auto: exact on CPU")
    ap.add_argument("--prefill-batch", type=int, help="prompts of a bucket prefilled in one call "
                    "(default: 8 with the batched decode; the exact one takes 1)")
    args = ap.parse_args(argv)
    from puzzlemoe_jax.safetensors_io import CheckpointError  # noqa: PLC0415
    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must lie in 1..65535, got {args.port}")
        if args.max_batch < 1 or args.max_queue < 0 or (args.max_len is not None and args.max_len < 2):
            raise ValueError("--max-batch must be >= 1, --max-queue >= 0 and --max-len >= 2")
        if args.prefill_batch is not None and args.prefill_batch < 1:   # checked here, before the model loads
            raise ValueError(f"--prefill-batch must be >= 1, got {args.prefill_batch}")
        buckets = _ints(args.prefill_buckets, "--prefill-buckets") if args.prefill_buckets else None
        if not Path(args.model, "config.json").exists():
            raise ValueError(f"{args.model}: no config.json (pass a directory written by python -m convert)")
        served = build(args.model, impl=args.impl, max_len=args.max_len, max_batch=args.max_batch,
                       max_queue=args.max_queue, mode=args.decode, buckets=buckets, prefill_batch=args.prefill_batch)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    e = served.engine
    secs = e.warmup()
    print(f"warmup: {len(e.prefill_shapes())} prefill shapes (buckets {list(e.buckets)}, up to {e.prefill_batch} "
          f"prompts a call) and the decode step for {e.max_batch} slots compiled in {secs:.1f} s",
          file=sys.stderr, flush=True)
    run(served, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
