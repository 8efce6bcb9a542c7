"""ReMax (Li et al., ICML 2024): REINFORCE whose baseline is the reward of the policy's own greedy response.

`remax_step` is Algorithm 1, lines 3-7, for one batch of prompts, each line numbered in a comment:

    y     = policy.generate(x, do_sample=True)     line 3   rollout: row b of one `generate` call, n=2
    y_max = policy.generate(x, do_sample=False)    line 4   rollout: row B+b, same prefill, temperature 0
    adv   = RM(x, y) - RM(x, y_max)                line 5   rollout scores both in one batch; token_weights
    logp  = policy.log_prob(x, y)                  line 6   model.response_logprobs, with grad
    loss  = -mean_i(sum_t logp * adv); step        line 7   remax_loss (ALGORITHM_1), then the optimizer

The estimator (Algorithm 1):  g = 1/N sum_i sum_t grad log pi(a_t^i | x^i, a_<t^i) * (r(x^i, a^i) - r(x^i, a_bar^i)).
The released code (liziniu/ReMax, remax_trainer.py) differs in four places, each a named option of
`remax_loss`: a per-token KL penalty, a discount gamma on the reward difference, a clip of that
difference, and a token-mean normalisation. `OFFICIAL` reproduces the scripts, `ALGORITHM_1` the paper.
Not reproduced, on purpose: the released code replaces the first token of a response of at most one
real token by " " before training on it, i.e. trains on a token the policy never sampled; here such a
response (EOS only) is trained on as sampled. With kl="none", beta is unused.

The loss half of this file (up to `Rollout`) needs nothing but torch: copy it as is.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model import generate, response_logprobs

KL_MODES = ("none", "k1_onestep", "k1_to_go")
NORMS = ("seq_sum", "token_mean")
BASELINES = ("greedy", "none", "rloo")

ALGORITHM_1 = dict(kl="none", beta=0.0, gamma=1.0, clip=None, norm="seq_sum")
# Official OPT-1.3B / Llama-2-7B scripts: kl_ctl 0.05, gamma 0.99, the hard-coded clip 5, loss / mask.sum();
# they sample with rollout(top_p=0.9, temperature=1.0).
OFFICIAL = dict(kl="k1_onestep", beta=0.05, gamma=0.99, clip=5.0, norm="token_mean")
PRESETS = {"official": OFFICIAL, "algorithm1": ALGORITHM_1}
# The official scripts sample at top-p 0.9; Algorithm 1's estimator is unbiased only at top-p 1.
PRESET_TOP_P = {"official": 0.9, "algorithm1": 1.0}


def preset_options(preset: str, *, kl=None, beta=None, gamma=None, clip=None, norm=None) -> dict:
    """The preset's remax_loss options with the given ones (not None) on top. A preset's beta belongs to its
    own KL mode: kl="none" drops it, and a KL mode left with beta 0 (algorithm1 has none) is an error."""
    given = dict(kl=kl, beta=beta, gamma=gamma, clip=clip, norm=norm)
    opts = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    if kl == "none" and beta is None:
        opts["beta"] = 0.0
    if opts["kl"] == "none" and opts["beta"]:
        raise ValueError(f"--beta {opts['beta']} has no effect with --kl none: add --kl k1_onestep or k1_to_go, "
                         "or drop --beta")
    if opts["kl"] != "none" and not opts["beta"]:
        raise ValueError(f"--kl {opts['kl']} with beta 0 (--preset {preset}) is no penalty: add --beta, "
                         "e.g. 0.05 (official), or use --kl none")
    return opts


def _reverse_cumsum(x):
    return x.flip(-1).cumsum(-1).flip(-1)


def token_weights(old_logprobs, ref_logprobs, reward, baseline, mask, *, kl="none", beta=0.0, gamma=1.0, clip=None):
    """The weight w_t multiplying log pi_theta(a_t | s_t) in the loss; detached, 0 off the mask.

        w_t = gamma^(L-t+1) * clip(r - b, -c, c) + KL term,  t = 1..L over the response (first EOS included)

    KL term, with k1_s = log pi_old(a_s | s_s) - log pi_ref(a_s | s_s):
        "none"        0                             Algorithm 1
        "k1_onestep"  -beta * k1_t                  official code: each token its own k1, never summed
        "k1_to_go"    -beta * sum_{s >= t} k1_s     verl / OpenRLHF: KL in the reward, reward-to-go
    gamma discounts the reward difference only, in every mode, as the official code does: the last token
    gets gamma * (r - b), the first gamma^L * (r - b). gamma = 1 and beta = 0 give Algorithm 1.
    The clip acts on the difference (not on r and b), so adding c(x) to both leaves w unchanged; an infinite
    difference is not clipped but gives NaN weights, so the caller skips the step instead of training on it.
    """
    _check_options("token_weights", kl, beta, gamma, clip)
    m = mask.bool()
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    with torch.no_grad():
        delta = (reward - baseline).to(dtype)
        if clip is not None:       # a non-finite reward stays non-finite (the step is skipped), never a +-c signal
            delta = torch.where(delta.isfinite(), delta.clamp(-clip, clip), torch.nan)
        w = gamma ** _reverse_cumsum(m).to(dtype) * delta[:, None]
        # where, not *: values at masked positions are arbitrary (even inf) and must not leak in.
        k1 = torch.where(m, old_logprobs.to(dtype) - ref_logprobs.to(dtype), 0.0)
        if kl == "k1_onestep":
            w = w - beta * k1
        elif kl == "k1_to_go":
            w = w - beta * _reverse_cumsum(k1)
        return torch.where(m, w, 0.0)


def _check_options(fn, kl, beta, gamma, clip):
    # An unknown kl would otherwise act as "none", and a clip <= 0 would clamp every delta to -|clip|.
    if kl not in KL_MODES:
        raise ValueError(f"{fn}: kl must be one of {KL_MODES}, got {kl!r}")
    if not beta >= 0:
        raise ValueError(f"{fn}: beta must be >= 0, got {beta!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"{fn}: gamma must be in (0, 1], got {gamma!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"{fn}: clip must be None or > 0, got {clip!r}")


def _check(logprobs, old_logprobs, ref_logprobs, reward, baseline, mask, kl, beta, gamma, clip, norm):
    _check_options("remax_loss", kl, beta, gamma, clip)
    if norm not in NORMS:
        raise ValueError(f"remax_loss: norm must be one of {NORMS}, got {norm!r}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"remax_loss: {name} must have the shape of logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("reward", reward), ("baseline", baseline)):
        if t.shape != logprobs.shape[:1]:
            raise ValueError(f"remax_loss: {name} must have shape ({logprobs.shape[0]},) (one per response), "
                             f"got {tuple(t.shape)}")


def remax_loss(logprobs, old_logprobs, ref_logprobs, reward, baseline, mask, *, kl="none", beta=0.0, gamma=1.0,
               clip=None, norm="seq_sum"):
    """Surrogate loss whose gradient is the ReMax estimator (Algorithm 1 line 7): -sum_{i,t} w_it log pi / Z.

    logprobs [B, N]: log pi_theta(a_t | s_t) of the sampled tokens, with grad. old_logprobs: the same at
    sampling time (pi_old = pi_theta when one step is taken per batch, as in the paper). ref_logprobs:
    the frozen reference (SFT) policy. reward, baseline [B]: r(x, a) and b(x) (b = r(x, a_bar) for ReMax).
    mask [B, N] bool: the response tokens up to and including the first EOS. w is `token_weights`.
    norm: "seq_sum" Z = B (sum over tokens, mean over responses: Algorithm 1);
          "token_mean" Z = sum mask (mean over all response tokens of the batch: official code).
    Returns (loss, stats); no gradient reaches reward, baseline, old or ref log-probs.
    """
    _check(logprobs, old_logprobs, ref_logprobs, reward, baseline, mask, kl, beta, gamma, clip, norm)
    m = mask.bool()
    w = token_weights(old_logprobs, ref_logprobs, reward, baseline, m, kl=kl, beta=beta, gamma=gamma, clip=clip)
    z = m.shape[0] if norm == "seq_sum" else m.sum().clamp_min(1)
    loss = -torch.where(m, w * logprobs, 0.0).sum() / z
    return loss, _stats(old_logprobs, ref_logprobs, reward, baseline, m, clip)


@torch.no_grad()
def _stats(old_logprobs, ref_logprobs, reward, baseline, m, clip):
    r, b = reward.double(), baseline.double()
    adv = r - b
    k1 = torch.where(m, old_logprobs.double() - ref_logprobs.double(), 0.0)
    lengths = m.sum(-1).double()
    stats = {"reward_mean": r.mean(), "reward_std": r.std(correction=0),
             "baseline_mean": b.mean(), "baseline_std": b.std(correction=0),
             "advantage_mean": adv.mean(), "advantage_std": adv.std(correction=0),
             "kl": k1.sum(-1).mean(),                               # sequence KL(pi_old || pi_ref), k1 estimate
             "kl_token": k1.sum() / lengths.sum().clamp_min(1),     # per response token
             "length": lengths.mean()}
    if clip is not None:
        stats["clip_frac"] = (adv.abs() > clip).double().mean()
    return {k: v.item() for k, v in stats.items()}


def exact_kl(logits, ref_logits, mask):
    """sum_v pi(v|s_t) (log pi(v|s_t) - log pi_ref(v|s_t)), averaged over response tokens: the official code's
    logged KL. Needs [B, N, V] logits of both policies, so use it only where the vocabulary is small."""
    logp, ref_logp = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    m = mask.bool()
    return torch.where(m, kl, 0.0).sum() / m.sum().clamp_min(1)


@dataclass
class Rollout:
    """Algorithm 1 lines 3-5 for B prompts. Its M rows are exactly what is trained on:

    baseline="greedy": M = B; baseline[b] = r(x_b, greedy response), which is in `greedy` and never trained on.
    baseline="none":   M = B; baseline = 0 (REINFORCE).
    baseline="rloo":   M = 2B, row k*B + b = sample k of prompt b; baseline[i] = reward of the other sample
                       of the same prompt (RLOO with two samples: the same generation cost as ReMax).
    So every variant trains with `remax_loss(logp, ..., ro.reward, ro.baseline, ro.response_mask)` where
    logp = response_logprobs(policy, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask).
    """
    prompt: torch.Tensor            # [M, P] left-padded; row i is the prompt of response i
    prompt_mask: torch.Tensor
    response: torch.Tensor          # [M, N] sampled responses, right-padded
    response_mask: torch.Tensor     # True up to and including the first EOS
    reward: torch.Tensor            # [M] float32, no grad
    baseline: torch.Tensor          # [M] float32, no grad
    greedy: torch.Tensor | None     # [B, N'] greedy responses (baseline="greedy" only)
    greedy_mask: torch.Tensor | None
    stats: dict


def _trim(tokens, mask):
    n = int(mask.sum(-1).max())
    return tokens[:, :n], mask[:, :n]


def rollout(policy, prompt, prompt_mask, reward_fn, *, baseline="greedy", max_new_tokens, temperature=1.0,
            top_p=1.0, top_k=0, generator=None, pad_id=0, row_offset=0, total_rows=None, compile=False) -> Rollout:
    """Sampled and baseline responses of `policy` to left-padded prompts, scored by `reward_fn` in one batch.

    The sampled and greedy responses come from one `generate` call with n=2: the prompt is prefilled
    once, rows B..2B-1 decode at temperature 0 (argmax at every step, no top-p/top-k) from the same
    weights and the prompt alone, with the same length limit and stop rule. The official scripts sample
    with top_p=0.9, temperature=1.0; the estimator is unbiased only at top_p=1, top_k=0, temperature=1.
    row_offset / total_rows: this rank's rows of a sharded global batch; compile: the compiled decode step
    (both: see model.generate).
    """
    if baseline not in BASELINES:
        raise ValueError(f"rollout: baseline must be one of {BASELINES}, got {baseline!r}")
    # generate does not check these; max_new_tokens=0 would fail later with an unrelated index error.
    if not max_new_tokens >= 1:
        raise ValueError(f"rollout: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"rollout: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"rollout: top_p must be in (0, 1], got {top_p!r}")
    if not top_k >= 0:
        raise ValueError(f"rollout: top_k must be >= 0 (0 = off), got {top_k!r}")
    B = prompt.shape[0]
    n = 1 if baseline == "none" else 2
    temps = float(temperature)
    if baseline == "greedy":
        temps = torch.tensor([temps] * B + [0.0] * B, device=prompt.device)
    response, response_mask = generate(policy, prompt, prompt_mask, max_new_tokens, n=n, temperature=temps,
                                       top_p=top_p, top_k=top_k, pad_id=pad_id, generator=generator,
                                       row_offset=row_offset, total_rows=total_rows, compile=compile)
    # generate runs in inference mode; its tensors could not be saved for the backward of line 6.
    response, response_mask = response.clone(), response_mask.clone()
    prompts, prompt_masks = prompt.repeat(n, 1), prompt_mask.repeat(n, 1)
    with torch.no_grad():
        rewards = reward_fn(prompts, prompt_masks, response, response_mask).detach().float()
    if rewards.shape != (n * B,):
        raise ValueError(f"rollout: reward_fn must return one reward per response, shape ({n * B},), "
                         f"got {tuple(rewards.shape)}")
    # Logged next to remax_loss's stats (which already hold the sampled responses' mean length).
    sampled = slice(0, B) if baseline == "greedy" else slice(None)
    stop = torch.tensor(policy.config.stop_ids, dtype=torch.long, device=response.device)
    last = response.gather(1, response_mask.sum(-1, keepdim=True) - 1)[:, 0]
    stats = {"eos_frac": torch.isin(last[sampled], stop).float().mean().item()}
    if n == 2:
        seen = torch.where(response_mask, response, -1)
        same = (seen[:B] == seen[B:]).all(-1).float().mean().item()
        stats["sample_eq_greedy" if baseline == "greedy" else "samples_equal"] = same
    if baseline == "greedy":
        greedy, greedy_mask = _trim(response[B:], response_mask[B:])
        stats["length_greedy"] = greedy_mask.sum(-1).float().mean().item()
        return Rollout(prompt, prompt_mask, *_trim(response[:B], response_mask[:B]), rewards[:B], rewards[B:],
                       greedy, greedy_mask, stats)
    base = torch.zeros_like(rewards) if baseline == "none" else torch.cat([rewards[B:], rewards[:B]])
    return Rollout(prompts, prompt_masks, response, response_mask, rewards, base, None, None, stats)


def per_response(ro: Rollout, logp, ref_logp, entropy) -> dict:
    """Per-response sums, for statistics over the global batch: a mean over ranks of each rank's std or
    token mean is not the std or token mean of the whole batch."""
    m = ro.response_mask
    k1 = torch.where(m, logp.detach().double() - ref_logp.double(), 0.0)
    return {"reward": ro.reward, "baseline": ro.baseline, "kl": k1.sum(-1), "length": m.sum(-1),
            "entropy": torch.where(m, entropy.double(), 0.0).sum(-1)}


def remax_step(policy, ref, reward_fn, prompt, prompt_mask, optimizer, update, *, loss_opts, baseline="greedy",
               gather=nullcontext, **sampling) -> tuple[dict, dict]:
    """One ReMax iteration on prompts x (left-padded [B, P]): Algorithm 1, lines 3-7, one optimizer step.

    update(model, optimizer, loss, token_mask) -> (grad norm | None if skipped, loss value): backward, clip
    and step (train.py's rescales a token mean to the global batch and skips a non-finite loss on every
    rank). gather(policy) holds the weights unsharded while decoding (fsdp.gathered). sampling: rollout's
    max_new_tokens, temperature, top_p, top_k, pad_id, generator, row_offset, total_rows.
    Returns (stats, per-response sums for statistics over ranks).
    """
    with gather(policy) as decoder:                                                          # lines 3-5
        ro = rollout(decoder, prompt, prompt_mask, reward_fn, baseline=baseline, **sampling)
    x, x_mask, y, y_mask = ro.prompt, ro.prompt_mask, ro.response, ro.response_mask
    with torch.no_grad():
        ref_logp, _ = response_logprobs(ref, x, x_mask, y, y_mask)                          # for the KL term
    logp, entropy = response_logprobs(policy, x, x_mask, y, y_mask)                         # line 6
    # pi_old = pi_theta: one step per batch of fresh samples, so the sampling-time log-probs are these.
    loss, stats = remax_loss(logp, logp.detach(), ref_logp, ro.reward, ro.baseline, y_mask, **loss_opts)
    token_mask = y_mask if loss_opts["norm"] == "token_mean" else None
    stats["grad_norm"], stats["loss"] = update(policy, optimizer, loss, token_mask)          # line 7
    return {**stats, **ro.stats}, per_response(ro, logp, ref_logp, entropy)
