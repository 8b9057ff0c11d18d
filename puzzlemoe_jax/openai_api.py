"""The OpenAI request format: parse and check a completion / chat request's fields (one clear
``BadRequest`` naming the field), and render chat messages with the model's template."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_STOP = 4


class BadRequest(ValueError):
    """A request field that is missing, of the wrong type or out of range."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------------------------
# Request parsing


def _get(body, name, kinds, default, what):
    """``body[name]`` if it is one of ``kinds`` (bool is not a number here), else ``default`` for
    null/missing; raises BadRequest otherwise."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise BadRequest(f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


def parse_sampling(body: dict) -> dict:
    """The generation fields shared by completions and chat completions, checked."""
    max_tokens = _get(body, "max_tokens", (int,), None, "an integer", )
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), 16, "an integer")
    if max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number"))
    if not (temperature >= 0 and temperature < float("inf")):
        raise BadRequest(f"'temperature' must be a finite number >= 0 (0: greedy), got {temperature}", "temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must lie in (0, 1], got {top_p}", "top_p")
    seed = _get(body, "seed", (int,), None, "an integer")
    n = _get(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise BadRequest(f"only n=1 is supported, got {n}", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = _get(body, "stream", (bool,), False, "a boolean")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0, "a number") != 0:
            raise BadRequest(f"'{name}' is not supported", name)
    if _get(body, "logprobs", (int, bool), None, "an integer or a boolean") or _get(body, "echo", (bool,), False, "a boolean"):
        raise BadRequest("'logprobs' and 'echo' are not supported", "logprobs")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=int.from_bytes(os.urandom(4), "little") if seed is None else seed % 2 ** 32,
                stop=stop, stream=stream, include_usage=bool(opts.get("include_usage")))


def parse_prompt(prompt: Any, codec, vocab_size: int, context: int) -> list[int]:
    """Text or token ids (optionally a one-element list of either) -> checked token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if codec is None:
            raise BadRequest("this model has no tokenizer: pass the prompt as a list of token ids", "prompt")
        ids = codec.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab_size}), got {bad[0]}", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise BadRequest("'prompt' must not be empty", "prompt")
    if len(ids) >= context:
        raise BadRequest(f"the prompt has {len(ids)} tokens; the context holds {context}, so at most "
                         f"{context - 1} fit", "prompt")
    return list(ids)


def load_chat_template(model_dir: Path) -> str | None:
    """``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template`` string, if any."""
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template")
    return t if isinstance(t, str) else None


def render_chat(template: str, messages: Any, special: dict) -> str:
    """The prompt text for ``messages`` (a list of {role, content}), as transformers renders it."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content",
                         "messages")
    from jinja2 import TemplateError  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise BadRequest(f"the chat template rejected the messages: {e}", "messages") from None
