#!/usr/bin/env python3
"""Quality against bytes read per query, at the 2% budget, on real KV caches.

Issue #3 asks for recall@100 >= 0.95, covered mass within 0.01 of the oracle and output error no
higher than the oracle's, at no more than 5% of the visible keys' fp16 K+V bytes read per query,
and for the same quality at 10% and the curve between. This tool measures that curve.

For each dump it builds two indexes: query-aware (the default: keys clustered under the metric
of the dump's train queries) and plain key distance (`--set query_aware=false`). It then runs
`strata eval` over every evaluation query for:
- strata on each index, over `probe_fraction` (the share of keys whose codes are scored);
- plain k-means IVF over `ivf_scan_factor` (keys scanned, as a multiple of the budget);
- the oracle (its covered mass and output error are the targets).

The JSON of every run is kept under out/plot-bytes/. The tool prints a table and draws
docs/quality-vs-bytes.svg: recall@100, covered mass and output error against bytes read (%), one
row per dump, the 5% and 10% lines marked.

Setup: as for quality_vs_budget.py (a venv with matplotlib under tools/plot/.venv).

Run (from the repository root, after `cargo build --release -p strata`):

    tools/plot/.venv/bin/python tools/plot/quality_vs_bytes.py

`--dumps` adds dumps beyond the two shared ones (for example those tools/dump writes to
out/dumps/); `--reuse` redraws from the JSON already in out/plot-bytes/.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBES = [0.06, 0.08, 0.10, 0.15, 0.20, 0.28, 0.40, 0.55, 0.70, 0.85]
SCANS = [1.5, 2, 3, 4, 8]
SHARED = ["smollm2-jargon-8k", "gemma3-jargon-16k"]
STYLE = {
    "strata": dict(color="#d62728", marker="o", lw=2.2),
    "strata, key-distance clusters": dict(color="#ff9896", marker="o", ls="--"),
    "ivf": dict(color="#1f77b4", marker="s"),
}


def run(cmd, quiet=True):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL if quiet else None)


def load(path):
    runs = json.loads(path.read_text())
    return (runs["runs"] if "runs" in runs else [runs])[0]["summary"]


def collect(args, dumps):
    out = ROOT / "out" / "plot-bytes"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for stem, dump in dumps:
        res = results.setdefault(stem, {})
        for kind, extra in (("qa", []), ("plain", ["--set", "query_aware=false"])):
            index = out / f"{stem}-{kind}"
            if not (args.reuse and (index / "index.strata").exists()):
                run([args.strata, "build", dump, "--out", index, "--force", *extra], quiet=False)
        def evaluate(name, index, method, sets):
            path = out / f"{name}.json"
            if not (args.reuse and path.exists()):
                cmd = [args.strata, "eval", dump, "--index", out / index, "--method", method,
                       "--no-query-detail", "--json", path]
                for s in sets:
                    cmd += ["--set", s]
                run(cmd)
            return load(path)
        res["oracle"] = [(None, evaluate(f"{stem}-oracle", f"{stem}-qa", "oracle", []))]
        for kind, label in (("qa", "strata"), ("plain", "strata, key-distance clusters")):
            res[label] = [(p, evaluate(f"{stem}-{kind}-{p}", f"{stem}-{kind}", "strata",
                                       [f"probe_fraction={p}"])) for p in PROBES]
        res["ivf"] = [(f, evaluate(f"{stem}-ivf-{f}", f"{stem}-qa", "ivf",
                                   [f"ivf_scan_factor={f}"])) for f in SCANS]
    return results


def table(results):
    for stem, res in results.items():
        o = res["oracle"][0][1]
        print(f"\n{stem}: oracle mass {o['covered_mass']:.4f}, err {o['output_error']:.4f}")
        print(f"{'method':<32} {'knob':>6} {'bytes%':>7} {'R@100':>6} {'mass':>7} {'err':>7} ok")
        for method in ("strata", "strata, key-distance clusters", "ivf"):
            for knob, s in res[method]:
                ok = (s["recall@100"] >= 0.95 and s["covered_mass"] >= o["covered_mass"] - 0.01
                      and s["output_error"] <= o["output_error"])
                print(f"{method:<32} {knob:>6} {100 * s['bytes_read_fraction']:>7.2f} "
                      f"{s['recall@100']:>6.3f} {s['covered_mass']:>7.4f} "
                      f"{s['output_error']:>7.4f} {'yes' if ok else ''}")


def draw(results, svg):
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "strata"
    import matplotlib.pyplot as plt

    metrics = [("recall@100", "recall@100"), ("covered_mass", "covered mass"),
               ("output_error", "output error")]
    stems = list(results)
    fig, axes = plt.subplots(len(stems), len(metrics),
                             figsize=(4.4 * len(metrics), 3.4 * len(stems)), squeeze=False)
    for row, stem in enumerate(stems):
        res = results[stem]
        oracle = res["oracle"][0][1]
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for method in ("strata", "strata, key-distance clusters", "ivf"):
                pts = sorted(res[method], key=lambda p: p[1]["bytes_read_fraction"])
                ax.plot([100 * s["bytes_read_fraction"] for _, s in pts], [s[key] for _, s in pts],
                        label=method, **STYLE[method])
            if key == "recall@100":
                ax.axhline(0.95, color="grey", lw=0.8, ls=":")
            else:
                ax.axhline(oracle[key], color="black", lw=1, ls=":", label="oracle")
                if key == "covered_mass":
                    ax.axhline(oracle[key] - 0.01, color="grey", lw=0.8, ls=":")
            if key == "output_error":
                ax.set_yscale("log")
            for x in (5, 10):
                ax.axvline(x, color="grey", lw=0.8, ls="-.")
            ax.set_xlim(0, 20)
            ax.set_xlabel("bytes read per query, % of visible fp16 K+V")
            ax.set_title(f"{stem}: {label}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("strata eval at a 2% budget, every evaluation query "
                 "(strata: probe_fraction swept; ivf: scan factor swept)", fontsize=11)
    fig.tight_layout()
    svg.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(svg, format="svg", metadata={"Date": None})
    print(f"wrote {svg}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strata", default=str(ROOT / "target" / "release" / "strata"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--dumps", nargs="*", default=[], help="more kvdump files")
    ap.add_argument("--reuse", action="store_true", help="reuse JSON in out/plot-bytes/")
    ap.add_argument("--svg", default=str(ROOT / "docs" / "quality-vs-bytes.svg"))
    args = ap.parse_args()
    if not os.access(args.strata, os.X_OK):
        sys.exit(f"{args.strata} is not built: cargo build --release -p strata")
    dumps = [(s, Path(args.data).resolve() / f"{s}.safetensors") for s in SHARED]
    dumps += [(Path(d).stem, Path(d).resolve()) for d in args.dumps]
    for _, d in dumps:
        if not d.exists():
            sys.exit(f"missing dump {d}")
    results = collect(args, dumps)
    table(results)
    draw(results, Path(args.svg))


if __name__ == "__main__":
    main()
