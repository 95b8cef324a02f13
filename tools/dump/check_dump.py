#!/usr/bin/env python3
"""Validate a kvdump/1 file; optionally compare it with a reference dump and with the model's own
attention output.

    python check_dump.py FILE [--reference ../../../shared/data/smollm2-jargon-8k.safetensors]
                              [--attn-out FILE.attn.npz]

Layout: tensor names, dtypes (F16 / I64) and shapes against the metadata; every metadata key of
the format present and parseable; positions in range, sorted, the train positions disjoint from the
query positions; the needle range inside the prompt; finite values.

--reference: a dump of the same model (same text or not). Over the longest common prefix of
token ids (a causal model's K/V/Q at position p depend only on tokens 0..=p) and the layers both
files hold, report the relative error of keys, values and queries (eval queries and train queries
at shared positions), and the agreement of attention probabilities for the reference's queries.

--attn-out: the .npz that `dump_kv.py --attn-out` saved (the model's own attention output at the
query positions, before o_proj). Recompute softmax(scale q.K[:p+1]) V from the dump alone, as the
format defines it (GQA: head h reads kv head h / (q_heads / kv_heads)), and compare.
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from safetensors import safe_open

META_KEYS = ["format", "model", "model_type", "layers", "num_layers_in_model", "q_heads", "kv_heads", "head_dim",
             "softmax_scale", "rope_theta", "tokens", "source_text", "needle_token_range", "needle_text",
             "greedy_answer", "causal"]

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print("FAIL:", msg)


def load(path: str):
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def validate(path: str):
    meta, t = load(path)
    print(f"== {path}")
    for k in META_KEYS:
        if k not in meta:
            fail(f"metadata key {k!r} missing")
    extra = sorted(set(meta) - set(META_KEYS))
    if extra:
        print("note: extra metadata keys", extra)
    if meta.get("format") != "kvdump/1":
        fail(f"format is {meta.get('format')!r}")
    try:
        layers = json.loads(meta["layers"])
        L = len(layers)
        H, KV, D, T = (int(meta[k]) for k in ("q_heads", "kv_heads", "head_dim", "tokens"))
        nlm = int(meta["num_layers_in_model"])
        scales = json.loads(meta["softmax_scale"])
    except Exception as e:  # noqa: BLE001
        fail(f"metadata does not parse: {e}")
        return meta, t
    if len(scales) != L:
        fail("softmax_scale has not one entry per layer")
    if any(not 0 <= l < nlm for l in layers) or len(set(layers)) != L:
        fail(f"layers {layers} out of range or repeated")
    if H % KV:
        fail("q_heads not a multiple of kv_heads")
    if meta.get("rope_theta") not in ("None", "null"):
        float(meta["rope_theta"])
    Q = t["query_positions"].shape[0] if "query_positions" in t else -1
    S = t["train_positions"].shape[0] if "train_positions" in t else -1
    expect = {
        "keys": ("float16", (L, KV, T, D)),
        "values": ("float16", (L, KV, T, D)),
        "queries": ("float16", (L, H, Q, D)),
        "query_positions": ("int64", (Q,)),
        "train_queries": ("float16", (L, H, S, D)),
        "train_positions": ("int64", (S,)),
        "token_ids": ("int64", (T,)),
    }
    for name, (dt, shape) in expect.items():
        if name not in t:
            fail(f"tensor {name} missing")
            continue
        a = t[name]
        if str(a.dtype) != dt or tuple(a.shape) != shape:
            fail(f"{name}: {a.dtype} {list(a.shape)}, expected {dt} {list(shape)}")
        if a.dtype == np.float16 and not np.isfinite(a).all():
            fail(f"{name} has non-finite values")
    extra_t = sorted(set(t) - set(expect))
    if extra_t:
        fail(f"unexpected tensors {extra_t}")
    qp, tp = t.get("query_positions"), t.get("train_positions")
    for name, p in (("query_positions", qp), ("train_positions", tp)):
        if p is not None and (p.min() < 0 or p.max() >= T or np.any(np.diff(p) <= 0)):
            fail(f"{name} not strictly increasing within 0..{T}")
    if qp is not None and tp is not None and np.intersect1d(qp, tp).size:
        fail("train_positions overlap query_positions")
    nr = meta.get("needle_token_range", "None")
    if nr not in ("None", "null"):
        a, b = json.loads(nr)
        if not 0 <= a <= b <= T:
            fail(f"needle_token_range {nr} outside the prompt")
    print(f"model {meta.get('model')} ({meta.get('model_type')}), layers {layers}, T={T}, Q={Q}, S={S}, "
          f"heads {H}/{KV}x{D}, scale {scales}, rope_theta {meta.get('rope_theta')}")
    print(f"source {meta.get('source_text')!r}, needle {nr}, greedy_answer {meta.get('greedy_answer')!r}")
    return meta, t


def rel(a, b):
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(meta, t, rmeta, r, tol):
    ids, rids = t["token_ids"], r["token_ids"]
    n = int(min(len(ids), len(rids)))
    diff = np.nonzero(ids[:n] != rids[:n])[0]
    P = int(diff[0]) if diff.size else n
    print(f"== reference: identical token prefix {P} of {len(ids)} / {len(rids)} tokens"
          + (" (token ids identical)" if P == len(ids) == len(rids) else ""))
    if meta["model"] != rmeta["model"]:
        print("note: different models; only the layout is comparable")
        return
    if P == 0:
        print("note: no common token prefix; nothing to compare")
        return
    layers, rlayers = json.loads(meta["layers"]), json.loads(rmeta["layers"])
    H, KV = int(meta["q_heads"]), int(meta["kv_heads"])
    G = H // KV
    scales = json.loads(meta["softmax_scale"])
    for li, l in enumerate(layers):
        if l not in rlayers:
            continue
        ri = rlayers.index(l)
        ek = rel(t["keys"][li][:, :P], r["keys"][ri][:, :P])
        ev = rel(t["values"][li][:, :P], r["values"][ri][:, :P])
        line = f"layer {l}: keys rel err {ek:.2e}, values {ev:.2e}"
        for qn, pn in (("queries", "query_positions"), ("train_queries", "train_positions")):
            common, ia, ib = np.intersect1d(t[pn], r[pn], return_indices=True)
            m = common < P
            if m.any():
                e = rel(t[qn][li][:, ia[m]], r[qn][ri][:, ib[m]])
                line += f", {qn} ({int(m.sum())} shared positions) {e:.2e}"
                if e > tol:
                    fail(f"layer {l} {qn} differ from the reference ({e:.2e} > {tol})")
        # attention probabilities of the reference's train queries (within the prefix), ours vs theirs
        rp = r["train_positions"]
        sel = np.nonzero(rp < P)[0][-16:]
        if sel.size:
            tv = []
            for h in range(H):
                for j in sel:
                    p = int(rp[j])
                    q = r["train_queries"][ri][h, j].astype(np.float32) * np.float32(scales[li])
                    pa = _softmax(t["keys"][li][h // G, : p + 1].astype(np.float32) @ q)
                    pb = _softmax(r["keys"][ri][h // G, : p + 1].astype(np.float32) @ q)
                    tv.append(0.5 * np.abs(pa - pb).sum())
            line += f", attention total-variation max {max(tv):.2e}"
        print(line)
        if max(ek, ev) > tol:
            fail(f"layer {l} keys/values differ from the reference ({max(ek, ev):.2e} > {tol})")


def _softmax(x):
    x = np.exp(x - x.max())
    return x / x.sum()


def check_attn(meta, t, path, tol):
    z = np.load(path)
    layers = json.loads(meta["layers"])
    H, KV = int(meta["q_heads"]), int(meta["kv_heads"])
    G = H // KV
    scales = json.loads(meta["softmax_scale"])
    if list(z["layers"]) != layers or not np.array_equal(z["positions"], t["query_positions"]):
        fail(f"{path} is not for this dump's layers / query positions")
        return
    window = 512 if meta["model_type"].startswith("gemma3") else 0
    print(f"== causal consistency against {path}")
    for li, l in enumerate(layers):
        win = window if (window and l % 6 != 5) else 0
        errs = []
        pos = t["query_positions"]
        e_ = int(pos.max()) + 1
        j = np.arange(e_)[None, :]
        bad = j > pos[:, None]
        if win:
            bad |= j <= pos[:, None] - win
        for h in range(H):
            K = t["keys"][li][h // G, :e_].astype(np.float32)
            V = t["values"][li][h // G, :e_].astype(np.float32)
            s = (t["queries"][li][h].astype(np.float32) * np.float32(scales[li])) @ K.T
            s[bad] = -np.inf
            s = np.exp(s - s.max(axis=1, keepdims=True))
            o = (s / s.sum(axis=1, keepdims=True)) @ V
            ref = z["attn_out"][li][h]
            errs.extend(np.linalg.norm(o - ref, axis=1) / np.linalg.norm(ref, axis=1))
        e = np.array(errs)
        note = f" (sliding-window layer: its own attention covers the last {win} keys)" if win else ""
        print(f"layer {l}: softmax(scale q.K[:p+1]) V vs model attention output: rel err mean {e.mean():.2e} max {e.max():.2e}{note}")
        if e.max() > tol:
            fail(f"layer {l}: attention recomputed from the dump differs from the model's ({e.max():.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--reference")
    ap.add_argument("--attn-out")
    ap.add_argument("--tol", type=float, default=0.01, help="relative-error tolerance for the comparisons")
    args = ap.parse_args()
    meta, t = validate(args.file)
    if args.reference and not failures:
        rmeta, r = validate(args.reference)
        compare(meta, t, rmeta, r, args.tol)
    if args.attn_out and not failures:
        check_attn(meta, t, args.attn_out, max(args.tol, 0.02))
    print("OK" if not failures else f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
