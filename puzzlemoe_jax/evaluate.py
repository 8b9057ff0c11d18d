"""Held-out language-modelling quality of a converted (dense or compressed) model.

    python -m puzzlemoe_jax.evaluate --model DIR (--tokens FILE.npy | --text FILE) --seq-len L
                                     [--max-windows N] [--batch-size B] [--json OUT]

The token stream is cut into consecutive non-overlapping windows of ``seq-len`` tokens; each window
is scored on its own with labels = inputs shifted by one (as ``transformers`` computes the loss),
so a window gives ``seq-len - 1`` predictions.  Reports the mean negative log-likelihood per token
(nats), perplexity, and bits per byte (byte-level models, or text with a tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from kernels import IMPL_CHOICES, IMPL_HELP
from puzzlemoe_jax import cli, compile_cache
from puzzlemoe_jax.text import BYTE_VOCAB, TextCodec


@nnx.jit
def _window_nll(model, ids):
    """Summed next-token NLL (f32) of each window in ``ids [B, L]``: [B], and the number of
    next tokens that are the argmax prediction: [B]."""
    logits = model(ids)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    hits = jnp.sum(jnp.argmax(logits, axis=-1) == ids[:, 1:], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0], axis=-1), hits


def windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping ``[W, seq_len]`` windows (a partial tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    n = len(tokens) // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
    return np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len)


def evaluate(model, tokens: np.ndarray, seq_len: int, *, max_windows: int | None = None,
             batch_size: int = 8, bytes_per_token: float | None = None, progress: bool = False) -> dict:
    """Score ``tokens`` with ``model``: nll_per_token, perplexity, bits_per_byte, top1_accuracy
    (share of next tokens that are the model's argmax), tokens, windows."""
    model.config.check_context(seq_len, "seq_len")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    w = windows(tokens, seq_len, max_windows)
    total, hits = 0.0, 0
    batches = range(0, len(w), batch_size)
    for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, file=sys.stderr):
        nll, hit = _window_nll(model, jnp.asarray(w[start:start + batch_size]))
        total, hits = total + float(jnp.sum(nll)), hits + int(jnp.sum(hit))
    predicted = w.shape[0] * (seq_len - 1)
    nll = total / predicted
    if not math.isfinite(nll):
        raise FloatingPointError(f"non-finite NLL {nll}: the model produced NaN/Inf logits")
    bpb = nll / math.log(2) / bytes_per_token if bytes_per_token else None
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "bits_per_byte": bpb, "top1_accuracy": hits / predicted,
            "tokens": predicted, "windows": int(w.shape[0]), "seq_len": seq_len}


def load_tokens(model_dir: Path, vocab_size: int, tokens_path: str | None, text_path: str | None):
    """(token array, bytes per token or None) from a .npy of ids or a text file."""
    if tokens_path:
        tokens = np.load(tokens_path)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{tokens_path}: expected a 1-D integer array of token ids, got "
                             f"{tokens.dtype} {list(tokens.shape)}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"{tokens_path}: token ids must be in [0, {vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        return tokens, (1.0 if vocab_size == BYTE_VOCAB else None)   # bytes known only when byte-level
    data = Path(text_path).read_bytes()
    text = TextCodec(model_dir, vocab_size)
    ids = np.asarray(text.encode(data.decode("utf-8")), np.int32)
    return ids, len(data) / max(len(ids), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m puzzlemoe_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory written by python -m convert")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help=".npy file of token ids (1-D)")
    src.add_argument("--text", help="UTF-8 text file (byte-level models, or a model dir with tokenizer.json)")
    ap.add_argument("--seq-len", type=cli.positive_int, required=True,
                    help="tokens per window (at most the model's max_position_embeddings)")
    ap.add_argument("--max-windows", type=cli.positive_int)
    ap.add_argument("--batch-size", type=cli.positive_int, default=8)
    ap.add_argument("--impl", default="auto", choices=IMPL_CHOICES, help=IMPL_HELP)
    compile_cache.add_argument(ap)
    ap.add_argument("--json", help="also write the result as JSON here")
    ap.add_argument("--no-verify", action="store_true", help="skip the shard hash check when loading")
    args = ap.parse_args(argv)
    compile_cache.enable(args.compile_cache)
    from puzzlemoe_jax.checkpoint import load_pretrained, read_config  # noqa: PLC0415
    from puzzlemoe_jax.safetensors_io import CheckpointError  # noqa: PLC0415
    try:
        cli.check_path(args.model, "dir", "--model")
        cli.check_path(args.tokens or args.text, "file", "--tokens" if args.tokens else "--text")
        if args.json:
            cli.check_path(args.json, "out", "--json")
        _, cfg = read_config(args.model)
        cfg.check_context(args.seq_len, "--seq-len", Path(args.model) / "config.json")
        model = load_pretrained(args.model, impl=args.impl, verify=not args.no_verify)
        tokens, bytes_per_token = load_tokens(Path(args.model), model.config.vocab_size, args.tokens, args.text)
        result = evaluate(model, tokens, args.seq_len, max_windows=args.max_windows,
                          batch_size=args.batch_size, bytes_per_token=bytes_per_token, progress=True)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["model"] = str(args.model)
    bpb = "n/a" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.4f}"
    print(f"{args.model}: nll/token {result['nll_per_token']:.4f} nats, perplexity "
          f"{result['perplexity']:.3f}, bits/byte {bpb}, {result['tokens']} tokens in "
          f"{result['windows']} windows of {args.seq_len}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
