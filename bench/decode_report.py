"""Tables and the plot of docs/PERFORMANCE.md from a decode_bench run's rows and log.

    python3 bench/decode_report.py docs/performance/decode-h200.jsonl \
        docs/performance/decode-h200.log --plot docs/performance/decode-h200.png

Measured rows are printed as decode_bench prints them. Besides, for every model and context of
the run, the capacity arithmetic that needs no node: HBM per kvstar sequence (the library's
shared slot pool: its reservation plus its share of the headroom, at the run's headroom fraction,
and the resident set alone, which no pool can go below), the largest batch that fits the HBM the run found free after the weights, the
batch the node's host memory could hold, the node's fill time at the fill rate the run measured,
and kvstar's step floor (weights + resident KV over the run's HBM bandwidth). Arithmetic, not
measurement: the table says so.
"""
import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_bench import BLOCK_SIZE, SHAPES, page_bytes, print_tables  # noqa: E402

GIB = 1 << 30


def parse_log(path):
    free, fill = {}, []
    with open(path) as f:
        for line in f:
            m = re.match(r"== (\S+): weights .* HBM free for KV ([\d.]+) GB", line)
            if m:
                free[m.group(1)] = float(m.group(2)) * 1e9
            m = re.search(r"flushed in .* ([\d.]+) GB/s", line)
            if m:
                fill.append(float(m.group(1)) * 1e9)
    return free, fill


def capacity_rows(rows, free, fill_rate, host_bytes, host_reserve):
    out = []
    for (model, context), full in sorted({(r["model"], r["context"]): r for r in rows
                                          if r["config"] == "full"}.items()):
        s = SHAPES[model]
        blocks = context // BLOCK_SIZE
        full_seq = s.layers * (blocks + 1) * page_bytes(s)
        max_full = max(r["max_batch"] for r in rows if r["model"] == model and
                       r["context"] == context and r["config"] == "full")
        full_b1 = next((r for r in rows if r["model"] == model and r["context"] == context and
                        r["config"] == "full" and r["batch"] == 1), None)
        headroom = next((r["headroom_fraction"] for r in rows if "headroom_fraction" in r), 0.13)
        for ratio in (0.25, 0.1):
            resident = 3 + math.ceil((blocks + 1 - 3) * ratio)
            pool_seq = s.layers * (resident * (1 + headroom) + 1) * page_bytes(s)
            bound_seq = s.layers * (resident + 1) * page_bytes(s)
            kv_seq = s.layers * blocks * page_bytes(s)
            node_cap = int((host_bytes - host_reserve) / (kv_seq * 1.1))
            floor = (full["weights_bytes"] + s.layers * resident * page_bytes(s)) / \
                full["hbm_bw"] * 1e3
            out.append({
                "model": model, "context": context, "ratio": ratio, "max_full": max_full,
                "headroom": headroom,
                "pool_fraction": pool_seq / full_seq, "pool_batch": int(free[model] // pool_seq),
                "bound_fraction": bound_seq / full_seq,
                "bound_batch": int(free[model] // bound_seq), "node_cap": node_cap,
                "fill_s": kv_seq / fill_rate if fill_rate else float("nan"),
                "first_selection_mib": s.layers * resident * page_bytes(s) / 2 ** 20,
                "floor_ms_b1": floor,
                "full_floor_ms_b1": full_b1["floor_ms"] if full_b1 else float("nan"),
            })
    return out


def print_capacity(cap):
    print("\ncapacity arithmetic (not measured): model ctx ratio | full max batch | shared "
          "pool: HBM fraction, max batch | resident only: fraction, max batch | node cap | "
          "fill s/seq | first selection MiB | batch-1 floor ms: kvstar vs full (ratio)")
    for c in cap:
        print(f"{c['model']:<12} {c['context'] // 1024:>4}K {c['ratio']:<4} | "
              f"{c['max_full']:>3} | {c['pool_fraction']:.3f} {c['pool_batch']:>4} "
              f"({c['pool_batch'] / c['max_full']:.2f}x)"
              f" | {c['bound_fraction']:.3f} {c['bound_batch']:>4} "
              f"({c['bound_batch'] / c['max_full']:.2f}x) | {c['node_cap']:>3} | "
              f"{c['fill_s']:>5.1f} | {c['first_selection_mib']:>6.0f} | "
              f"{c['floor_ms_b1']:.2f} vs {c['full_floor_ms_b1']:.2f} "
              f"({c['floor_ms_b1'] / c['full_floor_ms_b1']:.2f})")


def plot(rows, cap, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for model, color in (("qwen2.5-14b", "tab:blue"), ("llama3-8b", "tab:orange")):
        mine = [r for r in rows if r["model"] == model and r["config"] == "full"]
        b1 = sorted((r for r in mine if r["batch"] == 1), key=lambda r: r["context"])
        big = sorted((r for r in mine if r["batch"] == r["max_batch"]), key=lambda r: r["context"])
        x1 = [r["context"] // 1024 for r in b1]
        axes[0].plot(x1, [r["step_ms_p50"] for r in b1], "o-", color=color,
                     label=f"{model} full, batch 1 (measured p50)")
        axes[0].plot(x1, [r["floor_ms"] for r in b1], "--", color=color,
                     label=f"{model} floor (bytes / HBM bandwidth)")
        sparse = sorted((r for r in rows if r["model"] == model and r["config"] == "kvstar0.25"
                         and r["batch"] == 1), key=lambda r: r["context"])
        if sparse:
            axes[0].plot([r["context"] // 1024 for r in sparse],
                         [r["step_ms_p50"] for r in sparse], "s:", color=color,
                         label=f"{model} kvstar 0.25, batch 1 (measured p50)")
        runs = {}
        for r in rows:
            if r["model"] == model and r["config"] == "kvstar0.25":
                if r["batch"] > runs.get(r["context"], {"batch": 0})["batch"]:
                    runs[r["context"]] = r
        if runs:
            kx = sorted(runs)
            axes[1].plot([c // 1024 for c in kx], [runs[c]["tokens_per_s"] for c in kx], "s",
                         color=color, label=f"{model} kvstar 0.25, largest batch run")
            for c in kx:
                axes[1].annotate(f"B={runs[c]['batch']}", (c // 1024, runs[c]["tokens_per_s"]),
                                 textcoords="offset points", xytext=(4, -10), fontsize=8)
        xb = [r["context"] // 1024 for r in big]
        axes[1].plot(xb, [r["tokens_per_s"] for r in big], "o-", color=color,
                     label=f"{model} full, max batch")
        for r in big:
            axes[1].annotate(f"B={r['batch']}", (r["context"] // 1024, r["tokens_per_s"]),
                             textcoords="offset points", xytext=(4, 4), fontsize=8)
    bars = [c for c in cap if c["context"] == 32768]
    labels = [f"{c['model'].split('-')[0]}\nr={c['ratio']}" for c in bars]
    series = (("full attention (run)", "max_full", "tab:gray"),
              ("kvstar, shared pool (by HBM)", "pool_batch", "tab:red"),
              ("kvstar, resident set only", "bound_batch", "tab:green"),
              ("node host memory", "node_cap", "tab:purple"))
    width = 0.2
    for i, (name, key, color) in enumerate(series):
        axes[2].bar([j + (i - 1.5) * width for j in range(len(bars))], [c[key] for c in bars],
                    width, label=name, color=color)
    axes[2].set_xticks(range(len(bars)))
    axes[2].set_xticklabels(labels, fontsize=8)
    axes[2].set_ylabel("sequences")
    axes[2].set_title("32K: largest batch by HBM (kvstar ran 10)")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3, axis="y")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 64, 128])
        ax.set_xticklabels(["32K", "64K", "128K"])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("decode step, ms")
    axes[0].set_title("batch 1: step (measured) vs floor")
    axes[1].set_ylabel("tokens/s")
    axes[1].set_title("tokens/s at the largest batch run")
    fig.suptitle("Random-weight decoders on one H200 (kvstar: Qwen2.5-14B measured; bars: "
                 "arithmetic)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rows")
    parser.add_argument("log")
    parser.add_argument("--plot", default="")
    parser.add_argument("--host_gib", type=float, default=125.0,
                        help="host memory the run's log reports available")
    parser.add_argument("--host_reserve_gib", type=float, default=20.0)
    args = parser.parse_args()
    with open(args.rows) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    measured = [r for r in rows if not r.get("skipped")]
    free, fills = parse_log(args.log)
    fill_rate = sum(fills) / len(fills) if fills else 0.0
    print_tables(measured)
    print(f"\nnode fill rate measured: {fill_rate / 1e9:.2f} GB/s over {len(fills)} sequence(s)")
    cap = capacity_rows(measured, free, fill_rate, args.host_gib * GIB,
                        args.host_reserve_gib * GIB)
    print_capacity(cap)
    if args.plot:
        plot(measured, cap, args.plot)


if __name__ == "__main__":
    main()
