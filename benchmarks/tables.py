"""Render bench_kernel.py / bench_moe_layer.py / bench_mosaic.py JSON as the markdown tables of RESULTS.md.

    python3 benchmarks/tables.py bench_kernel.json bench_moe_layer.json
    python3 benchmarks/tables.py --mosaic bench_mosaic.json
    python3 benchmarks/tables.py --mosaic-summary run1.json run2.json ...   (later runs win per shape, M)
    python3 benchmarks/tables.py --layer-summary run1.json run2.json ...    (later runs win per T)
"""
import json
import sys


def us(ms):
    return "n/a" if ms is None or ms != ms else f"{ms * 1e3:.1f}"


def kernel_tables(res):
    c = res["ceilings"]
    out = [f"Device: {res['info']['device']} ({res['info'].get('nvidia_smi', '')}), jax {res['info']['jax']}, "
           f"run {res['info']['date_utc']} UTC.",
           f"Measured ceilings: device copy {c['copy_GBps']:.0f} GB/s (read+write, 1 GiB), "
           f"read-only {c['read_GBps']:.0f} GB/s (1 GiB max-reduction).", "",
           "| shape [K x N] | M | 2 bf16 dots (µs) | pair kernel (µs) | speedup | packed read GB/s | % of copy BW | decode+2 dots (µs) | config (bm,bn,bk,split,warps,stages) | err |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        k = r["kernel"]
        cfg = r.get("config", {})
        cs = f"{cfg.get('bm')},{cfg.get('bn')},{cfg.get('bk')},{cfg.get('split_k')},{cfg.get('num_warps')},{cfg.get('num_stages')}"
        dd = r.get("decode_then_dots", {}).get("ms")
        out.append(f"| {r['shape']} [{r['k']}x{r['n']}] | {r['m']} | {us(r['baseline_ms'])} | {us(k.get('ms'))} | "
                   f"{k.get('speedup', float('nan')):.2f} | {k.get('GBps', float('nan')):.0f} | "
                   f"{k.get('frac_copy_bw', float('nan')):.0%} | {us(dd)} | {cs} | "
                   f"{k.get('err', float('nan')):.1e}{'' if k.get('ok') else ' FAIL'} |")
    return "\n".join(out)


def variant_table(res):
    out = ["| shape | M | bm | bn | bk | split | warps | stages | swap_ab | evict_first | µs | GB/s | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in res.get("variants", []):
        c = v["config"]
        if "error" in v:
            tail = f"error: {v['error'][:80]} | | |"
        else:
            tail = f"{us(v['ms'])} | {v['GBps']:.0f} | {'diagnostic (no decode)' if v.get('no_decode') else v['ok']} |"
        out.append(f"| {v['shape']} | {v['m']} | {c['bm']} | {c['bn']} | {c['bk']} | {c['split_k']} | "
                   f"{c['num_warps']} | {c['num_stages']} | {c['swap_ab']} | {c.get('evict_first', False)} | {tail}")
    return "\n".join(out)


def layer_tables(res):
    s = res["shape"]
    out = [f"Device: {res['info']['device']}, run {res['info']['date_utc']} UTC. Layer E={s['E']} H={s['H']} "
           f"I={s['I']} top-{s['topk']}, all {s['E'] // 2} pairs merged; weights {res['bytes']['dense'] / 1e9:.2f} GB "
           f"dense, {res['bytes']['packed'] / 1e9:.2f} GB packed.", "",
           "| tokens T | active experts | active pairs | uncompressed XLA layer (µs) | packed layer (µs) | speedup | rel. err vs merged reference |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p = r["packed"]
        out.append(f"| {r['T']} | {r['active_experts']} | {r['active_pairs']} | {us(r['dense_ms'])} | {us(p['ms'])} | "
                   f"{p['speedup']:.2f} | {p['err']:.1e}{'' if p['ok'] else ' FAIL'} |")
    return "\n".join(out)


def layer_variants(res):
    out = ["| T | gate_up (bm,bn,bk,warps,stages) | down (bm,bn,bk,split,warps,stages) | µs | speedup |", "|---|---|---|---|---|"]
    for v in res.get("variants", []):
        g, d = v["gate_up"], v["down"]
        gs = f"{g['bm']},{g['bn']},{g['bk']},{g['num_warps']},{g['num_stages']}"
        ds = f"{d['bm']},{d['bn']},{d['bk']},{d['split_k']},{d['num_warps']},{d['num_stages']}"
        t = "error" if v.get("error") else us(v["ms"])
        sp = "" if v.get("error") else f"{v['speedup']:.2f}"
        out.append(f"| {v['T']} | {gs} | {ds} | {t} | {sp} |")
    return "\n".join(out)


def mosaic_table(res):
    """One row per (shape, M, variant) of a bench_mosaic.py run."""
    info, c = res["info"], res["ceilings"]
    out = [f"Device: {info['device']} ({info.get('nvidia_smi', '')}), jax {info['jax']}, run {info['date_utc']} UTC; "
           f"copy {c['copy_GBps']:.0f} GB/s, read-only {c['read_GBps']:.0f} GB/s.", "",
           "| shape [K x N] | M | variant | µs | packed read GB/s | % of copy BW | speed-up vs 2 dots | checked |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for name, t in r["timings"].items():
            if "ms" not in t:
                out.append(f"| {r['shape']} [{r['k']}x{r['n']}] | {r['m']} | {name} | {t['error'][:70]} | | | | |")
                continue
            dots = name == "two_dots"   # reads the bf16 weights: twice the packed bytes
            gbps = f"{t['GBps'] * (2 if dots else 1):.0f}" + (" (bf16)" if dots else "")
            frac = t["frac_copy_bw"] * (2 if dots else 1)
            ok = {True: f"ok ({t['err']:.1e})", False: "FAIL", None: "n/a"}[t["ok"]]
            out.append(f"| {r['shape']} [{r['k']}x{r['n']}] | {r['m']} | {name} | {us(t['ms'])} | {gbps} | "
                       f"{frac:.0%} | {t.get('speedup', float('nan')):.2f} | {ok} |")
    return "\n".join(out)


def merged_rows(files, key):
    """Rows of several runs, one per ``key(row)``: a later file's row replaces an earlier one."""
    rows = {}
    for f in files:
        res = json.load(open(f))
        for r in res["rows"]:
            rows[key(r)] = dict(r, _run=res["info"], _ceilings=res.get("ceilings"))
    return list(rows.values())


def mosaic_summary(files):
    """Two dots vs Triton vs Mosaic default, one row per (shape, M), merged over runs."""
    out = ["| shape [K x N] | M | 2 bf16 dots (µs) | Triton pair (µs) | Mosaic default (µs) | Mosaic packed read GB/s | "
           "% of copy BW | Mosaic speed-up | Triton speed-up | run (UTC) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in merged_rows(files, lambda r: (r["shape"], r["m"])):
        t = r["timings"]
        d, tr, mo = (t.get(n, {}) for n in ("two_dots", "triton", "mosaic_default"))
        ok = "" if mo.get("ok") else " FAIL"
        out.append(f"| {r['shape']} [{r['k']}x{r['n']}] | {r['m']} | {us(d.get('ms'))} | {us(tr.get('ms'))} | "
                   f"{us(mo.get('ms'))}{ok} | {mo.get('GBps', float('nan')):.0f} | {mo.get('frac_copy_bw', float('nan')):.0%} | "
                   f"{mo.get('speedup', float('nan')):.2f} | {tr.get('speedup', float('nan')):.2f} | "
                   f"{r['_run']['date_utc'][5:16]} |")
    return "\n".join(out)


def layer_summary(files):
    """Uncompressed vs packed layer (and impl='reference' where timed), one row per T, merged over runs."""
    out = ["| tokens T | active pairs | uncompressed XLA layer (µs) | packed, Triton (µs) | speed-up | "
           "packed, Mosaic (µs) | speed-up | impl='reference' (µs) | Triton gate_up tile (bm, warps) | rel. err Triton / Mosaic | run (UTC) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(merged_rows(files, lambda r: r["T"]), key=lambda r: r["T"]):
        p, mo, ref = r["packed"], r.get("packed_mosaic", {}), r.get("packed_reference_impl", {})
        g = p.get("gate_up_config", {})
        err = lambda t: "n/a" if "err" not in t else f"{t['err']:.1e}{'' if t['ok'] else ' FAIL'}"  # noqa: E731
        out.append(f"| {r['T']} | {r['active_pairs']} | {us(r['dense_ms'])} | {us(p['ms'])} | {p['speedup']:.2f} | "
                   f"{us(mo.get('ms'))} | {mo.get('speedup', float('nan')):.2f} | {us(ref.get('ms'))} | "
                   f"{g.get('bm')}, {g.get('num_warps')} | {err(p)} / {err(mo)} | {r['_run']['date_utc'][5:16]} |")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1] == "--mosaic-summary":
        print(mosaic_summary(sys.argv[2:]))
        sys.exit(0)
    if sys.argv[1] == "--layer-summary":
        print(layer_summary(sys.argv[2:]))
        sys.exit(0)
    if sys.argv[1] == "--mosaic":
        for f in sys.argv[2:]:
            print(mosaic_table(json.load(open(f))), "\n")
        sys.exit(0)
    kr = json.load(open(sys.argv[1]))
    print(kernel_tables(kr), "\n")
    print(variant_table(kr), "\n")
    if len(sys.argv) > 2:
        lr = json.load(open(sys.argv[2]))
        print(layer_tables(lr), "\n")
        print(layer_variants(lr))
