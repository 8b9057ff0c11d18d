"""Train a tiny byte-level Mixtral MoE language model with torch + transformers.

Two recipes (same architecture, same total wall-clock training budget):

* ``--from-scratch``: a randomly initialised MixtralForCausalLM (8 experts,
  top-2) trained with the load-balancing auxiliary loss; experts specialise
  from the start (as in DeepSeek-MoE).
* ``--upcycle``: sparse upcycling (as Mixtral / Qwen1.5-MoE were made). First a
  dense model of the same shape (one FFN: ``num_local_experts=1``, top-1, so
  its router weight is always exactly 1) is trained for ``--dense-frac`` of the
  budget; then its FFN is copied into all 8 experts, a freshly initialised
  router is added (top-2, renormalised weights sum to 1, so the upcycled model
  computes exactly the dense function at step 0; checked) and the MoE is trained
  for the rest of the budget with a fresh AdamW.

Data: ``carry/train.txt`` and ``data/heldout.txt`` from
``benchmarks/prepare_corpus.py`` (Debian python3.11-doc reST sources), bytes
as tokens (vocab 256). Batches are random windows of ``--seq-len`` bytes.

Held-out loss: ``model(input_ids, labels=input_ids).loss`` (transformers'
shifted causal-LM cross entropy) over consecutive non-overlapping windows of
``--seq-len`` bytes of the held-out file (the last, shorter window too), each
window scored on its own (no context across windows); averaged over all
predicted bytes -> mean NLL per byte in nats, and bits/byte = nats / ln 2. It
is computed on the SAVED bf16 weights, reloaded with ``from_pretrained`` (fp32
compute, and bf16 compute as a second figure).

Output dir: sharded bf16 safetensors (``save_pretrained(max_shard_size=...)``),
config.json, ``training_record.json`` and a README.md written from the record.

Example (GPU)::

    python benchmarks/train_tiny_moe.py --from-scratch --out models/tiny-moe-scratch --time-budget 180
    python benchmarks/train_tiny_moe.py --upcycle --out models/tiny-moe-upcycled --time-budget 180
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- config
def n_experts(cfg) -> int:
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


def model_class(args):
    return Qwen2MoeForCausalLM if args.arch == "qwen2_moe" else MixtralForCausalLM


def make_config(args, num_experts: int, top_k: int):
    if args.arch == "qwen2_moe":  # fine-grained: many small routed experts + a shared expert (Qwen1.5-MoE)
        return Qwen2MoeConfig(
            vocab_size=256, hidden_size=args.hidden, intermediate_size=args.shared_intermediate,
            moe_intermediate_size=args.intermediate, shared_expert_intermediate_size=args.shared_intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            hidden_act="silu", max_position_embeddings=args.seq_len, initializer_range=0.02, rms_norm_eps=1e-5,
            tie_word_embeddings=False, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
            router_aux_loss_coef=args.aux_coef, qkv_bias=True, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.seq_len,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,  # saved config: plain LM loss; training passes it per call
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return cfg


def set_experts_impl(model, name: str):
    try:
        model.set_experts_implementation(name)
    except AttributeError:  # older transformers
        model.config._experts_implementation = name


def set_attn_impl(model, name: str):
    try:
        model.set_attn_implementation(name)
    except AttributeError:
        model.config._attn_implementation = name


# --------------------------------------------------------------------------- data
class Batcher:
    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int, device):
        self.data = data.to(device)
        self.batch, self.seq = batch, seq
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.ar = torch.arange(seq, device=device)
        self.device = device

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.seq, (self.batch,), generator=self.gen)
        idx = starts.to(self.device)[:, None] + self.ar[None, :]
        return self.data[idx].long()


def read_bytes(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def heldout_loss(model, data: torch.Tensor, seq: int, device, batch: int = 64, max_bytes: int | None = None,
                 autocast_dtype=None) -> dict:
    """Mean NLL per predicted byte over consecutive non-overlapping windows, each scored alone."""
    was_training = model.training
    model.eval()
    if max_bytes is not None:
        data = data[:max_bytes]
    n = data.numel()
    n_full = n // seq
    total_nll, total_tok = 0.0, 0
    full = data[: n_full * seq].view(n_full, seq).long()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _nullctx()
    with ctx:
        for i in range(0, n_full, batch):
            x = full[i: i + batch].to(device)
            loss = model(input_ids=x, labels=x).loss.float().item()
            total_nll += loss * x.shape[0] * (seq - 1)
            total_tok += x.shape[0] * (seq - 1)
        rest = data[n_full * seq:]
        if rest.numel() >= 2:
            x = rest[None].long().to(device)
            total_nll += model(input_ids=x, labels=x).loss.float().item() * (rest.numel() - 1)
            total_tok += rest.numel() - 1
    model.train(was_training)
    nats = total_nll / total_tok
    return {"nats_per_byte": nats, "bits_per_byte": nats / LN2, "predicted_bytes": total_tok,
            "windows": n_full + (1 if rest.numel() >= 2 else 0), "window_len": seq, "eval_bytes": n}


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def expert_usage(model, data: torch.Tensor, seq: int, device, batch: int = 64, max_bytes: int = 65536) -> list:
    """Fraction of top-k assignments per expert, per layer, on the first max_bytes held-out bytes."""
    model.eval()
    cfg = model.config
    E, k = n_experts(cfg), cfg.num_experts_per_tok
    counts = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.float64)
    d = data[:max_bytes]
    n_full = d.numel() // seq
    full = d[: n_full * seq].view(n_full, seq).long()
    for i in range(0, n_full, batch):
        x = full[i: i + batch].to(device)
        out = model(input_ids=x, output_router_logits=True)
        for l, logits in enumerate(out.router_logits):
            top = torch.topk(logits.float(), k, dim=-1).indices.reshape(-1).cpu()
            counts[l] += torch.bincount(top, minlength=E).double()
    model.train()
    return (counts / counts.sum(dim=1, keepdim=True)).round(decimals=4).tolist()


# --------------------------------------------------------------------------- training
def lr_at(step, total, warmup, peak, min_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optim(model, lr, wd):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    kw = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def pick_experts_impl(model, batcher, device, candidates, use_aux, amp_dtype) -> dict:
    """Time fwd+bwd (no optimizer step) of each candidate experts implementation; pick the fastest that works."""
    timings = {}
    x = batcher.next()
    ref = None
    for name in candidates:
        try:
            set_experts_impl(model, name)
            ts = []
            for r in range(4):
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(input_ids=x, labels=x, output_router_logits=use_aux)
                out.loss.backward()
                sync(device)
                ts.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if not math.isfinite(loss) or (ref is not None and abs(loss - ref) > 0.05 * abs(ref)):
                raise RuntimeError(f"loss {loss} vs reference {ref}")
            ref = loss if ref is None else ref
            timings[name] = {"s_per_fwd_bwd": min(ts[1:]), "loss": loss}
        except Exception as e:  # noqa: BLE001
            model.zero_grad(set_to_none=True)
            timings[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ok = {k: v for k, v in timings.items() if "s_per_fwd_bwd" in v}
    best = min(ok, key=lambda k: ok[k]["s_per_fwd_bwd"])
    set_experts_impl(model, best)
    print(f"experts implementation: {best}  {json.dumps(timings)}", flush=True)
    return {"chosen": best, "timings": timings}


def train_phase(model, batcher, args, device, *, name, budget_s, peak_lr, warmup, use_aux, max_steps=None,
                held=None, budget_share=None):
    """AdamW + linear warmup + cosine to min_lr_frac*peak. The number of steps is fixed after a timed
    calibration of the first `calib` steps so that the phase fills budget_s (or max_steps if given)."""
    opt = make_optim(model, peak_lr, args.weight_decay)
    per_layer = args.aux_mode == "per-layer"
    E, k = n_experts(model.config), model.config.num_experts_per_tok
    # per-layer mode: switch off transformers' built-in aux term (one global balance over all layers' tokens
    # concatenated, which lets single layers collapse) and add the per-layer mean ourselves
    model.router_aux_loss_coef = 0.0 if per_layer else args.aux_coef
    amp = torch.bfloat16 if (device.type == "cuda" or args.cpu_bf16) else None
    model.train()
    hist = []
    total = max_steps if max_steps is not None else None
    calib = args.calib_steps
    step = 0
    acc_lm = torch.zeros((), device=device)
    acc_aux = torch.zeros((), device=device)
    acc_n = 0
    t_start = time.perf_counter()
    t_calib0 = None
    s_per_step = None
    last = {}
    while True:
        if total is not None and step >= total:
            break
        lr = lr_at(step, total if total is not None else 10 ** 9, warmup, peak_lr, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batcher.next()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(input_ids=x, labels=x, output_router_logits=use_aux)
        if use_aux and per_layer:
            # out.loss is the pure LM loss (model.router_aux_loss_coef = 0); balance every layer on its own
            aux_t = torch.stack([load_balancing_loss_func((g,), E, k) for g in out.router_logits]).mean()
            loss = out.loss + args.aux_coef * aux_t
        else:
            loss = out.loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if use_aux:
            aux = (aux_t if per_layer else out.aux_loss).detach().float()
        else:
            aux = torch.zeros((), device=device)
        lm = loss.detach().float() - (args.aux_coef * aux if use_aux else 0.0)
        acc_lm += lm
        acc_aux += aux
        acc_n += 1
        step += 1
        if total is None:
            if step == 5:
                sync(device)
                t_calib0 = time.perf_counter()
            elif step == calib:
                sync(device)
                now = time.perf_counter()
                s_per_step = (now - t_calib0) / (calib - 5)
                remaining = budget_s - (now - t_start)
                total = calib + max(1, int(remaining / s_per_step))
                share = budget_share if budget_share is not None else budget_s / args.time_budget
                cap = int(args.max_epochs * share * batcher.data.numel()
                          / (args.batch * args.seq_len))
                if total > cap:
                    print(f"[{name}] capping {total} -> {cap} steps (max_epochs={args.max_epochs})", flush=True)
                    total = max(calib + 1, cap)
                print(f"[{name}] calibrated {s_per_step * 1e3:.1f} ms/step -> {total} steps for {budget_s:.0f}s",
                      flush=True)
        if step % args.log_every == 0 or (total is not None and step == total):
            elapsed = time.perf_counter() - t_start
            rec = {"step": step, "time_s": round(elapsed, 2), "lr": lr,
                   "train_lm_loss": round(acc_lm.item() / acc_n, 5),
                   "grad_norm": round(float(gn), 4)}
            if use_aux:
                rec["aux_loss"] = round(acc_aux.item() / acc_n, 5)
            hist.append(rec)
            print(f"[{name}] " + json.dumps(rec), flush=True)
            acc_lm.zero_()
            acc_aux.zero_()
            acc_n = 0
            last = rec
            if held is not None and args.eval_every and step % args.eval_every == 0:
                hp = heldout_loss(model, held, args.seq_len, device, args.eval_batch, args.eval_prefix_bytes, amp)
                rec["heldout_prefix_nats_per_byte"] = round(hp["nats_per_byte"], 5)
                print(f"[{name}] step {step} held-out prefix ({args.eval_prefix_bytes} B) "
                      f"{hp['nats_per_byte']:.4f} nats/byte", flush=True)
            if max_steps is None and elapsed > budget_s * 1.25:
                print(f"[{name}] stopping early: {elapsed:.0f}s > 1.25 x budget", flush=True)
                break
    sync(device)
    wall = time.perf_counter() - t_start
    tokens = step * args.batch * args.seq_len
    return {"phase": name, "steps": step, "planned_steps": total, "wall_s": round(wall, 2),
            "calibrated_ms_per_step": round(s_per_step * 1e3, 2) if s_per_step else None,
            "batch": args.batch, "seq_len": args.seq_len,
            "tokens_seen": tokens, "epochs_over_train": round(tokens / batcher.data.numel(), 3),
            "peak_lr": peak_lr, "warmup_steps": warmup, "min_lr_frac": args.min_lr_frac,
            "final_train_lm_loss_last_log_window": last.get("train_lm_loss"),
            "loss_curve": hist}


def upcycle_state(dense_sd: dict, moe_model) -> dict:
    """Dense (1 expert) state dict -> MoE state dict: FFN copied into every expert, router from moe_model's init."""
    E = moe_model.config.num_local_experts
    moe_sd = moe_model.state_dict()
    new = {}
    for k, v in moe_sd.items():
        if k.endswith("mlp.gate.weight"):
            new[k] = v  # fresh router
        elif k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            src = dense_sd[k]
            assert src.shape[0] == 1, (k, src.shape)
            new[k] = src.expand(E, *src.shape[1:]).clone()
        else:
            new[k] = dense_sd[k].clone()
    return new


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-scratch", action="store_true")
    mode.add_argument("--upcycle", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=Path, default=REPO / "carry" / "train.txt")
    ap.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout.txt")
    ap.add_argument("--manifest", type=Path, default=REPO / "data" / "manifest.json")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--upcycle-lr", type=float, default=1e-3, help="peak LR of the MoE phase after upcycling")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--upcycle-warmup", type=int, default=50)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--aux-mode", choices=["per-layer", "global"], default="per-layer",
                    help="load-balancing loss: mean over layers of each layer's Switch/Mixtral loss (per-layer), or "
                         "transformers' built-in one over all layers' router logits concatenated (global)")
    ap.add_argument("--time-budget", type=float, default=180.0, help="training seconds (both phases together)")
    ap.add_argument("--dense-frac", type=float, default=0.4, help="upcycle: share of the budget for the dense phase")
    ap.add_argument("--max-steps", type=int, default=None, help="fixed steps (per phase) instead of the time budget")
    ap.add_argument("--calib-steps", type=int, default=40)
    ap.add_argument("--max-epochs", type=float, default=12.0,
                    help="cap on passes over the training bytes (whole run; a phase gets its budget share)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=500, help="score a held-out prefix every N steps (0: off)")
    ap.add_argument("--eval-prefix-bytes", type=int, default=65536)
    ap.add_argument("--eval-max-bytes", type=int, default=None, help="score only a prefix (CPU tests)")
    ap.add_argument("--max-shard-size", default="4MB")
    ap.add_argument("--experts-impl", default="auto", help="auto | eager | grouped_mm | batched_mm")
    ap.add_argument("--attn-impl", default=None, help="default: sdpa on CUDA, eager on CPU")
    ap.add_argument("--cpu-bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["mixtral", "qwen2_moe"], default="mixtral",
                    help="qwen2_moe: fine-grained experts (--intermediate is each routed expert's) + a shared expert")
    ap.add_argument("--shared-intermediate", type=int, default=192, help="qwen2_moe: shared expert's intermediate size")
    args = ap.parse_args()

    t_all = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.bfloat16 if (device.type == "cuda" or args.cpu_bf16) else None
    attn_impl = args.attn_impl or ("sdpa" if device.type == "cuda" else "eager")

    train = read_bytes(args.train)
    held = read_bytes(args.heldout)
    manifest = json.loads(args.manifest.read_text()) if args.manifest.exists() else {}
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}; train {train.numel()} B, "
          f"held-out {held.numel()} B", flush=True)

    batcher = Batcher(train, args.batch, args.seq_len, args.seed + 1, device)
    phases, extra = [], {}
    moe_cfg = make_config(args, args.experts, args.top_k)
    candidates = ["grouped_mm", "eager"] if args.experts_impl == "auto" else [args.experts_impl]

    if args.from_scratch:
        recipe = "from-scratch"
        model = model_class(args)(moe_cfg).to(device)
        set_attn_impl(model, attn_impl)
        extra["experts_impl_selection"] = pick_experts_impl(model, batcher, device, candidates, True, amp)
        phases.append(train_phase(model, batcher, args, device, name="moe", budget_s=args.time_budget,
                                  peak_lr=args.lr, warmup=args.warmup, use_aux=True, max_steps=args.max_steps, held=held))
    else:
        recipe = "sparse-upcycling"
        # dense phase: dense_frac of the time budget (and of the max_epochs token cap); MoE phase: the time left
        # (and the remaining share of the token cap)
        dense_cfg = make_config(args, 1, 1)
        dense = MixtralForCausalLM(dense_cfg).to(device)
        set_attn_impl(dense, attn_impl)
        extra["dense_experts_impl_selection"] = pick_experts_impl(dense, batcher, device, candidates, False, amp)
        phases.append(train_phase(dense, batcher, args, device, name="dense", budget_s=args.time_budget * args.dense_frac,
                                  peak_lr=args.lr, warmup=args.warmup, use_aux=False, max_steps=args.max_steps, held=held))
        dense_h = heldout_loss(dense, held, args.seq_len, device, args.eval_batch, args.eval_max_bytes, amp)
        phases[-1]["heldout_autocast_fp32_weights"] = dense_h
        print(f"[dense] held-out {json.dumps(dense_h)}", flush=True)
        model = MixtralForCausalLM(moe_cfg).to(device)  # fresh router init comes from here
        set_attn_impl(model, attn_impl)
        model.load_state_dict(upcycle_state(dense.state_dict(), model), strict=True)
        # function preservation check (fp32, no autocast): upcycled MoE == dense model at step 0
        set_experts_impl(model, "eager")
        set_experts_impl(dense, "eager")
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 for the check (TF32 alone gives ~1e-2)
        with torch.no_grad():
            x = batcher.next()[:4]
            dense.eval(); model.eval()
            ref = dense(input_ids=x).logits
            d = (model(input_ids=x).logits - ref).abs().max().item()
            scale = ref.abs().max().item()
            model.train()
        torch.backends.cuda.matmul.allow_tf32 = tf32
        extra["upcycle_check_max_abs_logit_diff_fp32"] = d
        extra["upcycle_check_max_abs_logit"] = scale
        print(f"[upcycle] max |logits_moe - logits_dense| at init = {d:.3e} (max |logit| {scale:.2f})", flush=True)
        assert d < 1e-4 * max(1.0, scale), d
        del dense
        extra["experts_impl_selection"] = pick_experts_impl(model, batcher, device, candidates, True, amp)
        phases.append(train_phase(model, batcher, args, device, name="moe",
                                  budget_s=args.time_budget - phases[0]["wall_s"], budget_share=1 - args.dense_frac,
                                  peak_lr=args.upcycle_lr,
                                  warmup=args.upcycle_warmup, use_aux=True, max_steps=args.max_steps, held=held))

    train_wall = sum(p["wall_s"] for p in phases)
    # in-memory (fp32 master weights, bf16 autocast) held-out for reference
    h_mem = heldout_loss(model, held, args.seq_len, device, args.eval_batch, args.eval_max_bytes, amp)
    usage = expert_usage(model, held, args.seq_len, device, args.eval_batch)

    # ---- save bf16, sharded
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    size = sum((out / s).stat().st_size for s in shards)
    cfg_json = json.loads((out / "config.json").read_text())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- held-out on the SAVED weights, reloaded by transformers
    held_res = {}
    for tag, dt in (("fp32_compute", torch.float32), ("bf16_compute", torch.bfloat16)):
        m = model_class(args).from_pretrained(out, dtype=dt, attn_implementation=attn_impl).to(device)
        held_res[tag] = heldout_loss(m, held, args.seq_len, device, args.eval_batch, args.eval_max_bytes)
        print(f"held-out (saved bf16 weights, {tag}, attn={attn_impl}): {json.dumps(held_res[tag])}", flush=True)
        del m

    n_params = sum(v.numel() for v in model_class(args)(moe_cfg).state_dict().values())
    record = {
        "recipe": recipe,
        "description": (f"{args.experts}-expert top-{args.top_k} {model_class(args).__name__} trained from random init "
                        "with load-balancing aux loss" + (f" (expert intermediate {args.intermediate}, shared expert "
                                                          f"{args.shared_intermediate}, sigmoid-gated)"
                                                          if args.arch == "qwen2_moe" else "")
                        if args.from_scratch else
                        f"dense model (1 FFN) trained for {args.dense_frac:.0%} of the time budget, FFN copied into "
                        f"all {args.experts} experts + fresh router, then MoE training for the time left "
                        f"(token caps: {args.dense_frac:.0%} / {1 - args.dense_frac:.0%} of max_epochs; "
                        f"fresh AdamW, peak LR {args.upcycle_lr})"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "optimizer": "AdamW(betas=(0.9,0.95), eps=1e-8, wd on >=2-D params), grad clip, linear warmup + cosine to "
                     "min_lr_frac*peak; bf16 autocast, fp32 master weights; steps fixed after timing the first "
                     "calib_steps steps so that each phase fills its share of time_budget",
        "loss": "transformers causal-LM cross entropy + aux_coef * load-balancing loss in MoE phases "
                "(aux_mode per-layer: mean over layers of transformers' load_balancing_loss_func applied to each "
                "layer's router logits alone; global: transformers' built-in term); train_lm_loss excludes the aux "
                "term; aux_loss is ~top_k (=2) when balanced",
        "model": {"architecture": model_class(args).__name__, "n_params": n_params,
                  "safetensors_bytes_bf16": size, "shards": shards, "saved_config": cfg_json},
        "phases": phases,
        "total_train_steps": sum(p["steps"] for p in phases),
        "train_wall_s": round(train_wall, 2),
        "script_wall_s": round(time.perf_counter() - t_all, 2),
        "final_train_lm_loss": phases[-1]["final_train_lm_loss_last_log_window"],
        "final_train_bits_per_byte": (phases[-1]["final_train_lm_loss_last_log_window"] / LN2
                                      if phases[-1]["final_train_lm_loss_last_log_window"] is not None else None),
        "heldout": {
            "method": "model(input_ids, labels=input_ids).loss over consecutive non-overlapping windows of "
                      f"{args.seq_len} bytes of data/heldout.txt, each window scored alone, weighted by predicted "
                      "bytes; saved bf16 weights reloaded with from_pretrained",
            "saved_bf16_weights": held_res,
            "in_memory_fp32_weights_bf16_autocast": h_mem,
            "nats_per_byte": held_res["fp32_compute"]["nats_per_byte"],
            "bits_per_byte": held_res["fp32_compute"]["bits_per_byte"],
        },
        "heldout_expert_usage_first_64KiB": {"note": "fraction of top-k assignments per expert, per layer",
                                             "per_layer": usage},
        "device": (torch.cuda.get_device_name() if device.type == "cuda" else f"cpu {platform.processor()}"),
        "attn_implementation_training": attn_impl,
        "amp_dtype": str(amp),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "corpus": {k: manifest.get(k) for k in ("package", "version", "source_dir", "split_rule", "join")}
                  | {"train_bytes": train.numel(), "train_sha256": manifest.get("train", {}).get("sha256"),
                     "heldout_bytes": held.numel(), "heldout_sha256": manifest.get("heldout", {}).get("sha256")},
        **extra,
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_readme(record, out.name))
    print(f"saved {out}: {len(shards)} shards, {size} bytes; held-out "
          f"{record['heldout']['nats_per_byte']:.4f} nats/byte = {record['heldout']['bits_per_byte']:.4f} bits/byte; "
          f"final train lm loss {record['final_train_lm_loss']}", flush=True)


def model_readme(r: dict, name: str) -> str:
    c = r["model"]["saved_config"]
    arch = r["model"]["architecture"]
    experts = c.get("num_local_experts") or c.get("num_experts")
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    shared = (f", shared expert intermediate {c['shared_expert_intermediate_size']} (sigmoid gate)"
              if c.get("shared_expert_intermediate_size") else "")
    h = r["heldout"]
    hp = r["hyperparameters"]
    usage = "\n".join(f"- layer {i}: min {min(u):.3f}, max {max(u):.3f}"
                      for i, u in enumerate(r["heldout_expert_usage_first_64KiB"]["per_layer"]))
    ph = "\n".join(f"| {p['phase']} | {p['steps']} | {p['wall_s']} | {p['tokens_seen']} | {p['peak_lr']} | "
                   f"{p['final_train_lm_loss_last_log_window']} |" for p in r["phases"])
    return f"""# {name}

Tiny byte-level (vocab 256) `{arch}`, recipe **{r['recipe']}**: {r['description']}.
Trained by `benchmarks/train_tiny_moe.py` on {r['device']} (torch {r['versions']['torch']},
transformers {r['versions']['transformers']}). All figures below are copied from `training_record.json`,
written by that run.

Corpus: reST sources of the Python 3.11 docs from Debian package `{r['corpus']['package']}`
{r['corpus']['version']} (see `data/README.md`); {r['corpus']['train_bytes']} training bytes,
held-out `data/heldout.txt` ({r['corpus']['heldout_bytes']} bytes, whole files held out).

Shape: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads
({c['num_key_value_heads']} KV heads), {experts} experts top-{c['num_experts_per_tok']},
expert intermediate {inter}{shared}, untied embeddings; {r['model']['n_params']} parameters,
{r['model']['safetensors_bytes_bf16']} bytes of bf16 safetensors in {len(r['model']['shards'])} shards.

| phase | steps | wall s | tokens | peak LR | final train LM loss (nats/byte) |
| --- | --- | --- | --- | --- | --- |
{ph}

Held-out (saved bf16 weights, fp32 compute, windows of {h['saved_bf16_weights']['fp32_compute']['window_len']} bytes
scored alone): **{h['nats_per_byte']:.4f} nats/byte = {h['bits_per_byte']:.4f} bits/byte**
(bf16 compute: {h['saved_bf16_weights']['bf16_compute']['bits_per_byte']:.4f} bits/byte).

Load: `{arch}.from_pretrained("models/{name}")`; input ids are raw UTF-8 bytes (no tokenizer,
no BOS/EOS). The checkpoint uses the standard key names as transformers saves them. The config
sets no attention or experts implementation, so loading with `attn_implementation="eager"` works.

Recipe details: batch {hp['batch']} x {hp['seq_len']} bytes (random windows), AdamW (betas 0.9/0.95,
weight decay {hp['weight_decay']}), clip {hp['clip']}, linear warmup then cosine to {hp['min_lr_frac']} x peak,
bf16 autocast, fp32 master weights. Load-balancing loss: coefficient {hp['aux_coef']}, mode `{hp.get('aux_mode', 'global')}`.
Attention during training: `{r['attn_implementation_training']}`; experts forward: `{r['experts_impl_selection']['chosen']}`.
Each phase's step count was fixed after timing its first {hp['calib_steps']} steps, so that it fills its share of
the {hp['time_budget']} s budget, capped at {hp['max_epochs']} passes over the training bytes in total.
Held-out expert usage (fraction of top-{c['num_experts_per_tok']} assignments on the first 64 KiB), by layer:
{usage}
"""


if __name__ == "__main__":
    main()
