"""PPO as the ReMax paper runs it for comparison: DeepSpeed-Chat step 3 (`dschat/rlhf/ppo_trainer.py`).

What ReMax removes is all here: a critic V(s_t) as large as the reward model (initialised from it),
per-token KL-shaped rewards, GAE and a second optimizer. One rollout = one sampled response per
prompt (remax.rollout(baseline="none")), then one actor step and one critic step, as DS-Chat's
defaults (generation batch = training batch, ppo_epochs 1), so the comparison is compute-fair.

    r_t   = -beta (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)) + [t = L] clip(r(x, a), -5, 5)
    A_t   = sum_l (gamma lam)^l delta_{t+l},  delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  V(s_{L+1}) = 0
    R_t   = A_t + V_old(s_t)                                     (GAE, Schulman et al. 2016, Eq. 16)
    L_pi  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 -+ eps))    (PPO, Schulman et al. 2017, Eq. 7)
    L_V   = 0.5 mean_t max((V - R)^2, (clip(V, V_old -+ eps_v) - R)^2)

t = 1..L runs over the response up to and including its first EOS; means are over all response
tokens of the batch. DS-Chat's constants are the defaults: beta 0.1, clip 5, eps = eps_v = 0.2,
gamma 1, lam 0.95; advantages are not whitened (DS-Chat's get_advantages_and_returns does not).

Deviations from DS-Chat, each for a reason:
- The first EOS is an action (the ReMax code's change): it is in the loss mask, the score sits on it
  and GAE's terminal state follows it. DS-Chat builds its mask from `seq != pad` with pad = EOS, so
  it puts the score and the last KL term on the EOS position (same rewards and advantages as here)
  but never trains that token.
- pi_old and V_old come from the same weights as the update (one step per rollout), so pi_old is the
  detached training forward instead of a separate no-grad pass. The ratio is then exactly 1 and both
  clips are inactive, as in DS-Chat's default up to dropout and kernel noise: this PPO is A2C with
  GAE. Use separate pi_old / V_old passes before ever taking more than one step per rollout.
- Every model samples with the run's temperature / top-p (DS-Chat decodes Llama actors greedily), and
  no short response is dropped (DS-Chat drops responses of <= 1 token). No pretraining-mix term.

The loss half (up to `Critic`) needs nothing but torch.
"""
from contextlib import nullcontext

import torch

from model import positions_from_mask, response_logprobs
from remax import rollout
from reward import RewardModel


def _check_mask(mask, name):
    m = mask.bool()
    if not bool(m[:, 0].all()) or bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError(f"{name}: expected a response mask that is True from the first column up to the "
                         "end of each response, then False (right padding, at least one token per row)")
    return m


@torch.no_grad()
def kl_shaped_rewards(score, logp_old, logp_ref, mask, kl_ctl=0.1, clip=5.0):
    """DS-Chat `compute_rewards`: -kl_ctl * k1_t at every response token, the clipped RM score added at the last.

    The KL is the per-token k1 estimate log pi_old - log pi_ref at the sampled token, in the reward
    (InstructGPT's Eq. 2 spread over tokens), so GAE carries it back to earlier tokens. 0 off the mask.
    """
    m = _check_mask(mask, "kl_shaped_rewards: mask")
    r = torch.where(m, -kl_ctl * (logp_old.float() - logp_ref.float()), 0.0)
    last = m.sum(-1, keepdim=True) - 1
    s = score.float()
    if clip is not None:                # a non-finite score stays non-finite (the step is skipped), never +-clip
        s = torch.where(s.isfinite(), s.clamp(-clip, clip), torch.nan)
    return r.scatter_add(1, last, s[:, None])


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (DS-Chat `get_advantages_and_returns`, from trlx), no whitening.

    Rewards and values past the response are zero, so the state after the last token is terminal
    (V = 0) and no bootstrap leaks in from padding. Returns (advantages, returns = A + V), 0 off the mask.
    """
    m = _check_mask(mask, "gae: mask")
    r, v = torch.where(m, rewards.float(), 0.0), torch.where(m, values.float(), 0.0)
    delta = r + gamma * torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1) - v
    adv, running = torch.zeros_like(delta), torch.zeros_like(delta[:, 0])
    for t in reversed(range(delta.shape[1])):
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + v, 0.0)


def _masked_mean(x, m):
    return torch.where(m, x, 0.0).sum() / m.sum().clamp_min(1)


def ppo_policy_loss(logp, logp_old, advantages, mask, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), a mean over response tokens (DS-Chat `actor_loss_fn`).

    d loss / d logp_t = -A_t rho_t / M where the unclipped term is the max, else 0 (M = number of tokens).
    """
    m = mask.bool()
    ratio = torch.exp(torch.where(m, logp.float() - logp_old.float(), 0.0))
    adv = torch.where(m, advantages.float(), 0.0)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = _masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {"policy_loss": loss.item(), "ratio_clip_frac": _masked_mean((clipped > unclipped).float(), m).item(),
                 "approx_kl": _masked_mean(logp_old.float() - logp.float(), m).item()}
    return loss, stats


def ppo_value_loss(values, values_old, returns, mask, clip=0.2):
    """Clipped value loss, 0.5 * mean over response tokens (DS-Chat `critic_loss_fn`, cliprange_value 0.2).

    The clip keeps V within +-clip of its rollout value unless moving further lowers the error: gradient
    (V - R) / M where the unclipped error is the larger, else 0.
    """
    m = mask.bool()
    # where before any arithmetic: pad entries (even inf / nan) then get an exact 0 gradient.
    v, old, ret = (torch.where(m, t.float(), 0.0) for t in (values, values_old, returns))
    v_clipped = torch.clamp(v, old - clip, old + clip)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(err, err_clipped), m)
    with torch.no_grad():
        stats = {"value_loss": loss.item(), "value_clip_frac": _masked_mean((err_clipped > err).float(), m).item()}
    return loss, stats


class Critic(RewardModel):
    """V(s_t) per token: the reward model's layout (`model` backbone + bias-free `score` head) read at every position.

    DS-Chat initialises the critic from the step-2 reward model; sharing RewardModel's layout means
    `Critic.from_pretrained(rm_folder)` does that, and `save_pretrained` writes an RM-format folder.
    """

    def forward(self, tokens, mask=None, positions=None):
        """tokens [B, T], mask [B, T] bool -> values [B, T] float32: V of the state ending at each token."""
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        h = self.model(tokens, positions_from_mask(mask) if positions is None else positions, mask, return_hidden=True)
        return h.float() @ self.score.weight[0].float()          # fp32 dot, as RewardModel: bf16 values step in 2^-5

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "Critic":
        """A trainable copy of a reward model (frozen or not) as the critic; shares no storage with it."""
        w = rm.score.weight
        backbone = {k: v.detach().clone() for k, v in rm.model.state_dict().items()}
        return cls._assemble(rm.config, backbone, w.detach().clone(), w.dtype, w.device)


def response_values(critic, prompt, prompt_mask, response, response_mask):
    """V(s_t) for each response token, s_t = (x, a_<t): the hidden state one position before a_t,
    the alignment of model.response_logprobs (DS-Chat: values[:, :-1][:, start:])."""
    P = prompt.shape[1]
    tokens = torch.cat([prompt, response], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    positions = positions_from_mask(torch.cat([prompt_mask, torch.ones_like(response_mask)], 1))
    return critic(tokens, mask, positions)[:, P - 1:-1]


@torch.no_grad()
def experience(critic, ref, prompt, prompt_mask, response, response_mask):
    """The no-grad half of DS-Chat `generate_experience` after the RM score: (log pi_ref(a_t|s_t), V_old(s_t)) [B, N]."""
    m = _check_mask(response_mask, "experience: response_mask")
    logp_ref, _ = response_logprobs(ref, prompt, prompt_mask, response, m)
    return logp_ref, response_values(critic, prompt, prompt_mask, response, m)


def _update(model, opt, loss, token_mask=None):
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item(), loss.item()


def ppo_step(policy, critic, ref, prompt, prompt_mask, response, response_mask, score, *, opt_policy, opt_critic,
             update=_update, kl_ctl=0.1, clip_reward=5.0, gamma=1.0, lam=0.95, clip=0.2, clip_value=0.2,
             logp_ref=None, values_old=None) -> tuple[dict, dict]:
    """One PPO iteration on one rollout (DS-Chat `generate_experience` + `train_rlhf`): actor step, then critic step.

    response / response_mask: one sampled response per prompt (first EOS included); score [B]: r(x, a).
    update(model, opt, loss, token_mask) -> (grad norm | None, loss value) backpropagates and steps (the
    caller's clipping, loss scaling over ranks and non-finite skipping); the default just steps.
    logp_ref / values_old [B, N]: `experience(critic, ref, ...)` when the caller computed it already (bench.py times it apart);
    computed here otherwise (`ref` is then not used). Returns (stats, per-response sums for statistics
    over ranks: reward, kl, length, entropy).
    """
    m = _check_mask(response_mask, "ppo_step: response_mask")
    if (logp_ref is None) != (values_old is None):
        raise ValueError("ppo_step: pass both logp_ref and values_old (from ppo.experience) or neither")
    if logp_ref is None:
        logp_ref, values_old = experience(critic, ref, prompt, prompt_mask, response, m)
    logp, entropy = response_logprobs(policy, prompt, prompt_mask, response, m)
    logp_old = logp.detach()
    rewards = kl_shaped_rewards(score, logp_old, logp_ref, m, kl_ctl, clip_reward)
    advantages, returns = gae(rewards, values_old, m, gamma, lam)
    policy_loss, policy_stats = ppo_policy_loss(logp, logp_old, advantages, m, clip)
    grad_norm, policy_loss_value = update(policy, opt_policy, policy_loss, m)
    # The actor's graph is freed before the critic's forward, as DS-Chat's order keeps peak memory down.
    values = response_values(critic, prompt, prompt_mask, response, m)
    value_loss, value_stats = ppo_value_loss(values, values_old, returns, m, clip_value)
    critic_grad_norm, value_loss_value = update(critic, opt_critic, value_loss, m)
    k1 = torch.where(m, logp_old - logp_ref.float(), 0.0)
    lengths = m.sum(-1).float()
    rows = {"reward": score, "kl": k1.double().sum(-1), "length": m.sum(-1),
            "entropy": torch.where(m, entropy.detach().double(), 0.0).sum(-1)}
    return {**policy_stats, **value_stats, "loss": policy_loss_value, "value_loss": value_loss_value,
            "reward_mean": score.float().mean().item(),
            "reward_std": score.float().std(correction=0).item(), "kl": k1.sum(-1).mean().item(),
            "kl_token": (k1.sum() / lengths.sum()).item(), "length": lengths.mean().item(),
            "advantage_mean": _masked_mean(advantages, m).item(), "value_mean": _masked_mean(values_old, m).item(),
            "return_mean": _masked_mean(returns, m).item(), "entropy": _masked_mean(entropy, m).item(),
            "grad_norm": grad_norm, "critic_grad_norm": critic_grad_norm}, rows


def ppo_iteration(policy, ref, reward_fn, prompt, prompt_mask, optimizer, update, *, critic, critic_optimizer,
                  kl_ctl=0.1, gather=nullcontext, **sampling) -> tuple[dict, dict]:
    """One PPO iteration with remax.remax_step's call shape: one sampled response per prompt, its score,
    then `ppo_step` (actor step, critic step). Returns (stats, per-response sums for statistics over ranks)."""
    with gather(policy) as decoder:
        ro = rollout(decoder, prompt, prompt_mask, reward_fn, baseline="none", **sampling)
    stats, rows = ppo_step(policy, critic, ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask, ro.reward,
                           opt_policy=optimizer, opt_critic=critic_optimizer, update=update, kl_ctl=kl_ctl)
    return {**stats, **ro.stats}, rows
