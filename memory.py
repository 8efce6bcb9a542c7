"""The per-rank memory of step 3 (ReMax or PPO) under FSDP2, planned from the model shapes alone: the models are
built on the meta device from a HF folder or a named shape, no weight is read. Each component is counted as train.py
allocates it: fp32 master weights, gradients and AdamW states sharded over the ranks; the frozen reference and reward
model in the compute dtype, sharded; the policy gathered whole for a rollout, with its KV cache; the root's and two
blocks' parameters gathered for any other forward; what autograd saves in model.py's blocks, c*(6D + 2kv + 4F) +
4*(2D + H + 2) bytes per token and layer for a compute dtype of c bytes (within 11% of what saved_tensors_hooks
count), c*D under activation checkpointing; the fp32 log-prob chunk. A phase's peak is what lives through it plus
its largest transient. `python bench.py memory --policy llama-2-7b --world 8 --batch_size 8
--activation_checkpointing` prints it; smoke.check_memory measures a real step next to it (every phase within 10%
at 30M-360M parameters, fp32 on a CPU). peak_rss_bytes() is the CPU measurement train.py and bench.py log.
"""
import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model import ModelConfig, Transformer, read_config

# Shapes by name (config.json fields); the 7B/13B ones are the paper's and the Mistral run's models.
SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, model_type="mistral"),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "360m": dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=16,
                 num_attention_heads=20, num_key_value_heads=4),           # CPU checks of the plan (smoke.py)
    "30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4),
}
SHAPES["ultrarm-13b"] = SHAPES["llama-2-13b"]
GB = 2**30
CHUNK = 1024                    # model.response_logprobs' chunk_size: positions per log-prob chunk
KL_BUDGET = 2**24               # metrics.exact_kl_over_ranks' logits entries per pass


def peak_rss_bytes() -> int:
    """This process's peak resident set size: the kernel's high-water mark VmHWM (Linux), not getrusage's
    ru_maxrss, which a child process starts at its parent's peak (it survives fork and exec)."""
    if not os.path.exists("/proc/self/status"):
        import resource                                    # macOS: ru_maxrss in bytes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def shape(name_or_path: str) -> ModelConfig:
    if name_or_path in SHAPES:
        return ModelConfig.from_hf({"model_type": "llama", **SHAPES[name_or_path]}, source=name_or_path)
    return read_config(name_or_path)


@dataclass
class Sizes:
    """One model's counts, from its meta-device build: parameters, those outside the blocks (embeddings,
    norm, heads, which FSDP keeps gathered from a forward to its backward) and one block's."""
    c: ModelConfig
    params: int
    root: int
    block: int

    @classmethod
    def of(cls, config: ModelConfig, lm_head: bool):
        with torch.device("meta"):
            m = Transformer(config, lm_head=lm_head)
        params = sum(p.numel() for p in m.parameters()) + (0 if lm_head else config.dim)   # a scalar head
        block = sum(p.numel() for p in m.layers[0].parameters())
        return cls(config, params, params - config.n_layers * block, block)

    def saved(self, tokens: int, c: int, ac: bool, logits: bool) -> int:
        """Bytes autograd keeps from a training forward over `tokens` positions (before its backward)."""
        m = self.c
        kv, q = m.n_kv_heads * m.head_dim, m.n_heads * m.head_dim
        # Padded batches with grouped-query attention also keep k and v repeated to every head (2 * (q - kv)).
        layer = c * m.dim if ac else \
            c * (6 * m.dim + 2 * kv + 4 * m.hidden_dim + 2 * (q - kv)) + 4 * (2 * m.dim + m.n_heads + 2)
        head = 4 * m.vocab_size if logits else 4
        return tokens * (m.n_layers * layer + 3 * 4 * m.dim + head)

    def layer_transient(self, tokens: int, c: int) -> int:
        """A forward's largest short-lived tensors inside one block: the residual, normed input, q, k, v, the
        attention output and the MLP's gate, up and their product."""
        m = self.c
        return tokens * c * (5 * m.dim + 2 * m.n_kv_heads * m.head_dim + 3 * m.hidden_dim)

    def kv_cache(self, rows: int, length: int, c: int) -> int:
        return 2 * self.c.n_layers * rows * self.c.n_kv_heads * length * self.c.head_dim * c


def plan(policy: ModelConfig, reward: ModelConfig, critic: ModelConfig | None, *, world: int, batch_size: int,
         max_prompt_len: int, max_new_tokens: int, dtype: torch.dtype, activation_checkpointing: bool,
         algo: str, eval_size: int = 64) -> dict:
    """{"components": {name: bytes per rank}, "phases": {name: peak bytes per rank}} of one algorithm's step 3."""
    c, W, ac, P, V = dtype.itemsize, world, activation_checkpointing, max_prompt_len, policy.vocab_size
    pol, rm = Sizes.of(policy, True), Sizes.of(reward, False)
    crit = Sizes.of(critic, False) if algo == "ppo" else None
    b = max(1, batch_size // W)                    # prompts per rank; evaluation decodes in chunks of b (metrics)
    e, T = min(b, max(1, eval_size // W)), max_prompt_len + max_new_tokens
    rows = (2 if algo == "remax" else 1) * b                   # ReMax decodes a sampled and a greedy response
    unsharded = lambda s: c * (s.root + 2 * s.block)           # FSDP: the root's and two blocks' gathered params
    logits = lambda n: n * min(T, CHUNK) * V * 12              # fp32 log-prob chunk: logits, softmax, product

    def decode(prompts, n):    # generate(n=...): KV cache, the prefill's block transients, the sampler's floats
        return pol.kv_cache(n * prompts, T, c) + pol.layer_transient(prompts * P, c) + n * prompts * V * 16

    def frozen(s, n, lm_head=False):                           # a forward without grad over n sequences
        return unsharded(s) + s.layer_transient(n * T, c) + (logits(n) if lm_head else 0)

    def trained(s, lm_head=False):
        """Forward and backward with grad: what autograd saves, the gathered params and their unsharded gradients,
        one block's transients (and its recomputation under checkpointing), the gradient of the fp32 logits,
        and the sharded fp32 gradients, full at the end."""
        return (unsharded(s) + c * (s.root + s.block) + s.saved(b * T, c, ac, lm_head) + s.layer_transient(b * T, c)
                + (s.saved(b * T, c, False, False) // s.c.n_layers if ac else 0) + (logits(b) if lm_head else 0)
                + 4 * s.params // W)

    comp = {"policy (fp32, sharded)": 4 * pol.params // W, "AdamW states (fp32, sharded)": 8 * pol.params // W,
            "gradients (fp32, sharded)": 4 * pol.params // W, "reference (sharded)": c * pol.params // W,
            "reward model (sharded)": c * rm.params // W}
    if crit:
        comp.update({"critic (fp32, sharded)": 4 * crit.params // W, "critic AdamW states": 8 * crit.params // W,
                     "critic gradients": 4 * crit.params // W})
    comp.update({"gathered policy (rollout)": c * pol.params, "KV cache (rollout)": pol.kv_cache(rows, T, c),
                 "activations (policy backward)": pol.saved(b * T, c, ac, True), "log-prob chunk": logits(b)})
    static = sum(v for k, v in comp.items() if ("sharded" in k or "critic" in k) and "gradients" not in k)
    # metrics.exact_kl_over_ranks: both models' logits of a few rows, 5 float64 copies of their response part.
    exact_kl = min(e, max(1, KL_BUDGET // (T * V))) * V * (2 * c * T + 40 * max_new_tokens)
    phases = {"between steps": static, "rollout": static + c * pol.params + max(decode(b, rows // b), frozen(rm, rows)),
              "loss and backward": static + max(frozen(pol, b, True), trained(pol, True),
                                                *([frozen(crit, b), trained(crit)] if crit else [])),
              "optimizer step": static + max(8 * pol.params // W, 8 * crit.params // W if crit else 0),
              "evaluation": static + max(c * pol.params + decode(e, 2), frozen(rm, 2 * e), frozen(pol, e, True),
                                         2 * unsharded(pol) + exact_kl)}
    phases["peak"] = max(phases.values())           # smoke.py measures it as the largest phase
    return {"components": comp, "phases": phases,
            "params": {"policy": pol.params, "reward": rm.params, **({"critic": crit.params} if crit else {})}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="llama-2-7b", help=f"HF folder or one of {', '.join(SHAPES)}")
    p.add_argument("--reward_model", default=None, help="HF folder or a named shape (default: the policy's)")
    p.add_argument("--critic", default=None, help="PPO's critic (default: the reward model's)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8, help="global prompts per step, as train.py")
    p.add_argument("--eval_size", type=int, default=64)
    p.add_argument("--max_prompt_len", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--algo", default="both", choices=["remax", "ppo", "both"])
    p.add_argument("--out", default=None, help="JSON result path")
    return p.parse_args(argv)


def run(args) -> dict:
    policy, reward = shape(args.policy), shape(args.reward_model or args.policy)
    critic = shape(args.critic) if args.critic else reward
    opts = dict(world=args.world, batch_size=args.batch_size, max_prompt_len=args.max_prompt_len,
                max_new_tokens=args.max_new_tokens, dtype=getattr(torch, args.dtype),
                activation_checkpointing=args.activation_checkpointing, eval_size=args.eval_size)
    return {"args": vars(args), **{a: plan(policy, reward, critic, algo=a, **opts)
                                   for a in (["remax", "ppo"] if args.algo == "both" else [args.algo])}}


def show(r: dict):
    algos = [a for a in ("remax", "ppo") if a in r]
    a = r["args"]
    print(f"memory plan per rank (GB): policy {a['policy']}, reward model {a['reward_model'] or a['policy']}, "
          f"world {a['world']}, batch {a['batch_size']}, {a['max_prompt_len']}+{a['max_new_tokens']} tokens, "
          f"{a['dtype']}{', activation checkpointing' if a['activation_checkpointing'] else ''}")
    names = list(dict.fromkeys(k for x in algos for k in r[x]["components"]))
    print(f"{'':34}" + "".join(f"{x:>10}" for x in algos))
    for k in names:
        print(f"{k:34}" + "".join(f"{r[x]['components'].get(k, 0) / GB:10.2f}" if k in r[x]["components"]
                                   else f"{'-':>10}" for x in algos))
    print("peak of each phase")
    for k in r[algos[0]]["phases"]:
        line = f"  {k:32}" + "".join(f"{r[x]['phases'][k] / GB:10.2f}" for x in algos)
        if all(k in r[x].get("measured", {}) for x in algos):          # smoke.py's check
            m = {x: r[x]["measured"][k] for x in algos}
            line += "   measured" + "".join(f"{m[x] / GB:8.2f} ({r[x]['phases'][k] / m[x] - 1:+.0%})" for x in algos)
        print(line)
    if len(algos) == 2:
        print(f"ReMax / PPO peak: {r['remax']['phases']['peak'] / r['ppo']['phases']['peak']:.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    show(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
