"""LLaMA / Mistral decoder in plain PyTorch: the policy, reference and reward backbones of ReMax. One class per
concept (RMSNorm, Attention, FeedForward, TransformerBlock, Transformer), attribute names equal to Hugging Face's
(a state dict maps onto `model.safetensors` with the `model.` prefix). Also here: HF checkpoint I/O, the tokenizer,
KV-cached batched sampling (`generate`: ReMax's sampled *and* greedy responses, Algorithm 1 lines 3-4, through
gpt-fast's compilable one-token step, no per-token host sync) and the fp32 per-token log-probs of line 6.
"""
import functools
import json
import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor
from safetensors import safe_open
from safetensors.torch import save_file


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
        self.head_dim = self.head_dim or self.dim // self.n_heads
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
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Preallocated keys/values [B, H_kv, T_max, D] (gpt-fast's); decoding writes one column in place per token."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, cache_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if torch.is_tensor(cache_pos):      # the decode step: columns as a tensor, the whole static cache attended
            k, v = cache.k.index_copy_(2, cache_pos, k), cache.v.index_copy_(2, cache_pos, v)
        elif cache is not None:
            cache.k[:, :, cache_pos:cache_pos + T], cache.v[:, :, cache_pos:cache_pos + T] = k, v
            if cache_pos > 0:
                k, v = cache.k[:, :, :cache_pos + T], cache.v[:, :, :cache_pos + T]
        if attn_mask is None:               # nothing padded: the fused causal kernels take grouped-query heads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            # Masked kernels (CUDA's memory-efficient one) take no enable_gqa, and repeating K/V would copy the cache
            # per token: fold each K/V head's group of query heads into the query axis instead, [B, H_kv, g*T, D].
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, g * T, -1), k, v,
                                               attn_mask=attn_mask.repeat(1, 1, g, 1) if g > 1 else attn_mask)
        return self.o_proj(y.reshape(B, self.n_heads, T, -1).transpose(1, 2).reshape(B, T, -1))


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


def attention_mask(key_mask, T: int, cache_pos, sliding_window: int | None):
    """Boolean [B, 1, T, S] mask (True = attend): causal, no padded keys, Mistral's sliding window. cache_pos: the
    queries' first column (S = cache_pos + T keys), or the decode step's tensor of the T columns (S = key_mask's
    width, the whole static cache), with no host sync. None when plain causal attention is exact (SDPA's fused path)."""
    static = torch.is_tensor(cache_pos)
    S = key_mask.shape[1] if static else cache_pos + T
    if not static and cache_pos == 0 and (key_mask is None or bool(key_mask.all())) and (sliding_window or S) >= S:
        return None
    q_idx = (cache_pos if static else torch.arange(cache_pos, S, device=None if key_mask is None else key_mask.device))[:, None]
    k_idx = torch.arange(S, device=q_idx.device)[None, :]
    allowed = ((k_idx <= q_idx) & (q_idx - k_idx < (sliding_window or S)))[None, None]     # no window: always true
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
        for p in self.parameters():           # matrices ~ N(0, std^2), norm scales 1
            nn.init.normal_(p, std=std, generator=generator) if p.dim() == 2 else nn.init.ones_(p)
        return self.reset_rope()

    def forward(self, tokens, positions=None, mask=None, *, cache: list[KVCache] | None = None, cache_pos=0,
                return_hidden: bool = False, targets=None, last_only: bool = False, chunk_size: int = 1024):
        """tokens [B, T] -> logits [B, T, V]. positions: per-row position ids (default: from `mask`, else 0..T-1);
        mask: [B, cache_pos + T] bool, True on real tokens. cache_pos: the first cache column written, or
        (`decode_one_token`) a tensor of the T columns, with positions given and mask spanning the cache.
        return_hidden: the final-norm hidden states [B, T, D] (reward/value heads). targets [B, T]: (log pi(targets),
        entropy) per position instead, in fp32 (`chunked_logprobs`). last_only: the last position's logits, [B, 1, V]."""
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
        c, w = self.config, self.embed_tokens.weight
        return [KVCache(batch, c.n_kv_heads, max_len, c.head_dim, w.dtype, w.device) for _ in range(c.n_layers)]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Streamed: each tensor is read, cast and moved alone, so host memory peaks at the model plus one tensor."""
        with torch.device("meta"):
            model = cls(config := read_config(path))
        where = checkpoint_index(path, {k: p.shape for k, p in model.named_parameters()})   # a tied lm_head: once
        model.load_state_dict({k: read_tensors(*w).to(device, dtype, copy=True) for k, w in where.items()},
                              strict=not config.tie_embeddings, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.reset_rope()

    def reset_rope(self):
        """Recompute the RoPE table (a non-persistent buffer: meta or to_empty leave it uninitialised)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)
        return self

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, state_dict: dict | None = None, extra_files=()):
        """config.json + safetensors in transformers' layout, atomically; state_dict: the gathered weights if sharded."""
        state = state_dict if state_dict is not None else self.state_dict()
        cfg = self.config.to_hf()
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_hf_checkpoint(path, cfg, {hf_name(k): v for k, v in state.items()
                                      if not (self.config.tie_embeddings and k == "lm_head.weight")}, max_shard_bytes, extra_files)


def chunked_logprobs(h, weight, targets, chunk_size: int):
    """log softmax(h W^T)[targets] and the entropy [B, T], in fp32 whatever the weights' dtype (bf16 logits step by
    0.125 near 25, 7B scales: ~0.01-0.02 nats of error), `chunk_size` of the B*T tokens at a time, recomputed in
    backward: peak memory holds one [chunk, V] fp32 block (0.5 GB at 1024 x 128k) and bf16 weights' fp32 copy."""
    def one(h_c, t_c):
        logits = h_c.float() @ weight.float().T
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, t_c[:, None])[:, 0] - lse
        with torch.no_grad():
            ent = lse - (logits.softmax(-1) * logits).sum(-1)
        return logp, ent
    flat, t, use_ckpt = h.flatten(0, 1), targets.flatten(), torch.is_grad_enabled() and h.requires_grad
    outs = [torch.utils.checkpoint.checkpoint(one, *a, use_reentrant=False) if use_ckpt and len(t) > chunk_size else one(*a)
            for a in zip(flat.split(chunk_size), t.split(chunk_size))]
    # Not views: FSDP2 hooks a root module's outputs for backward, and a view's in-place use would skip the hook.
    return tuple(torch.cat(o).view(targets.shape).clone() for o in zip(*outs))


def response_logprobs(model, prompt, prompt_mask, response, response_mask, *, chunk_size: int = 1024):
    """log pi(a_t | x, a_<t) for each response token (Algorithm 1 line 6) and the policy entropy there.

    Positions come from the joint mask, so the left-padded prompt gives the same numbers as at sampling time;
    tokens after the first EOS are masked keys given the next positions, so nothing that matters depends on them.
    Values at masked response positions are meaningless; the loss masks them.
    """
    P, tokens, mask = prompt.shape[1], torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
    positions = positions_from_mask(torch.cat([prompt_mask, torch.ones_like(response_mask)], 1))
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
    logp, ent = model(tokens, positions, mask, targets=targets, chunk_size=chunk_size)
    return logp[:, P - 1:-1], ent[:, P - 1:-1]


# Top-p looks for each row's nucleus among its NUCLEUS_K most likely tokens (a partial sort); rows whose nucleus is
# longer take the full vocabulary's, a threshold bisection (no sort), computed for every row: picking rows would sync.
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
    """Per row of w [R, V] (in [0, 1], the largest 1): the smallest t whose heavier tokens weigh < bound (nucleus
    {w >= t}), by bisection on the float32 bit pattern (monotone when >= 0): 30 steps, no sort, no host sync."""
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
    """One token per row; rows with temperature 0 take the argmax (the ReMax baseline is greedy). Sampled rows draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens (ties with the k-th kept), then to
    the nucleus: the most likely tokens, in order, while the mass before them is < top_p (transformers'
    TopPLogitsWarper: the crossing token is kept; ties at that boundary may be too), by inverse CDF: the token whose
    interval of the (float64) cumulative distribution holds noise * mass. noise: one U[0, 1) per row (from
    `generator` when not given). greedy / sampled: whether any row has temperature 0 / > 0; None checks (a host
    sync), `generate` decides once per call."""
    is_greedy = temperature == 0
    greedy = bool(is_greedy.any()) if greedy is None else greedy
    sampled = (not bool(is_greedy.all())) if sampled is None else sampled
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
        w = w.masked_fill_(w < w.topk(min(top_k, V), dim=-1).values[:, -1:], 0.0)     # ties with the k-th kept
    if top_p >= 1.0:
        tok = _invert_cdf(w, noise)
    else:
        bound = top_p * w.sum(-1, keepdim=True, dtype=torch.float64)
        vals, ids = w.topk(min(NUCLEUS_K, V), dim=-1)
        keep = vals.cumsum(-1, dtype=torch.float64) - vals < bound
        tok = ids.gather(-1, _invert_cdf(vals.masked_fill(~keep, 0.0), noise)[:, None])[:, 0]
        if NUCLEUS_K < V:    # rows whose NUCLEUS_K-th token is still inside: the full-vocabulary draw
            w = w.masked_fill_(w < _nucleus_threshold(w, bound), 0.0)
            tok = torch.where(keep[:, -1], _invert_cdf(w, noise), tok)
    return tok if argmax is None else torch.where(is_greedy, argmax, tok)


# Decoding syncs with the host once per STOP_CHECK_EVERY tokens, to stop once every row has (tokens past a row's stop
# are masked). compile=True left-pads prompts to a multiple of PROMPT_BUCKET: a graph per bucket, not per length.
STOP_CHECK_EVERY, PROMPT_BUCKET = 16, 64
_DECODERS = weakref.WeakKeyDictionary()


def decoder(model) -> Transformer:
    """`model` without hooks: its architecture, built once on the meta device, holding model's current tensors (no
    copies), so FSDP2's per-module hooks neither run for every token nor enter a compiled graph, and torch.compile
    lifts the parameters into graph inputs, never constants. An FSDP2 model must be unsharded first (train.py's
    rollouts are): its parameters are then the gathered tensors."""
    if (shell := _DECODERS.get(model)) is None:
        with torch.device("meta"):
            shell = _DECODERS[model] = Transformer(model.config, lm_head=model.lm_head is not None).eval()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if isinstance(t, DTensor):
            raise ValueError(f"generate: {name} is sharded (FSDP2): unshard the model first (see model.decoder)")
        sub, attr = shell.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        (sub._parameters if attr in sub._parameters else sub._buffers)[attr] = t
    return shell


def decode_one_token(model, s: dict, i):
    """Token i of every row, sampled from s["logits"] into s["out"] (pad_id once the row stopped), then fed through
    `model` at cache column P + i for token i + 1's logits. gpt-fast's decode step, for torch.compile(fullgraph=True):
    shapes fixed for the rollout (all P + N columns), i a [1] tensor, no branch on data: one graph for all tokens."""
    noise = s["noise"].index_select(0, i)[0] if s["sampled"] else None
    tok = sample_next(s["logits"], s["temperature"], s["top_p"], s["top_k"], noise, greedy=s["greedy"], sampled=s["sampled"])
    s["out"].index_copy_(1, i, torch.where(s["done"], s["pad_id"], tok)[:, None])
    s["out_mask"].index_copy_(1, i, ~s["done"][:, None])
    s["done"].logical_or_(torch.isin(tok, s["stop"]))
    s["logits"].copy_(model(s["out"].index_select(1, i), (s["next_pos"] + i)[:, None], s["key_mask"], cache=s["cache"],
                            cache_pos=s["key_mask"].shape[1] - s["out"].shape[1] + i, last_only=True)[:, -1])


@functools.cache
def compiled_decode_one_token(mode: str | None):
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)


@torch.inference_mode()
def generate(model, prompt, prompt_mask, max_new_tokens: int, *, n: int = 1, temperature=1.0, top_p: float = 1.0,
             top_k: int = 0, stop_ids: list[int] | None = None, pad_id: int = 0, generator=None,
             row_offset: int = 0, total_rows: int | None = None, compile: bool = False):
    """Sample responses to left-padded prompts with a preallocated KV cache (Algorithm 1 lines 3-4).

    The B prompts are prefilled once and the cache is repeated n times: row k*B + b continues prompt b.
    `temperature` is a float or one value per output row; 0 means greedy. Returns response [n*B, N] and its mask,
    True up to and including the first stop token (which is trained on, as in the official code); later positions
    hold pad_id. N <= max_new_tokens: decoding stops when all rows did. Sampling uses one uniform per row and step,
    all drawn up front as [max_new_tokens, n, total_rows] from `generator`. When these B prompts are rows
    [row_offset, row_offset + B) of a global batch of total_rows sharded over ranks, this shard keeps its rows of
    that draw, so every rank samples exactly what one process would (world-size-invariant, reproducible runs).

    compile: `decode_one_token` compiled (fullgraph, static shapes; on CUDA gpt-fast's "reduce-overhead", CUDA
    graphs), the tokens of eager decoding. Weights are graph inputs, never stale: CUDA graphs read them where recorded,
    and where FSDP2 gathered them into new storage torch re-records before replaying (not counted against its limit).
    Cache and state are static addresses; one graph per (rows, prompt bucket, max_new_tokens, sampling settings).
    """
    B, P = prompt.shape
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt: expected left padding (every row's last column a real token) and no empty prompt")
    if compile and P % PROMPT_BUCKET:
        prompt, prompt_mask = F.pad(prompt, (-P % PROMPT_BUCKET, 0)), F.pad(prompt_mask, (-P % PROMPT_BUCKET, 0))
    device, R, N, model = prompt.device, n * B, max_new_tokens, decoder(model)
    # Host-to-device copies below are non_blocking: a blocking one waits on the stream (a sync on CUDA).
    temperature = torch.as_tensor(temperature, dtype=torch.float32).to(device, non_blocking=True).expand(R).contiguous()
    greedy, sampled = torch.stack([(temperature == 0).any(), (temperature > 0).any()]).tolist()    # one sync
    cache = model.make_cache(B, prompt.shape[1] + N)
    logits = model(prompt, positions_from_mask(prompt_mask), prompt_mask, cache=cache, last_only=True)[:, -1]
    for c in cache:                     # one copy after the shared prefill (rows k*B + b = prompt b), not per token
        c.k, c.v = c.k.repeat(n, 1, 1, 1), c.v.repeat(n, 1, 1, 1)
    noise = torch.rand(N, n, total_rows or B, generator=generator, device=device, dtype=torch.float64) if sampled else None
    s = dict(cache=cache, logits=logits.repeat(n, 1), key_mask=F.pad(prompt_mask, (0, N), value=True).repeat(n, 1),
             next_pos=prompt_mask.sum(-1).repeat(n), temperature=temperature,
             noise=None if noise is None else noise[:, :, row_offset:row_offset + B].reshape(N, R),
             stop=torch.tensor(model.config.stop_ids if stop_ids is None else stop_ids).long().to(device, non_blocking=True),
             out=torch.full((R, N), pad_id, dtype=torch.long, device=device), out_mask=torch.zeros(R, N, dtype=torch.bool,
             device=device), done=torch.zeros(R, dtype=torch.bool, device=device), top_p=top_p, top_k=top_k, pad_id=pad_id,
             greedy=greedy, sampled=sampled)
    for t in [*(t for c in cache for t in (c.k, c.v)), *(t for t in s.values() if torch.is_tensor(t))] if compile else ():
        torch._dynamo.mark_static_address(t)
    step = compiled_decode_one_token("reduce-overhead" if device.type == "cuda" else None) if compile else decode_one_token
    steps = torch.arange(N, device=device)
    for i in range(N):
        step(model, s, steps[i:i + 1])
        if (i + 1) % STOP_CHECK_EVERY == 0 and i + 1 < N and bool(s["done"].all()):
            break
    n_out = int(s["out_mask"].sum(-1).max())
    return s["out"][:, :n_out], s["out_mask"][:, :n_out]


def hf_name(key: str) -> str:
    return key if key.startswith(("lm_head.", "score.", "regression_head.")) else "model." + key


def read_config(path) -> ModelConfig:
    """config.json, plus generation_config.json's eos_token_id(s) as stop ids, as transformers' generate (Llama-3's
    <|eot_id|> is listed only there)."""
    path = Path(path)
    config = ModelConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    eos = (read_json(g) if (g := path / "generation_config.json").is_file() else {}).get("eos_token_id")
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


def read_tensors(file: Path, key: str | None = None):
    """A checkpoint file's tensors {name: tensor}, or the one named `key`, memory-mapped (one key per call streams).
    A .bin (transformers 4's torch.save) is unpickled with weights_only=True: tensors and containers, nothing else."""
    try:
        if file.suffix == ".bin":
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        else:
            with safe_open(file, "pt") as f:
                tensors = {k: f.get_tensor(k) for k in ([key] if key else f.keys())}
    except Exception as e:      # a git-lfs pointer, a cut download, a pickle that holds more than tensors
        why = next((l for l in str(e).splitlines() if "GLOBAL" in l), (str(e) or type(e).__name__).splitlines()[0])
        raise ValueError(f"{file}: not a readable {'PyTorch' if file.suffix == '.bin' else 'safetensors'} checkpoint "
                         f"({why.strip()})") from None
    return tensors if key is None else tensors[key]


def checkpoint_index(path, expected: dict) -> dict[str, tuple[Path, str]]:
    """{our name: (file, key)} for `expected` ({our name: shape}) in model.safetensors or pytorch_model.bin, single
    or sharded (.index.json). Names and shapes are checked from the headers, before any weight is read."""
    path = Path(path)
    name = next((n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()
                 or (path / f"{n}.index.json").is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")
    index = path / f"{name}.index.json"
    files = sorted(set(read_json(index).get("weight_map", {}).values())) if index.is_file() else [name]
    found = {k.removeprefix("model."): (path / f, k, t.shape) for f in files for k, t in read_tensors(path / f).items()}
    for what, names in (("missing", [hf_name(k) for k in expected if k not in found]), ("unexpected", [
            hf_name(k) for k in found if k not in expected and not k.endswith("rotary_emb.inv_freq")])):
        if names:
            raise ValueError(f"{path}: {what} tensor(s) {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    for k, shape in expected.items():
        if found[k][2] != shape:
            raise ValueError(f"{path}: tensor {hf_name(k)} has shape {list(found[k][2])}, expected {list(shape)}")
    return {k: found[k][:2] for k in expected}


def save_hf_checkpoint(path, config: dict, tensors: dict, max_shard_bytes: int = 5 * 2**30, extra_files=()):
    """Write a HF folder into a temp dir, then rename it into place: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.umask(umask := os.umask(0))
    tmp.chmod(0o777 & ~umask)          # mkdtemp's 0700 would survive the rename: unreadable to other users
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards, size = [[]], 0
        for k, v in tensors.items():
            if shards[-1] and size + v.nbytes > max_shard_bytes:
                shards, size = shards + [[]], 0
            shards[-1].append(k)
            size += v.nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            save_file({k: tensors[k].detach().contiguous().cpu() for k in keys}, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for src in extra_files:
            shutil.copy(src, tmp / Path(src).name)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, special tokens from tokenizer_config.json. encode(...,
    add_special_tokens=True) applies the checkpoint's own post-processor (Llama-2/3 add BOS there), as transformers."""

    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'}: file not found (a fast-tokenizer tokenizer.json is required)")
        self.path, self.tok = path, _Tok.from_file(str(path / "tokenizer.json"))
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        model_cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        template, self.chat_template_source = cfg.get("chat_template"), str(path / "tokenizer_config.json")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            self.chat_template_source = str(path / "chat_template.jinja")
            template = (path / "chat_template.jinja").read_text()
        self.chat_template = template

        special = lambda name: (v.get("content") if isinstance(v := cfg.get(f"{name}_token"), dict) else v)

        def special_id(name):
            tok = special(name)
            if tok is not None and self.tok.token_to_id(tok) is not None:
                return self.tok.token_to_id(tok)
            ident = model_cfg.get(f"{name}_token_id")
            return ident[0] if isinstance(ident, list) else ident
        self.bos_id, self.eos_id, self.pad_id = special_id("bos"), special_id("eos"), special_id("pad")
        self.bos_token, self.eos_token = special("bos"), special("eos")

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
