"""The metrics a run logs: held-out evaluation of the policy (the official code's: rewards of sampled and
greedy responses, KL to the reference, exact per-token KL), statistics of a training batch, and the
metrics.jsonl file (one JSON line per step, strict JSON) with its optional plot.

A mean over ranks of each rank's own std or token mean is not the whole batch's; these gather per-response
values, or sum numerators and denominators, so a metric is the same with 1 or 8 ranks.
"""
import json
import math
from pathlib import Path

import torch

import data
import remax
from fsdp import Dist, atomic_write, gathered, json_or_none
from model import generate, positions_from_mask, response_logprobs


def batch_stats(rows: dict, ctx: Dist) -> dict:
    """Statistics of the whole batch from every rank's per-response sums (not a mean of per-rank values)."""
    g = {k: ctx.gather(v) for k, v in rows.items()}
    tokens = g["length"].sum().clamp_min(1)
    stats = {"reward_std": g["reward"].std(correction=0).item(), "kl_token": (g["kl"].sum() / tokens).item(),
             "entropy": (g["entropy"].sum() / tokens).item()}
    if "baseline" in g:
        stats.update(baseline_std=g["baseline"].std(correction=0).item(),
                     advantage_std=(g["reward"] - g["baseline"]).std(correction=0).item())
    return stats


def step_row(stats: dict, rows: dict, batch, ctx: Dist) -> dict:
    """An RL step's metrics: its own stats averaged over ranks (each rank holds as many responses), the batch
    statistics, and for a skipped step the --data indices of the prompts whose reward was not finite."""
    row = ctx.mean({k: math.nan if v is None else float(v) for k, v in stats.items()})
    row.update(batch_stats(rows, ctx), grad_norm=stats["grad_norm"])
    if stats["grad_norm"] is None:
        ok = torch.isfinite(rows["reward"]) & torch.isfinite(rows.get("baseline", rows["reward"]))
        row["bad_prompts"] = bad_prompts(~ok, batch, ctx)
    return row


def bad_prompts(bad_rows, batch, ctx: Dist) -> list[int]:
    """Indices into --data of the prompts whose rollout had a non-finite reward, over all ranks."""
    flags = bad_rows.view(-1, len(batch)).any(0)                              # rloo: 2 rows per prompt
    return [int(i) for i, bad in zip(ctx.gather(torch.as_tensor(batch)), ctx.gather(flags)) if bad]


@torch.no_grad()
def eval_policy(policy, ref, reward_fn, prompts, ctx: Dist, *, pad_id: int, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, seed: int, gold=None, tok=None) -> dict:
    """Reward of greedy and sampled responses on held-out prompts, and the sampled responses' KL to pi_ref:
    kl, the sequence estimate sum_t k1_t; kl_exact, the official metric (the exact KL over the vocabulary
    at each response token, averaged over tokens). Responses are sampled as in training (official), from
    a generator of their own, so evaluating never moves the training samples. gold(prompt text, response
    text) -> float: a programmatic score of the greedy responses (decoded with `tok`), e.g. data.gold_score."""
    prompt, mask = data.left_pad(prompts, pad_id, ctx.device)
    g = torch.Generator(ctx.device).manual_seed(seed)
    B = len(prompts)
    with gathered(policy):
        resp, rmask = generate(policy, prompt, mask, max_new_tokens, n=2, generator=g, top_p=top_p, top_k=top_k,
                               temperature=torch.tensor([temperature] * B + [0.0] * B), pad_id=pad_id,
                               row_offset=ctx.rank * B, total_rows=B * ctx.world)
    r = reward_fn(prompt.repeat(2, 1), mask.repeat(2, 1), resp, rmask)
    logp, _ = response_logprobs(policy, prompt, mask, resp[:B], rmask[:B])
    ref_logp, _ = response_logprobs(ref, prompt, mask, resp[:B], rmask[:B])
    stats = {"reward_sampled": r[:B].mean().item(), "reward_greedy": r[B:].mean().item(),
             "kl": ((logp - ref_logp) * rmask[:B]).sum(-1).mean().item(),      # sequence KL estimate (k1)
             "length_greedy": rmask[B:].sum(-1).float().mean().item()}
    if gold is not None:
        texts = tok.decode_batch(p[m].tolist() for p, m in zip(prompt, mask))
        greedy = tok.decode_batch(x[m].tolist() for x, m in zip(resp[B:], rmask[B:]))
        stats["gold_greedy"] = sum(gold(p, a) for p, a in zip(texts, greedy)) / B
    return ctx.mean(stats) | {"kl_exact": exact_kl_over_ranks(policy, ref, prompt, mask, resp[:B], rmask[:B], ctx)}


@torch.no_grad()
def exact_kl_over_ranks(policy, ref, prompt, mask, resp, rmask, ctx: Dist, budget: int = 2**24) -> float:
    """remax.exact_kl over the global eval batch, a few rows at a time: [rows, T, V] logits of at most
    `budget` entries (128 MB in fp64) per model."""
    P = prompt.shape[1]
    tokens, joint = torch.cat([prompt, resp], 1), torch.cat([mask, rmask], 1)
    positions = positions_from_mask(torch.cat([mask, torch.ones_like(rmask)], 1))
    # Each pass is an FSDP forward (collectives): every rank must make as many, so size the chunks by the
    # longest rank's length; every rank holds as many rows.
    rows = max(1, budget // int(ctx.max(tokens.shape[1]) * policy.config.vocab_size))
    total = 0.0
    for s in range(0, len(tokens), rows):
        i = slice(s, s + rows)
        logits, ref_logits = (m(tokens[i], positions[i], joint[i])[:, P - 1:-1] for m in (policy, ref))
        total += remax.exact_kl(logits, ref_logits, rmask[i]).item() * rmask[i].sum().item()
    return ctx.sum(total) / max(1.0, ctx.sum(float(rmask.sum())))


class Metrics:
    """<out_dir>/metrics.jsonl: one JSON line per step (rank 0); on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, ctx: Dist, start_step: int = 0):
        self.path, self.on = path, ctx.rank == 0
        if self.on and path.exists():
            # Row k is logged after step k; a fresh run (start 0) starts the file anew.
            keep = [l for l in map(json_or_none, path.read_text().splitlines()) if l and 0 < start_step >= l["step"]]
            atomic_write(path, "".join(json.dumps(l) + "\n" for l in keep))

    def write(self, row: dict):
        if self.on:             # NaN / inf (a skipped step) as null: bare NaN is not JSON outside Python
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")

    def plot(self, keys=("reward_mean", "baseline_mean", "kl", "eval/reward_greedy", "eval/kl")):
        """metrics.png next to metrics.jsonl: reward and KL against steps, when matplotlib is installed (optional)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        if not self.on:
            return
        rows = [r for r in map(json_or_none, self.path.read_text().splitlines()) if r]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                axes[int("kl" in k)].plot(*zip(*pts), label=k, marker="." if k.startswith("eval/") else None)
        for ax, title in zip(axes, ("reward", "KL to the reference")):
            ax.set(title=title, xlabel="step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_suffix(".png"))
        plt.close(fig)
