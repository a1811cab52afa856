#!/usr/bin/env python3
"""Plots of `moe-ep-bench-ht/ll --csv` rows (bench,tokens,op,time_us,gbps,pct_ceiling,torch_us[,gpus]).

    python3 plot_bench.py BENCH.csv OUT_DIR [TITLE]

Writes OUT_DIR/ht.png (GB/s per rank vs tokens per rank, with the same-run copy ceiling as
a fraction) and OUT_DIR/ll.png (µs per op vs tokens per rank, with torch's reference).
Rows of `--gpus N` runs (8th column) are drawn as their own series, labelled with N.
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    path, out = sys.argv[1], sys.argv[2]
    title = sys.argv[3] if len(sys.argv) > 3 else ""
    rows = list(csv.reader(open(path)))
    os.makedirs(out, exist_ok=True)
    for bench, ylabel, col in (("ht", "GB/s per rank (DeepEP accounting)", 4), ("ll", "µs per op", 3)):
        sel = [r for r in rows if r and r[0] == bench]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        gpus = lambda r: r[7] if len(r) > 7 else "1"  # noqa: E731
        for op, g in dict.fromkeys((r[2], gpus(r)) for r in sel):
            pts = sorted((int(r[1]), float(r[col])) for r in sel if r[2] == op and gpus(r) == g)
            where = f", {g} GPUs" if g != "1" else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"moe-ep {op}{where}")
        if bench == "ll":
            for op, g in dict.fromkeys((r[2].split()[0], gpus(r)) for r in sel):
                pts = sorted(
                    {int(r[1]): float(r[6]) for r in sel if r[2] == f"{op} bf16" and gpus(r) == g and r[6] != "nan"}.items()
                )
                base = f"NCCL all_to_all, {g} GPUs" if g != "1" else "torch, one GPU"
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="x", label=f"{base}: {op} bf16")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{bench.upper()} {title}".strip())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{bench}.png"), dpi=110)
        print(f"wrote {os.path.join(out, bench + '.png')}")


if __name__ == "__main__":
    main()
