"""How often a trained router's expert loads overflow the grouped Mosaic kernel's token block.

A pair with more rows on one side than the token block (``kernels.mosaic_ffn.grouped_block_m``) takes
a second tile, which decodes and multiplies the pair's words again for a few rows (RESULTS.md, "Back
to back, at the power cap": a spill took a Mixtral T = 64 step from 0.95 to 0.71 of its limit).  The
block is sized from a uniform router's spread; trained routers are less even.  This script routes
held-out text through an embedded trained model (converted uncompressed, on the CPU), then for each
decode batch size T draws ``--draws`` batches of T tokens at random positions (independent sequences,
as a server's decode batch) and counts, per layer, each expert's rows.  It reports the largest
count (mean over draws and layers, and its maximum), the block, and the share of (draw, layer) steps
in which some expert has more rows than the block, beside the same for random logits; and the share of
steps in which an expert needs more than two blocks or two experts exceed the block, the only steps in
which ``kernels.mosaic_ffn.absorb_spills`` (where it applies) may leave a pair a second tile.  Prints a
table, writes JSON.

    PYTHONPATH=. python benchmarks/routing_spill.py [--model models/tiny-moe-scratch] [--tokens 8,16,32,64,128,256]
        [--draws 2000] [--out benchmarks/results/routing_spill.json] [--save-ids IDS.npz]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kernels.mosaic_ffn import grouped_block_m  # noqa: E402
from puzzlemoe_jax import calibrate, evaluate  # noqa: E402
from puzzlemoe_jax.checkpoint import load_pretrained  # noqa: E402
from puzzlemoe_jax.conversion import convert_checkpoint  # noqa: E402


def routed_ids(model_dir: Path, text: Path, seq_len: int, windows: int) -> tuple[dict[int, np.ndarray], int]:
    """(top-k expert ids [tokens, k] of every MoE layer for ``windows`` windows of held-out bytes,
    the layers' expert count)."""
    hf = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="routing-spill-") as tmp:
        convert_checkpoint(model_dir, Path(tmp) / "m", hf["model_type"], ratio=0.0)
        model = load_pretrained(Path(tmp) / "m", impl="reference")
    tokens = np.frombuffer(text.read_bytes(), np.uint8)
    out = {i: [] for i in model.moe_layers()}
    for _, routed in calibrate.routed_batches(model, evaluate.windows(tokens, seq_len, windows)):
        for i in out:
            out[i].append(np.asarray(routed[i][1]))
    return {i: np.concatenate(v) for i, v in out.items()}, model.config.num_experts


def spill_stats(ids_by_layer: dict[int, np.ndarray], num_experts: int, T: int, draws: int, rng) -> dict:
    """Largest rows per expert and the share of (draw, layer) steps with an expert over the block."""
    k = next(iter(ids_by_layer.values())).shape[1]
    block = grouped_block_m(T * k, num_experts, T)
    maxima, multi = [], []
    for ids in ids_by_layer.values():
        pick = np.stack([rng.choice(ids.shape[0], T, replace=False) for _ in range(draws)])   # [draws, T]
        counts = np.stack([np.bincount(ids[p].ravel(), minlength=num_experts) for p in pick])
        maxima.append(counts.max(1))
        multi.append((counts > block).sum(1) >= 2)
    maxima, multi = np.concatenate(maxima), np.concatenate(multi)
    # where kernels.mosaic_ffn.absorb_spills applies, a step keeps a second tile only when an expert needs three
    # blocks or two experts over the block form a pair (the pairing is not known here: an upper bound)
    return {"T": T, "block_m": block, "max_rows_mean": float(maxima.mean()), "max_rows_max": int(maxima.max()),
            "mean_rows": T * k / num_experts, "spill_share": float((maxima > block).mean()),
            "over_two_blocks_share": float((maxima > 2 * block).mean()),
            "two_over_block_share": float(multi.mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-moe-scratch")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "heldout.txt")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--tokens", default="8,16,32,64,128,256")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/routing_spill.json")
    ap.add_argument("--save-ids", help="also write every layer's top-k ids here (.npz, arrays layer0, layer1, ...) "
                    "for bench_moe_layer.py / sweep_mosaic.py --routing-ids")
    args = ap.parse_args(argv)
    for path, what in ((args.model / "config.json", "an HF MoE checkpoint directory's config.json"),
                       (args.text, "a held-out text file")):
        if not path.is_file():
            print(f"error: {path} does not exist (expected {what})", file=sys.stderr)
            raise SystemExit(2)
    ids, num_experts = routed_ids(args.model, args.text, args.seq_len, args.windows)
    k = next(iter(ids.values())).shape[1]
    rng = np.random.default_rng(args.seed)
    uniform = {i: np.argsort(-rng.standard_normal((v.shape[0], num_experts)), 1)[:, :k] for i, v in ids.items()}
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        rows.append({"trained": spill_stats(ids, num_experts, T, args.draws, rng),
                     "uniform": spill_stats(uniform, num_experts, T, args.draws, rng)})
    res = {"command": " ".join(sys.argv), "model": args.model.name, "experts": num_experts, "top_k": k,
           "layers": len(ids), "tokens_routed": int(next(iter(ids.values())).shape[0]), "rows": rows}
    print(f"{args.model.name}: {num_experts} experts, top-{k}, {len(ids)} layers, "
          f"{res['tokens_routed']} held-out tokens, {args.draws} draws per T and layer")
    print("| T | mean rows per expert | block | largest rows, trained: mean / max | steps over the block, trained "
          "| steps with an expert over two blocks / with two experts over the block, trained "
          "| largest rows, random logits: mean / max | steps over the block, random logits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, u = r["trained"], r["uniform"]
        print(f"| {t['T']} | {t['mean_rows']:.1f} | {t['block_m']} | {t['max_rows_mean']:.1f} / {t['max_rows_max']} | "
              f"{100 * t['spill_share']:.1f} % | {100 * t['over_two_blocks_share']:.1f} / {100 * t['two_over_block_share']:.1f} % | "
              f"{u['max_rows_mean']:.1f} / {u['max_rows_max']} | {100 * u['spill_share']:.1f} % |")
    if args.save_ids:
        np.savez_compressed(args.save_ids, **{f"layer{n}": v.astype(np.int16) for n, v in enumerate(ids.values())})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
