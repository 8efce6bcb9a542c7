"""LLaMA / Mistral decoder in plain PyTorch: the policy, reference and reward backbones of ReMax.

One class per concept (RMSNorm, Attention, FeedForward, TransformerBlock, Transformer), module
attribute names equal to Hugging Face's so a state dict maps onto `model.safetensors` by adding
the `model.` prefix. Also here: Hugging Face checkpoint I/O (sharded in and out), the tokenizer,
KV-cached batched sampling (the `generate` that produces ReMax's sampled *and* greedy responses,
Algorithm 1 lines 3-4) and the per-token log-probs the loss needs (Algorithm 1 line 6).
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    hidden_dim: int = 176
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2
    pad_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type: expected 'llama' or 'mistral', got {self.model_type!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_key_value_heads={self.n_kv_heads} must divide num_attention_heads={self.n_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported (expected 'default' or 'llama3')")

    @property
    def stop_ids(self) -> list[int]:
        return [] if self.eos_id is None else [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Map a Hugging Face LlamaConfig / MistralConfig dict (transformers 4.x or 5.x layout) to ours."""
        if d.get("model_type") not in ("llama", "mistral"):
            raise ValueError(f"{source}: model_type must be 'llama' or 'mistral', got {d.get('model_type')!r}")
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, want) != want:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (expected {want!r})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if "type" in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default":
            rope = None
        elif rope["rope_type"] == "llama3":
            need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if any(k not in rope for k in need):
                raise ValueError(f"{source}: llama3 rope_scaling needs {', '.join(need)}")
        else:
            raise ValueError(f"{source}: rope_scaling type {rope['rope_type']!r} is not supported "
                             "(expected 'default' or 'llama3')")
        return cls(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                   n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   head_dim=d.get("head_dim"), hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=float(theta), rope_scaling=rope, max_seq_len=d.get("max_position_embeddings", 2048),
                   tie_embeddings=d.get("tie_word_embeddings", False), sliding_window=d.get("sliding_window"),
                   model_type=d["model_type"], bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"),
                   pad_id=d.get("pad_token_id"))

    def to_hf(self) -> dict:
        """The transformers-4.x config.json layout, which transformers 5 and vLLM also read."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        d = dict(architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
                 hidden_size=self.dim, intermediate_size=self.hidden_dim, num_hidden_layers=self.n_layers,
                 num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                 rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                 max_position_embeddings=self.max_seq_len, tie_word_embeddings=self.tie_embeddings,
                 bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                 hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="float32")
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/d), with Llama-3.1's piecewise rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], s["original_max_position_embeddings"] / s["high_freq_factor"]
    scaled = torch.where(wavelen > low, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    return torch.where((wavelen >= high) & (wavelen <= low), smoothed, scaled)


def rotate_half(x):
    # HF checkpoints store q/k so that RoPE pairs dimension i with i + d/2 (not llama's interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the scale, exactly as the checkpoints were trained.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Preallocated keys/values [B, H_kv, T_max, D]; decoding writes one column in place per token."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def repeat(self, n: int):
        # One copy after the shared prefill (rows k*B + b = prompt b), never per decoded token.
        self.k, self.v = self.k.repeat(n, 1, 1, 1), self.v.repeat(n, 1, 1, 1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, cache_pos: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            cache.k[:, :, cache_pos:cache_pos + T] = k
            cache.v[:, :, cache_pos:cache_pos + T] = v
            if cache_pos > 0:
                k, v = cache.k[:, :, :cache_pos + T], cache.v[:, :, :cache_pos + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = FeedForward(c)

    def forward(self, x, cos, sin, attn_mask, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_mask, T: int, cache_pos: int, sliding_window: int | None):
    """Boolean [B, 1, T, S] mask (True = attend): causal, no padded keys, Mistral's sliding window.

    Returns None when plain causal attention is exact, so SDPA can take its fused path.
    """
    S = cache_pos + T
    if cache_pos == 0 and (key_mask is None or bool(key_mask.all())) and (sliding_window is None or S <= sliding_window):
        return None
    q_idx = torch.arange(cache_pos, S, device=key_mask.device if key_mask is not None else None)[:, None]
    k_idx = torch.arange(S, device=q_idx.device)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :S]
    # A padded query would see no key at all (NaN softmax); let it see itself, its output is unused.
    return allowed | (k_idx == q_idx)[None, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, lm_head: bool = True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False) if lm_head else None
        if lm_head and config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.activation_checkpointing = False

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std, generator=generator)
            else:
                nn.init.ones_(p)
        return self.reset_rope()

    def forward(self, tokens, positions=None, mask=None, *, cache: list[KVCache] | None = None, cache_pos: int = 0,
                return_hidden: bool = False, targets=None, last_only: bool = False, chunk_size: int = 1024):
        """tokens [B, T] -> logits [B, T, V] (fp32-accumulated in the weights' dtype).

        positions: per-row position ids (default: from `mask`, else 0..T-1); mask: [B, cache_pos + T] bool,
        True on real tokens. return_hidden: the final-norm hidden states [B, T, D] (reward/value heads).
        targets [B, T]: return (log pi(targets), entropy) per position instead, computed in chunks of
        `chunk_size` positions so no [B, T, V] fp32 tensor is ever alive (see `response_logprobs`).
        last_only: logits of the last position only, [B, 1, V] (decoding).
        """
        B, T = tokens.shape
        if positions is None:
            positions = positions_from_mask(mask[:, :T]) if mask is not None and cache_pos == 0 else \
                torch.arange(cache_pos, cache_pos + T, device=tokens.device).expand(B, T)
        h = self.embed_tokens(tokens)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        attn_mask = attention_mask(mask, T, cache_pos, self.config.sliding_window)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in backward.
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache[i] if cache is not None else None, cache_pos)
        h = self.norm(h)
        if return_hidden:
            return h
        if targets is not None:
            return chunked_logprobs(h, self.lm_head.weight, targets, chunk_size)
        return self.lm_head(h[:, -1:] if last_only else h)

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        w = self.embed_tokens.weight
        c = self.config
        return [KVCache(batch, c.n_kv_heads, max_len, c.head_dim, w.dtype, w.device) for _ in range(c.n_layers)]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        path = Path(path)
        config = read_config(path)
        with torch.device("meta"):
            model = cls(config)
        state = load_hf_state_dict(path, expected={k: v.shape for k, v in model.state_dict().items()
                                                   if not (config.tie_embeddings and k == "lm_head.weight")})
        if config.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.reset_rope().to(device)

    def reset_rope(self):
        """Recompute the RoPE table (a non-persistent buffer: meta or to_empty leave it uninitialised)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)
        return self

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, state_dict: dict | None = None, extra_files=()):
        """Write config.json + safetensors (sharded past max_shard_bytes) in transformers' layout, atomically.

        state_dict: the full (gathered) weights when the model is sharded; extra_files: e.g. the tokenizer's.
        """
        state = state_dict if state_dict is not None else self.state_dict()
        cfg = self.config.to_hf()
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_hf_checkpoint(path, cfg, {hf_name(k): v for k, v in state.items()
                                      if not (self.config.tie_embeddings and k == "lm_head.weight")}, max_shard_bytes, extra_files)


def chunked_logprobs(h, weight, targets, chunk_size: int):
    """log softmax(h W^T)[targets] and the entropy, chunk by chunk over positions.

    Each chunk is recomputed in backward (checkpoint), so peak memory holds one [B, chunk, V]
    block instead of [B, T, V] fp32: with V=128k and T=512 that is the difference between MBs and GBs.
    """
    def one(h_c, t_c):
        logits = (h_c @ weight.T).float()
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, t_c[..., None]).squeeze(-1) - lse
        with torch.no_grad():
            ent = lse - (logits.softmax(-1) * logits).sum(-1)
        return logp, ent
    outs = []
    for s in range(0, h.shape[1], chunk_size):
        args = (h[:, s:s + chunk_size], targets[:, s:s + chunk_size])
        use_ckpt = torch.is_grad_enabled() and h.requires_grad and h.shape[1] > chunk_size
        outs.append(torch.utils.checkpoint.checkpoint(one, *args, use_reentrant=False) if use_ckpt else one(*args))
    return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)


def response_logprobs(model, prompt, prompt_mask, response, response_mask, *, chunk_size: int = 1024):
    """log pi(a_t | x, a_<t) for each response token (Algorithm 1 line 6) and the policy entropy there.

    Positions come from the joint mask, so the left-padded prompt gives the same numbers as at
    sampling time. Values at masked response positions are meaningless; the loss masks them.
    """
    P = prompt.shape[1]
    tokens = torch.cat([prompt, response], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    # Tokens after the first EOS are masked keys, but they still need a position; give them the
    # next ones so nothing that matters depends on them.
    positions = positions_from_mask(torch.cat([prompt_mask, torch.ones_like(response_mask)], 1))
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
    logp, ent = model(tokens, positions, mask, targets=targets, chunk_size=chunk_size)
    return logp[:, P - 1:-1], ent[:, P - 1:-1]


# Top-p looks for each row's nucleus among its NUCLEUS_K most likely tokens first (a partial sort);
# only rows whose nucleus is longer search the full vocabulary (a threshold bisection, never a sort).
NUCLEUS_K = 256


def _invert_cdf(w, noise):
    """Inverse-CDF draw per row of nonnegative weights w [R, K] (any scale): the first column whose
    cumulative weight (float64) exceeds noise * total. Columns of weight 0 are never drawn."""
    cdf = w.cumsum(-1, dtype=torch.float64)
    mass = cdf[:, -1:]
    # Strictly below the total, so the first cdf > target exists and has nonzero weight.
    target = torch.minimum(noise[:, None] * mass, torch.nextafter(mass, torch.zeros_like(mass)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def _nucleus_threshold(w, bound):
    """Per row of w [R, V] (weights in [0, 1], the largest exactly 1): the smallest weight t whose
    heavier tokens weigh < bound, i.e. the nucleus is {w >= t}. Bisection on the float32 bit
    pattern (monotone for nonnegative floats): 30 fixed steps, no sort, no host sync."""
    lo = torch.zeros_like(bound, dtype=torch.int32)                 # weight 0.0: everything is heavier
    hi = torch.full_like(bound, 0x3F800000, dtype=torch.int32)     # weight 1.0: nothing is heavier
    for _ in range(30):  # hi - lo < 2**30 halves to 1
        mid = lo + (hi - lo) // 2
        # sum of w over w > t; sign/clamp/mul is several times faster on CPU than where or a bool mask.
        heavier = (w - mid.view(torch.float32)).sign_().clamp_(min=0).mul_(w).sum(-1, keepdim=True)
        ok = heavier < bound
        lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    return hi.view(torch.float32)


def sample_next(logits, temperature, top_p: float = 1.0, top_k: int = 0, noise=None, generator=None,
                greedy: bool | None = None, sampled: bool | None = None):
    """One token per row; rows with temperature 0 take the argmax (the ReMax baseline is greedy).

    Sampled rows draw from softmax(logits / temperature) restricted to the top_k most likely tokens
    (ties with the k-th kept) and then to the nucleus: the most likely tokens, in order, while the
    mass before them is < top_p (transformers' TopPLogitsWarper: the token that crosses top_p is kept;
    ties in probability at that boundary may be kept too). The draw is by inverse CDF: the token whose interval of the (float64)
    cumulative distribution holds noise * mass. noise: one U[0, 1) draw per row (from `generator`
    when not given), so a step costs one random number per row, not one per vocabulary entry.
    greedy / sampled: whether any row has temperature 0 / > 0; None checks (a host sync),
    `generate` decides once per call.
    """
    is_greedy = temperature == 0
    if greedy is None:
        greedy = bool(is_greedy.any())
    if sampled is None:
        sampled = not bool(is_greedy.all())
    argmax = logits.argmax(-1) if greedy else None
    if not sampled:
        return argmax
    if noise is None:
        noise = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float64)
    noise = noise.to(torch.float64)
    w = logits.float() - logits.amax(-1, keepdim=True).float()
    w = w.mul_(1 / temperature.clamp_min(1e-5)[:, None]).exp_()  # unnormalised probabilities, the largest 1
    V = w.shape[-1]
    if top_k:
        kth = w.topk(min(top_k, V), dim=-1).values[:, -1:]
        w = w.masked_fill_(w < kth, 0.0)
    if top_p >= 1.0:
        return _finish(_invert_cdf(w, noise), argmax, is_greedy)
    bound = top_p * w.sum(-1, keepdim=True, dtype=torch.float64)
    vals, ids = w.topk(min(NUCLEUS_K, V), dim=-1)
    keep = vals.cumsum(-1, dtype=torch.float64) - vals < bound
    tok = ids.gather(-1, _invert_cdf(vals.masked_fill(~keep, 0.0), noise)[:, None])[:, 0]
    if NUCLEUS_K < V:
        longer = keep[:, -1]  # the NUCLEUS_K-th token is still inside: the nucleus may go on
        if bool(longer.any()):
            rows = longer.nonzero()[:, 0]
            wr = w[rows]
            wr = wr.masked_fill_(wr < _nucleus_threshold(wr, bound[rows]), 0.0)
            tok[rows] = _invert_cdf(wr, noise[rows])
    return _finish(tok, argmax, is_greedy)


def _finish(tok, argmax, is_greedy):
    return tok if argmax is None else torch.where(is_greedy, argmax, tok)


@torch.inference_mode()
def generate(model, prompt, prompt_mask, max_new_tokens: int, *, n: int = 1, temperature=1.0, top_p: float = 1.0,
             top_k: int = 0, stop_ids: list[int] | None = None, pad_id: int = 0, generator=None,
             row_offset: int = 0, total_rows: int | None = None):
    """Sample responses to left-padded prompts with a preallocated KV cache (Algorithm 1 lines 3-4).

    The B prompts are prefilled once and the cache is repeated n times: row k*B + b continues prompt b.
    `temperature` is a float or one value per output row; 0 means greedy. Returns response [n*B, N]
    and its mask, True up to and including the first stop token (which is trained on, as in the
    official code); later positions hold pad_id. N <= max_new_tokens: decoding stops when all rows did.
    Sampling uses one uniform per row and step, all drawn up front as [max_new_tokens, n, total_rows]
    from `generator`. When these B prompts are rows [row_offset, row_offset + B) of a global batch of
    total_rows sharded over ranks, this shard keeps its rows of that draw, so every rank samples exactly
    what one process would (world-size-invariant, reproducible runs).
    """
    B, P = prompt.shape
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt: expected left padding (every row's last column a real token) and no empty prompt")
    device = prompt.device
    stop = torch.tensor(model.config.stop_ids if stop_ids is None else stop_ids, device=device, dtype=torch.long)
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=device).expand(n * B).contiguous()
    cache = model.make_cache(B, P + max_new_tokens)
    logits = model(prompt, positions_from_mask(prompt_mask), prompt_mask, cache=cache, last_only=True)[:, -1]
    for c in cache:
        c.repeat(n)
    logits = logits.repeat(n, 1)
    key_mask = torch.ones(n * B, P + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :P] = prompt_mask.repeat(n, 1)
    next_pos = prompt_mask.long().sum(-1).repeat(n)
    out = torch.full((n * B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros(n * B, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(n * B, dtype=torch.bool, device=device)
    greedy_rows, sampled_rows = bool((temperature == 0).any()), bool((temperature > 0).any())
    total_rows = total_rows or B
    noise = None
    if sampled_rows:
        noise = torch.rand(max_new_tokens, n, total_rows, generator=generator, device=device, dtype=torch.float64)
        noise = noise[:, :, row_offset:row_offset + B].reshape(max_new_tokens, n * B)
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, noise[i] if sampled_rows else None,
                          greedy=greedy_rows, sampled=sampled_rows)
        out[:, i] = torch.where(done, pad_id, tok)
        out_mask[:, i] = ~done
        done |= torch.isin(tok, stop)
        if i + 1 == max_new_tokens or bool(done.all()):
            return out[:, :i + 1], out_mask[:, :i + 1]
        logits = model(out[:, i:i + 1], (next_pos + i)[:, None], key_mask, cache=cache, cache_pos=P + i,
                       last_only=True)[:, -1]
    return out, out_mask


def hf_name(key: str) -> str:
    return key if key.startswith(("lm_head.", "score.", "regression_head.")) else "model." + key


def read_config(path) -> ModelConfig:
    """config.json, with generation_config.json's eos_token_id(s) added to the stop ids: transformers'
    generate stops on those (Llama-3-Instruct ends a turn with <|eot_id|>, listed only there)."""
    path = Path(path)
    config = ModelConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    if (path / "generation_config.json").is_file():
        eos = read_json(path / "generation_config.json").get("eos_token_id")
        more = [i for i in ([] if eos is None else [eos] if isinstance(eos, int) else eos) if i not in config.stop_ids]
        if more:
            config.eos_id = config.stop_ids + more
    return config


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_hf_state_dict(path, expected: dict) -> dict:
    """Read model.safetensors or its shards, keyed by our names; check names and shapes against `expected`."""
    from safetensors.torch import load_file
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        weight_map = read_json(path / "model.safetensors.index.json").get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are loaded; convert .bin files first)")
    state = {}
    for f in files:
        try:
            tensors = load_file(path / f)
        except Exception as e:    # safetensors' own error type; e.g. a git-lfs pointer or a cut download
            raise ValueError(f"{path / f}: not a readable safetensors file ({e})") from None
        for k, v in tensors.items():
            state[k if k.startswith(("lm_head.", "score.", "regression_head.")) else k.removeprefix("model.")] = v
    missing = [hf_name(k) for k in expected if k not in state]
    unexpected = [hf_name(k) for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{path}: tensor {hf_name(k)} has shape {list(state[k].shape)}, expected {list(shape)}")
    return {k: state[k] for k in expected}


def save_hf_checkpoint(path, config: dict, tensors: dict, max_shard_bytes: int = 5 * 2**30, extra_files=()):
    """Write a HF folder into a temp dir, then rename it into place: a crash never leaves half a checkpoint."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)          # mkdtemp's 0700 would survive the rename: unreadable to other users
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards, size = [[]], 0
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            save_file({k: tensors[k].detach().contiguous().cpu() for k in keys}, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for src in extra_files:
            shutil.copy(src, tmp / Path(src).name)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _special(value):
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, special tokens from tokenizer_config.json.

    encode(..., add_special_tokens=True) applies the checkpoint's own post-processor (Llama-2/3 add
    BOS there), so BOS handling is what transformers' fast tokenizer does for the same folder.
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'}: file not found (a fast-tokenizer tokenizer.json is required)")
        self.path = path
        self.tok = _Tok.from_file(str(path / "tokenizer.json"))
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        model_cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        template, self.chat_template_source = cfg.get("chat_template"), str(path / "tokenizer_config.json")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            self.chat_template_source = str(path / "chat_template.jinja")
            template = (path / "chat_template.jinja").read_text()
        self.chat_template = template

        def special_id(name):
            tok = _special(cfg.get(f"{name}_token"))
            if tok is not None and self.tok.token_to_id(tok) is not None:
                return self.tok.token_to_id(tok)
            ident = model_cfg.get(f"{name}_token_id")
            return ident[0] if isinstance(ident, list) else ident
        self.bos_id, self.eos_id, self.pad_id = special_id("bos"), special_id("eos"), special_id("pad")
        self.bos_token = _special(cfg.get("bos_token"))
        self.eos_token = _special(cfg.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tok.decode_batch([list(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def files(self) -> list[Path]:
        """The files that define this tokenizer, to ship next to an exported checkpoint."""
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
        return [self.path / n for n in names if (self.path / n).is_file()]
