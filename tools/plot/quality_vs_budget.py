#!/usr/bin/env python3
"""Quality against budget for strata and the baselines on the shared real KV caches.

Runs the release `strata eval` for each budget on both shared dumps (every method in one run,
so that they share a process and a machine state), keeps the JSON of every run under
out/plot/, and draws docs/quality-vs-budget.svg: recall@100, covered mass, output error and
bytes read per query against the budget (log x), one panel per metric per dump, one line per
method. strata's output error is drawn twice: with the remainder estimate (what the engine
returns, solid) and of the exact part alone (dashed).

Setup (once, from the repository root):

    python3 -m venv tools/plot/.venv && tools/plot/.venv/bin/pip install matplotlib

Run (from the repository root, after `cargo build --release --all-features -p strata`):

    tools/plot/.venv/bin/python tools/plot/quality_vs_budget.py

`--reuse` redraws from the JSON already in out/plot/ without running eval again.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = [0.005, 0.01, 0.02, 0.05, 0.10]
METHODS = ["strata", "ivf", "ivf-faiss", "hnsw", "oracle"]
DUMPS = [
    ("smollm", "smollm2-jargon-8k"),
    ("gemma", "gemma3-jargon-16k"),
]
STYLE = {
    "strata": dict(color="#d62728", marker="o", lw=2.2),
    "ivf": dict(color="#1f77b4", marker="s"),
    "ivf-faiss": dict(color="#17becf", marker="v"),
    "hnsw": dict(color="#2ca02c", marker="^"),
    "oracle": dict(color="#000000", marker="x", ls=":"),
}


def run(cmd):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def collect(args):
    data_dir = Path(args.data).resolve()
    out = ROOT / "out" / "plot"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, stem in DUMPS:
        dump = data_dir / f"{stem}.safetensors"
        if not dump.exists():
            sys.exit(f"missing dump {dump}")
        index = ROOT / "out" / name
        # Rebuilt unless --reuse: an index left by an older build would not show today's code.
        if not (args.reuse and (index / "index.strata").exists()):
            run([args.strata, "build", dump, "--out", index, "--force"])
        for budget in BUDGETS:
            path = out / f"{name}-{budget}.json"
            if not (args.reuse and path.exists()):
                t0 = time.time()
                run([args.strata, "eval", dump, "--index", index,
                     "--method", ",".join(METHODS), "--budget", budget,
                     "--query-stride", args.query_stride, "--no-query-detail",
                     "--json", path])
                print(f"  {name} budget {budget}: {time.time() - t0:.0f} s", flush=True)
            runs = json.loads(path.read_text())
            runs = runs["runs"] if "runs" in runs else [runs]
            for r in runs:
                results.setdefault(name, {}).setdefault(r["method"], []).append(
                    (budget, r["summary"]))
    return results


def draw(results, svg):
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: a small, diffable SVG
    matplotlib.rcParams["svg.hashsalt"] = "strata"  # stable ids across redraws
    import matplotlib.pyplot as plt

    metrics = [
        ("recall@100", "recall@100"),
        ("covered_mass", "covered mass"),
        ("output_error", "output error"),
        ("bytes_read_fraction", "bytes read / fp16 K+V"),
    ]
    names = [n for n, _ in DUMPS if n in results]
    fig, axes = plt.subplots(len(names), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(names)),
                             squeeze=False)
    for row, name in enumerate(names):
        stem = dict(DUMPS)[name]
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for method in METHODS:
                pts = sorted(results[name].get(method, []), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [100 * b for b, _ in pts]
                bytes_at_2 = next((s["bytes_read_fraction"] for b, s in pts if b == 0.02), None)
                legend = method if bytes_at_2 is None else f"{method} ({100 * bytes_at_2:.0f}% bytes at 2%)"
                ax.plot(xs, [s[key] for _, s in pts], label=legend, **STYLE[method])
                if key == "output_error" and method == "strata":
                    ax.plot(xs, [s.get("output_error_exact_only", s[key]) for _, s in pts],
                            color=STYLE[method]["color"], ls="--", marker=".",
                            label="strata, exact part only")
            ax.set_xscale("log")
            ax.set_xticks([100 * b for b in BUDGETS])
            ax.set_xticklabels([f"{100 * b:g}" for b in BUDGETS])
            if key == "output_error":
                ax.set_yscale("log")
            if key == "bytes_read_fraction":
                ax.axhline(0.05, color="grey", lw=0.8, ls="-.")
                ax.text(0.55, 0.055, "issue #3 limit 5%", fontsize=7, color="grey")
            ax.set_xlabel("budget: attended tokens, % of visible keys")
            ax.set_title(f"{stem}: {label}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0 or key in ("output_error", "bytes_read_fraction"):
                ax.legend(fontsize=6.5)
    fig.suptitle("strata eval, every 4th evaluation query, all layers and heads "
                 "(+4 sink +64 recent tokens always attended)", fontsize=11)
    fig.tight_layout()
    svg.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(svg, format="svg", metadata={"Date": None})
    print(f"wrote {svg}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strata", default=str(ROOT / "target" / "release" / "strata"),
                    help="the strata binary (default: target/release/strata)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                    help="folder of the shared dumps")
    ap.add_argument("--query-stride", default=4, type=int)
    ap.add_argument("--reuse", action="store_true", help="reuse JSON already in out/plot/")
    ap.add_argument("--svg", default=str(ROOT / "docs" / "quality-vs-budget.svg"))
    args = ap.parse_args()
    if not os.access(args.strata, os.X_OK):
        sys.exit(f"{args.strata} is not built: cargo build --release --all-features -p strata")
    draw(collect(args), Path(args.svg))


if __name__ == "__main__":
    main()
