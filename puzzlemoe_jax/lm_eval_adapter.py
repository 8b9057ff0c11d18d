"""lm-evaluation-harness adapter: run standard tasks on a converted (dense or compressed) model.

    import lm_eval, puzzlemoe_jax.lm_eval_adapter  # registers the model name "puzzlemoe"
    lm_eval.simple_evaluate(model="puzzlemoe", model_args={"pretrained": OUT_DIR}, tasks=[...])

or from the shell: ``python -m lm_eval --model puzzlemoe --model_args pretrained=OUT_DIR
--tasks ... --include_path ...`` after ``import puzzlemoe_jax.lm_eval_adapter`` (e.g. through
``python -c``).  Byte-level models (vocabulary 256) need no tokenizer; others read
``tokenizer.json`` from the model directory.  Sequences are right-padded to power-of-two
lengths so that few shapes are compiled.  Generation is greedy (``puzzlemoe_jax.generate``).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from puzzlemoe_jax.checkpoint import load_pretrained
from puzzlemoe_jax.generate import generate
from puzzlemoe_jax.text import TextCodec

NEWLINE = 10


@nnx.jit
def _log_probs(model, ids):
    return jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)


@register_model("puzzlemoe")
class PuzzleMoELM(LM):
    """``loglikelihood``, ``loglikelihood_rolling`` and greedy ``generate_until`` for lm_eval;
    ``impl`` as ``kernels.IMPLS`` (refused where it cannot run)."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, max_length: int = 2048,
                 impl: str = "auto", **_ignored):
        super().__init__()
        self.model = load_pretrained(pretrained, impl=impl)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length)
        text = TextCodec(pretrained, self.model.config.vocab_size)
        self._encode, self._decode = text.encode, text.decode
        # byte models have no BOS: a newline starts a document; others use the config's BOS (or 0)
        bos = json.loads((Path(pretrained) / "config.json").read_text()).get("bos_token_id")
        self.prefix_token_id = NEWLINE if text.byte_level else (bos if isinstance(bos, int) else 0)

    # -- scoring -------------------------------------------------------------------------------
    def _score(self, seqs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For (tokens, n) pairs: log-prob of the last n tokens given the rest, and greedy match."""
        out = []
        for start in range(0, len(seqs), self.batch_size):
            batch = seqs[start:start + self.batch_size]
            width = 1 << max(1, max(len(t) for t, _ in batch) - 1).bit_length()
            ids = np.zeros((len(batch), width), np.int32)
            for r, (t, _) in enumerate(batch):
                ids[r, :len(t)] = t
            logp = np.asarray(_log_probs(self.model, jnp.asarray(ids)))
            for r, (t, n) in enumerate(batch):
                pos = np.arange(len(t) - n, len(t))
                rows = logp[r, pos - 1]
                out.append((float(rows[np.arange(n), np.asarray(t)[pos]].sum()),
                            bool(np.all(rows.argmax(-1) == np.asarray(t)[pos]))))
        return out

    def _context_continuation(self, context: str, continuation: str) -> tuple[list[int], int]:
        ctx = self._encode(context) or [self.prefix_token_id]
        cont = self._encode(continuation)
        full = (ctx + cont)[-(self.max_length + 1):]
        return full, len(cont)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._score([self._context_continuation(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = []
        for r in requests:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self._encode(r.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            results.append(sum(lp for lp, _ in self._score([(ctx + cont, len(cont)) for ctx, cont in windows])))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy continuation (KV-cache ``generate``), cut at the first ``until`` string."""
        results = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            ids = (self._encode(context) or [self.prefix_token_id])[-self.max_length:]
            text = self._decode(generate(self.model, [ids], int(kwargs.get("max_gen_toks", 64)))[0])
            for u in until:
                text = text.split(u)[0]
            results.append(text)
        return results
