"""SFT -> reward model -> ReMax: the paper's three steps, one process or torchrun, under FSDP2.

    python train.py                                    # built-in demo: all three steps, tiny model, CPU
    torchrun --nproc_per_node=8 train.py --stage remax --policy out/sft/final \\
        --reward_model out/rm/final --data prompts.jsonl --preset official

Top to bottom: the flags (Config), step 1 (SFT), step 2 (reward model), step 3 (ReMax, whose update is
`remax.remax_step`, Algorithm 1 lines 3-7; or PPO, the paper's comparison), the loop the three share, the
demo, main. Distributed plumbing is in fsdp.py, the logged metrics in metrics.py.
"""
import argparse
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from types import NoneType, UnionType
from typing import get_args

import torch

import data
import fsdp
import metrics
import ppo
import remax
from fsdp import Dist, log, on_rank0
from model import ModelConfig, Tokenizer, Transformer, read_config
from reward import ModelReward, RetokenizedReward, RewardModel, TextReward, bradley_terry_loss, mistral_to_ultrarm

FORMATS, SPLITS = data.FORMATS, ("sft", "rm", "remax")      # `data` is also a Config field
RL, ALL, DEMO = "remax ppo", "sft rm remax ppo", "sft rm remax ppo demo"   # "ppo": --stage remax --algo ppo
RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
         "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}   # `not rule(v)`: NaN fails too


def flag(default, help: str, check=None, runs: str = ALL, safe: bool = False):
    """A Config field: its default, one line of help, its allowed values (a tuple) or range (a key of RULES),
    the runs that use it (validate() refuses a flag given to a run that would ignore it), and whether a
    checkpoint may be resumed with another value (safe: it does not change what a step does)."""
    return field(default=default, metadata=dict(help=help, check=check, runs=runs.split(), safe=safe))


@dataclass
class Config:
    stage: str = flag("demo", "demo: all three steps on the built-in task", ("demo", "sft", "rm", "remax"), DEMO)
    algo: str = flag("remax", "remax, or ppo: the paper's comparison (ppo.py)", ("remax", "ppo"), RL + " demo")
    critic: str = flag("", "HF folder, the critic's init; default --reward_model, as DS-Chat", None, "ppo")
    critic_lr: float = flag(5e-6, "the critic's peak learning rate (same schedule as --lr)", "> 0", "ppo", True)
    policy: str = flag("", "HF folder: model to fine-tune (sft), RM init (rm), SFT policy (remax)")
    reward_model: str = flag("", "HF *ForSequenceClassification folder scoring responses", None, RL)
    reward_fn: str = flag("", "file.py:function scoring texts (prompts, responses) -> floats", None, RL)
    reward_format: str = flag("same", "same: the RM reads the policy's tokens (official); ultrarm: re-templated "
                                      "text (Mistral + UltraRM)", ("same", "ultrarm"), RL)
    tokenizer: str = flag("", "HF folder with tokenizer.json; default --policy")
    data: str = flag("", "JSONL: SFT pairs (sft), preference pairs (rm), prompts (remax)")
    eval_data: str = flag("", "held-out JSONL; default the last --eval_size records of --data", None, "rm " + RL)
    split: str = flag("", "only this part of the paper's 20/40/40 split of --data", ("", "sft", "rm", "remax"))
    data_seed: int = flag(1234, "the split's shuffle (official)")
    eval_size: int = flag(64, "held-out prompts / pairs evaluated", ">= 1", "rm " + RL)
    prompt_format: str = flag("auto", "auto: chat if the tokenizer has a template, else hh", FORMATS)
    out_dir: str = flag("", "config.json, metrics.jsonl, checkpoints, exports; default out/<stage>", None, DEMO, True)
    preset: str = flag("official", "official: the released scripts; algorithm1: Algorithm 1", tuple(remax.PRESETS),
                       RL + " demo")
    baseline: str = flag("greedy", "greedy: ReMax; none: REINFORCE; rloo: 2nd sample", remax.BASELINES, "remax demo")
    kl: str | None = flag(None, "KL penalty (official k1_onestep); default the preset's", remax.KL_MODES, "remax")
    beta: float | None = flag(None, "KL coefficient (ppo: kl_ctl 0.1); default the preset's", ">= 0", RL)
    gamma: float | None = flag(None, "discount of the reward difference; default the preset's", "in (0, 1]", "remax")
    clip: float | None = flag(None, "clip r - b to +-clip; default the preset's", "> 0", "remax")
    norm: str | None = flag(None, "seq_sum (Algorithm 1), token_mean (official); default: preset", remax.NORMS, "remax")
    temperature: float = flag(1.0, "sampling temperature", ">= 0", RL)
    top_p: float | None = flag(None, "nucleus; default the preset's (official 0.9, algorithm1 1)", "in (0, 1]", RL)
    top_k: int = flag(0, "top-k sampling, 0 = off", ">= 0", RL)
    compile: bool = flag(False, "decode with the compiled one-token step (CUDA graphs on a GPU)", None, RL, True)
    max_prompt_len: int = flag(256, "prompt tokens", ">= 1")
    overlong: str = flag("truncate", "a longer prompt: keep its last tokens (official) or error", ("truncate", "error"))
    max_new_tokens: int = flag(256, "response tokens generated", ">= 1", RL)
    max_len: int = flag(512, "prompt + response tokens", ">= 1", "sft rm")
    lr: float = flag(1e-6, "peak learning rate (official Llama-2-7B script)", "> 0", DEMO, True)
    weight_decay: float = flag(0.1, "AdamW weight decay (none on norms)", ">= 0")
    adam_beta1: float = flag(0.9, "AdamW beta1", "in [0, 1)")
    adam_beta2: float = flag(0.95, "AdamW beta2", "in [0, 1)")
    warmup_steps: int = flag(0, "linear warmup steps before the cosine decay", ">= 0", safe=True)
    grad_clip: float = flag(1.0, "global gradient-norm clip", "> 0")
    batch_size: int = flag(8, "global prompts (remax), pairs (rm), examples (sft) per optimizer step", ">= 1")
    epochs: int = flag(1, "passes over --data", ">= 1", safe=True)
    max_steps: int = flag(0, "stop after this many steps; 0 = as many as --epochs gives", ">= 0", DEMO, True)
    dtype: str = flag("auto", "compute dtype; auto: bf16 on GPU, fp32 on CPU", ("auto", "float32", "bfloat16"))
    activation_checkpointing: bool = flag(False, "recompute each block's activations in backward", safe=True)
    eval_every: int = flag(0, "evaluate every N steps; 0 = before and after training", ">= 0", "rm " + RL, True)
    gold: str = flag("", "synthetic: also the built-in task's gold score of greedy answers", ("", "synthetic"), RL, True)
    target_kl: float = flag(0.0, "stop once eval kl_exact reaches it (official 1.0); 0 = never", ">= 0", RL, True)
    save_every: int = flag(0, "checkpoint every N steps; 0 = never (the final export is always written)", ">= 0", safe=True)
    resume: bool = flag(False, "continue from the newest complete checkpoint in --out_dir", safe=True)
    max_bad_steps: int = flag(5, "consecutive non-finite steps tolerated before stopping", ">= 1", safe=True)
    seed: int = flag(2023, "sampling, shuffling and (demo) initialisation", None, DEMO)
    device: str = flag("auto", "auto: cuda when there is one", ("auto", "cpu", "cuda"), DEMO)


def parse_args(argv=None, **defaults) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in fields(Config):
        default, meta = defaults.get(f.name, f.default), f.metadata
        check = meta["check"] if isinstance(meta["check"], str) else " | ".join(map(repr, meta["check"] or ()))
        help = f"{meta['help']} [{' '.join(meta['runs'])}{'; ' + check if check else ''}] (default: {default!r})"
        kind = next(t for t in get_args(f.type) if t is not NoneType) if isinstance(f.type, UnionType) else f.type
        p.add_argument(f"--{f.name}", default=default, help=help, **dict(action=argparse.BooleanOptionalAction)
                       if kind is bool else dict(type=kind, metavar=kind.__name__.upper()))
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1, 0, -1):          # argparse takes "-1e-4" for a flag: join it to the flag before
        if re.fullmatch(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", argv[i], re.I) and argv[i - 1].startswith("--"):
            argv[i - 1:i + 1] = [f"{argv[i - 1]}={argv[i]}"]
    return Config(**vars(p.parse_args(argv)))


def validate(cfg: Config):
    """Every flag against its declaration, then the few rules that tie flags together; one line each."""
    for f in fields(Config):
        v, check = getattr(cfg, f.name), f.metadata["check"]
        if isinstance(check, tuple) and v is not None and v not in check:
            names = ", ".join(repr(c) if c == "" else str(c) for c in check)
            raise SystemExit(f"--{f.name}: expected {' or '.join(names.rsplit(', ', 1))}, got {v!r}")
        if isinstance(check, str) and v is not None and not RULES[check](v):
            raise SystemExit(f"--{f.name}: expected {check}, got {v!r}")
    run = "ppo" if cfg.stage == "remax" and cfg.algo == "ppo" else cfg.stage
    unused = [f for f in fields(Config) if getattr(cfg, f.name) != f.default and run not in f.metadata["runs"]]
    if unused:
        demo = ", ".join("--" + f.name for f in fields(Config) if "demo" in f.metadata["runs"])
        raise SystemExit(", ".join("--" + f.name for f in unused) + ": " + (
            f"the demo takes only {demo}; run --stage sft / rm / remax for the rest" if run == "demo" else
            "ReMax loss options, unused by --algo ppo (ppo.py keeps DS-Chat's gamma 1, lambda 0.95, reward clip 5; "
            "--beta sets its kl_ctl)" if run == "ppo" and any("remax" in f.metadata["runs"] for f in unused) else
            f"not used by --stage {cfg.stage}" + (" (--critic and --critic_lr are for --algo ppo)"
                                                   if "ppo" in unused[0].metadata["runs"] else "")))
    if run != "demo" and (missing := [name for name in ("policy", "data") if not getattr(cfg, name)]):
        raise SystemExit(f"--{missing[0]} is required for --stage {cfg.stage}")
    if run in RL and bool(cfg.reward_model) == bool(cfg.reward_fn):
        raise SystemExit("--reward_model, --reward_fn: give exactly one of them for --stage remax")
    if run == "ppo" and not cfg.critic and (cfg.reward_format == "ultrarm" or cfg.reward_fn):
        raise SystemExit(f"--algo ppo {'--reward_fn' if cfg.reward_fn else '--reward_format ultrarm'}: add --critic, "
                         "a value model on the policy's tokenizer (initialised from a reward model folder)")
    try:
        remax_options(cfg) if cfg.algo == "remax" and run in ("remax", "demo") else None
    except ValueError as e:                        # a preset's beta with --kl none, a KL mode with no beta
        raise SystemExit(str(e)) from None
    if run in ("sft", "rm") and cfg.max_len <= cfg.max_prompt_len:
        raise SystemExit(f"--max_len {cfg.max_len} must exceed --max_prompt_len {cfg.max_prompt_len} "
                         "(the rest is the response's room)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device available to torch {torch.__version__}")
    out = Path(cfg.out_dir or f"out/{cfg.stage}").resolve()
    for name in ("policy", "reward_model", "critic", "tokenizer"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_dir():
            raise SystemExit(f"--{name} {getattr(cfg, name)}: folder not found (expected a Hugging Face checkpoint)")
        if getattr(cfg, name) and (out in {path := Path(getattr(cfg, name)).resolve(), *path.parents} or path in out.parents):
            raise SystemExit(f"--out_dir {out}: would write over or into the input --{name} {getattr(cfg, name)}; "
                             "use another --out_dir")


def remax_options(cfg: Config) -> dict:
    return remax.preset_options(cfg.preset, kl=cfg.kl, beta=cfg.beta, gamma=cfg.gamma, clip=cfg.clip, norm=cfg.norm)


# --------------------------------------------------------------------------- inputs

def start(cfg: Config, ctx: Dist) -> Tokenizer:
    """Checks the model's context and --tokenizer (its EOS must stop the policy), then opens the run folder."""
    model, rl = read_config(cfg.policy), cfg.stage == "remax"
    if (need := cfg.max_prompt_len + cfg.max_new_tokens if rl else cfg.max_len) > model.max_seq_len:
        raise ValueError(f"{'--max_prompt_len + --max_new_tokens' if rl else '--max_len'}: {need} tokens, more than the "
                         f"model's context of {model.max_seq_len} (max_position_embeddings in {cfg.policy}/config.json)")
    tok, stop_ids = Tokenizer(cfg.tokenizer or cfg.policy), model.stop_ids
    if cfg.stage != "rm" and tok.eos_id is not None and tok.eos_id not in stop_ids:
        raise ValueError(f"--policy {cfg.policy}: the tokenizer's eos token {tok.eos_id} is not among the model's stop"
                         f" ids {stop_ids} (eos_token_id in config.json, generation_config.json): responses trained to "
                         "end with it would never stop generation")
    metrics.start_run(Path(cfg.out_dir), asdict(cfg), asdict(Config()), run_identity(cfg) if cfg.resume else None, ctx,
                      cfg.stage)
    tok.pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return tok


def run_identity(cfg: Config) -> dict:
    return metrics.run_identity(asdict(cfg), {f.name for f in fields(Config) if f.metadata["safe"]})


def load(path, cfg: Config, ctx: Dist, trainable: bool, cls=Transformer, tok=None, flag: str = "policy"):
    """A sharded model (fsdp.load_model) whose embeddings cover `tok`'s ids."""
    return fsdp.load_model(path, ctx, fsdp.compute_dtype(cfg.dtype, ctx.device), trainable, cls,
                           cfg.activation_checkpointing, tok.vocab_size if tok else 0, "--" + flag)


def read_data(cfg: Config, reader, encode, ctx: Dist, what: str, held_out: bool = True):
    """(train, eval) of --data through `reader` and `encode`; with --split, only that part of the paper's 2:4:4
    split (the same rows in all three stages, so SFT, RM and RL data never overlap, as official). Eval:
    --eval_data, else the last --eval_size records of --data; each rank gets an equal share."""
    records = reader(cfg.data)
    records = data.split_records(records, (2, 4, 4), cfg.data_seed)[SPLITS.index(cfg.split)] if cfg.split else records
    held = (reader(cfg.eval_data)[:cfg.eval_size] if cfg.eval_data else records[-cfg.eval_size:]) if held_out else []
    train, counts = encode(records[:-cfg.eval_size] if held_out and not cfg.eval_data else records)
    held = encode(held)[0]
    log(ctx, f"[data] {cfg.data}: {len(train)} train / {len(held)} eval {what}, {counts}")
    if len(train) < cfg.batch_size:
        raise ValueError(f"--data {cfg.data}: {len(train)} {what}" + (f" left after holding out --eval_size "
                         f"{cfg.eval_size} for evaluation" if held_out and not cfg.eval_data else "")
                         + f" are fewer than one batch (--batch_size {cfg.batch_size})")
    if held_out and len(held) < ctx.world:
        raise ValueError(f"--eval_data/--eval_size: {len(held)} evaluation {what} for {ctx.world} ranks; "
                         "expected at least one per rank")
    n = len(held) // ctx.world
    return train, held[ctx.rank * n:(ctx.rank + 1) * n]


# --------------------------------------------------------------------------- step 1: SFT

def train_sft(cfg: Config, ctx: Dist) -> Path:
    """Step 1: maximise log pi(response | prompt) on demonstrations (loss on response tokens and EOS only)."""
    tok = start(cfg, ctx)
    enc = partial(data.encode_sft, tok, fmt=cfg.prompt_format, max_prompt_len=cfg.max_prompt_len,
                  max_response_len=cfg.max_len - cfg.max_prompt_len, overlong=cfg.overlong)
    examples, _ = read_data(cfg, data.read_sft, enc, ctx, "sft examples", held_out=False)
    model = load(cfg.policy, cfg, ctx, True, tok=tok)
    opt = fsdp.adamw(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))

    def step_fn(batch, update):
        tokens, mask, loss_mask = data.sft_batch([examples[i] for i in batch], tok.pad, ctx.device)
        logp, _ = model(tokens, mask=mask, targets=torch.cat([tokens[:, 1:], tokens[:, -1:]], 1))
        m = loss_mask[:, 1:]
        n = m.sum().item()
        # Token mean over the global batch, whatever the world size (see fsdp.make_update).
        loss = -(logp[:, :-1] * m).sum() * ctx.world / ctx.sum(n)
        grad_norm, _ = update(model, opt, loss)
        return ctx.mean({"loss": loss.item()}) | {"tokens": int(ctx.sum(n)), "grad_norm": grad_norm}
    loop(cfg, ctx, "sft", len(examples), step_fn, {"model": (model, opt)}, tok, show=("loss", "grad_norm"))
    return Path(cfg.out_dir) / "final"


# --------------------------------------------------------------------------- step 2: reward model

def train_rm(cfg: Config, ctx: Dist) -> Path:
    """Step 2: a reward model initialised from --policy, trained with the Bradley-Terry loss on preference pairs."""
    out, tok = Path(cfg.out_dir), start(cfg, ctx)
    enc = partial(data.encode_preferences, tok, fmt=cfg.prompt_format, max_prompt_len=cfg.max_prompt_len,
                  max_response_len=cfg.max_len - cfg.max_prompt_len, overlong=cfg.overlong)
    examples, held = read_data(cfg, data.read_preferences, enc, ctx, "pairs")
    # The paper's step 2 starts the RM from the SFT model: written once as an RM folder, then loaded sharded.
    init = lambda: RewardModel.init_from_policy(Transformer.from_pretrained(cfg.policy)).save_pretrained(out / "init")
    on_rank0(ctx, init)
    model = load(out / "init", cfg, ctx, True, RewardModel, tok)
    on_rank0(ctx, lambda: shutil.rmtree(out / "init"))            # read: a full fp32 copy (28 GB at 7B) not needed now
    opt = fsdp.adamw(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))

    def scores(pairs):
        r = model(*data.preference_batch(pairs, tok.pad, ctx.device))
        return r[:len(pairs)], r[len(pairs):]

    def step_fn(batch, update):
        chosen, rejected = scores([examples[i] for i in batch])
        loss, acc = bradley_terry_loss(chosen, rejected)
        grad_norm, _ = update(model, opt, loss)
        return ctx.mean({"loss": loss.item(), "accuracy": acc.item(), "reward_chosen": chosen.mean().item(),
                         "reward_rejected": rejected.mean().item()}) | {"grad_norm": grad_norm}

    @torch.no_grad()
    def held_out_accuracy():
        return ctx.mean({"accuracy": bradley_terry_loss(*scores(held))[1].item()})
    loop(cfg, ctx, "rm", len(examples), step_fn, {"model": (model, opt)}, tok, held_out_accuracy, show=("loss",))
    return out / "final"


# --------------------------------------------------------------------------- step 3: ReMax (or PPO)

def train_remax(cfg: Config, ctx: Dist, reward_fn=None) -> dict:
    """Step 3: remax.remax_step (Algorithm 1 lines 3-7), or ppo.ppo_iteration, once per fresh batch of prompts.
    reward_fn: a reward.py callable, default --reward_fn or --reward_model. Returns the evaluations before and after."""
    tok = start(cfg, ctx)
    enc = partial(data.encode_prompts, tok, fmt=cfg.prompt_format, max_len=cfg.max_prompt_len, overlong=cfg.overlong)
    prompts, eval_prompts = read_data(cfg, data.read_prompts, enc, ctx, "prompts")
    if reward_fn is None and not cfg.reward_fn and cfg.reward_format == "ultrarm":   # all prompts, before any model
        for text in tok.decode_batch(prompts + eval_prompts):
            mistral_to_ultrarm(text, "")
    reward_fn = reward_fn or make_reward(cfg, ctx, tok)
    policy = load(cfg.policy, cfg, ctx, True, tok=tok)
    ref = load(cfg.policy, cfg, ctx, False)                       # pi_ref: the frozen SFT init
    opt = fsdp.adamw(policy, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    trained, lr_scale = {"model": (policy, opt)}, {}
    if cfg.algo == "ppo":                     # the paper's comparison: a critic initialised from the RM
        flag = "critic" if cfg.critic else "reward_model"
        critic = load(getattr(cfg, flag), cfg, ctx, True, ppo.Critic, tok, flag)
        critic_opt = fsdp.adamw(critic, cfg.critic_lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
        trained["critic"], lr_scale[critic_opt] = (critic, critic_opt), cfg.critic_lr / cfg.lr
        kl_ctl = 0.1 if cfg.beta is None else cfg.beta                                 # DS-Chat's kl_ctl
        algo_step = partial(ppo.ppo_iteration, critic=critic, critic_optimizer=critic_opt, kl_ctl=kl_ctl)
    else:
        algo_step = partial(remax.remax_step, loss_opts=remax_options(cfg), baseline=cfg.baseline)
    log(ctx, f"[{cfg.algo}] {algo_step.keywords}")
    gen = torch.Generator(ctx.device).manual_seed(cfg.seed)
    top_p = cfg.top_p if cfg.top_p is not None else remax.PRESET_TOP_P[cfg.preset]
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=top_p, top_k=cfg.top_k,
                    compile=cfg.compile, pad_id=tok.pad, generator=gen, row_offset=ctx.split(cfg.batch_size).start,
                    total_rows=cfg.batch_size)
    gather = partial(fsdp.gathered, seconds=(seconds := {}))   # how long each rollout (generation, scoring) took

    def step_fn(batch, update):
        t0 = time.perf_counter()
        prompt, prompt_mask = data.left_pad([prompts[i] for i in batch], tok.pad, ctx.device)
        stats, rows = algo_step(policy, ref, reward_fn, prompt, prompt_mask, opt, update, gather=gather, **sampling)
        dt, t_gen = time.perf_counter() - t0, seconds["gathered"]
        return metrics.step_row(stats, rows, batch, ctx) | dict(t_gen=t_gen, t_train=dt - t_gen, tokens_per_s=ctx.sum(
            float(rows["length"].sum())) / dt, peak_mem_gb=fsdp.peak_memory_gb(ctx.device))

    held_out = partial(metrics.eval_policy, policy, ref, reward_fn, eval_prompts, ctx, tok=tok, seed=cfg.seed + 1,
                       **{k: v for k, v in sampling.items() if k not in ("generator", "row_offset", "total_rows")},
                       gold=data.gold_score if cfg.gold == "synthetic" else None, chunk=cfg.batch_size // ctx.world)
    return loop(cfg, ctx, cfg.algo, len(prompts), step_fn, trained, tok, held_out, lr_scale, gen, rl=True,
                show=("loss", "reward_mean", "baseline_mean", "kl"))


def make_reward(cfg: Config, ctx: Dist, tok: Tokenizer):
    """r(x, a) on the policy's tokens (reward.py): --reward_fn, or the reward model at --reward_model."""
    if cfg.reward_fn:
        return TextReward.from_file(cfg.reward_fn, tok)
    same = cfg.reward_format == "same"        # ultrarm: the RM reads its own tokens, so any vocabulary size
    rm = load(cfg.reward_model, cfg, ctx, False, RewardModel, tok if same else None, "reward_model")
    return ModelReward(rm) if same else RetokenizedReward(rm, Tokenizer(cfg.reward_model), tok, mistral_to_ultrarm)


# --------------------------------------------------------------------------- the loop the three steps share

def loop(cfg: Config, ctx: Dist, name: str, n: int, step_fn, trained: dict, tok, evaluate=None, lr_scale=None,
         gen=None, rl=False, show=()) -> dict:
    """Batches of --data, one update each (step_fn(batch indices, update) -> metrics row), evaluation every
    --eval_every steps and at the end, checkpoints every --save_every steps (with `gen`, the sampling RNG),
    the final export. RL runs also evaluate before training, keep the best sampled eval reward in
    <out_dir>/best (official) and stop at --target_kl. Returns the evaluations before and after."""
    out, model, gen = Path(cfg.out_dir), trained["model"][0], gen or torch.Generator().manual_seed(cfg.seed)
    run = run_identity(cfg) if cfg.save_every else None          # what each checkpoint records of this run
    total = cfg.max_steps or n // cfg.batch_size * cfg.epochs
    resumed = fsdp.load_checkpoint(out / "checkpoints", trained, gen, ctx) if cfg.resume else {"step": 0}
    start, best, bad, ev = resumed["step"], resumed.get("best", -math.inf), 0, None
    log_file, progress = metrics.Metrics(out / "metrics.jsonl", ctx, start), metrics.Progress(ctx, name, start, total)
    log(ctx, f"[{name}] {n} examples, {total} steps of {cfg.batch_size}" + (f", from step {start}" if start else ""))
    files = [] if name == "rm" else [p for p in [Path(cfg.policy) / "generation_config.json"] if p.is_file()]
    first = None
    if rl and start == 0:
        with progress.phase("evaluating before training"):
            first = evaluate()
        log_file.write({"step": 0, **{f"eval/{k}": v for k, v in first.items()}})
        log(ctx, f"[{name}] before: " + metrics.fmt(first))
    for step in range(start, total):
        t0, lr = time.perf_counter(), fsdp.cosine_lr(step, total, cfg.lr, cfg.warmup_steps)
        batch = data.batch_indices(n, cfg.batch_size, step, cfg.seed, ctx.rank, ctx.world)
        row = step_fn(batch, fsdp.make_update(ctx, lr, cfg.grad_clip, lr_scale))
        row.update(step=step + 1, lr=lr, skipped=row["grad_norm"] is None, seconds=time.perf_counter() - t0)
        bad = bad + 1 if row["skipped"] else 0
        if row["skipped"]:
            log(ctx, f"[{name}] step {step + 1}: non-finite reward, loss or grad norm (prompts "
                     f"{row.get('bad_prompts', '?')}), skipped ({bad} in a row)")
        progress.step(step + 1, row, show)
        if evaluate and ((step + 1) % max(1, cfg.eval_every or total) == 0 or step + 1 == total):
            with progress.phase(f"evaluating at step {step + 1}"):
                ev = evaluate()
            row.update({f"eval/{k}": v for k, v in ev.items()})
            log(ctx, f"[{name}] step {step + 1}: " + metrics.fmt(ev))
            if rl and ev["reward_sampled"] > best:               # official: the best sampled eval reward
                best = ev["reward_sampled"]
                fsdp.export(model, out / "best", ctx, tok, files)
        log_file.write(row)
        if rl and cfg.target_kl and "eval/kl_exact" in row and ev["kl_exact"] >= cfg.target_kl:
            log(ctx, f"[{name}] eval kl_exact {ev['kl_exact']:.3f} reached --target_kl {cfg.target_kl}: stopping")
            break
        if bad >= cfg.max_bad_steps:
            raise SystemExit(f"[{name}] {bad} consecutive non-finite steps (--max_bad_steps {cfg.max_bad_steps}): "
                             "stopping; check the data or the reward, and lower --lr")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            with progress.phase(f"saving the step-{step + 1} checkpoint"):
                fsdp.save_checkpoint(out / "checkpoints", trained, step + 1, gen, ctx, dict(best=best, run=run))
    fsdp.export(model, out / "final", ctx, tok, files)
    log_file.plot()
    log(ctx, f"[{name}] wrote {out / 'final'}{' and best' if rl else ''}, metrics {out / 'metrics.jsonl'}")
    return {"before": first, "after": ev if ev is not None or not evaluate else evaluate()}


# --------------------------------------------------------------------------- the built-in demo

DEMO_MODEL = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, max_seq_len=64,
                  bos_id=1, eos_id=2, pad_id=0)
# The demo's three stages (python train.py); `bench.py curves` reuses DEMO_COMMON and DEMO_REMAX.
DEMO_COMMON = dict(max_prompt_len=16, max_len=32, prompt_format="chat", weight_decay=0.0, eval_size=64)
# SFT must learn which letter comes next, or neither the RM made from it nor RL can tell right letters from wrong.
DEMO_SFT = dict(lr=4e-3, batch_size=64, epochs=3, warmup_steps=10)
DEMO_RM = dict(lr=2e-3, batch_size=64, epochs=2, warmup_steps=10)
DEMO_REMAX = dict(lr=2e-4, batch_size=32, max_steps=60, eval_every=20, max_new_tokens=12, top_p=1.0, beta=0.05,
                  gold="synthetic")


def demo(cfg: Config, ctx: Dist):
    """All three steps on the built-in task (data.synthetic_task), with a tiny model, on a CPU in minutes.

    The task: spell the prompt's letters in order. SFT imitates a sloppy demonstrator, the RM learns
    noisy preferences, and ReMax should raise both the RM's and the gold score of greedy answers.
    --lr, --max_steps, --preset, --baseline and --algo apply to step 3; --seed, --out_dir, --device to all.
    """
    root = Path(cfg.out_dir)
    files = {k: root / "data" / name for k, name in data.SYNTHETIC_FILES.items()}
    def prepare():                            # rank 0; if it fails, every rank ends (on_rank0), none waits
        data.write_synthetic_jsonl(root / "data", seed=cfg.seed)
        init = Transformer(ModelConfig(**DEMO_MODEL)).init_weights(generator=torch.Generator().manual_seed(cfg.seed))
        init.save_pretrained(root / "init", extra_files=Tokenizer(data.write_char_tokenizer(root / "tokenizer")).files())
    on_rank0(ctx, prepare)
    common = dict(seed=cfg.seed, device=cfg.device, **DEMO_COMMON)
    sft = train_sft(Config(stage="sft", policy=str(root / "init"), data=str(files["sft"]), out_dir=str(root / "sft"),
                           **DEMO_SFT, **common), ctx)
    rm = train_rm(Config(stage="rm", policy=str(sft), data=str(files["rm"]), out_dir=str(root / "rm"),
                         **DEMO_RM, **common), ctx)
    step3 = {**DEMO_REMAX, **{k: getattr(cfg, k) for k in ("lr", "max_steps", "preset", "baseline", "algo")
                              if getattr(cfg, k) != getattr(Config, k)}}
    if step3.get("preset") == "algorithm1":
        step3.pop("beta")                            # Algorithm 1 has no KL term
    result = train_remax(Config(stage="remax", policy=str(sft), reward_model=str(rm), data=str(files["remax"]),
                                eval_data=str(files["eval"]), out_dir=str(root / "remax"), **step3, **common), ctx)
    if ctx.rank == 0:
        tok, records = Tokenizer(sft), data.read_prompts(files["eval"])[:5]
        metrics.compare_answers({"SFT": sft, "ReMax": root / "remax" / "final"}, *data.left_pad(data.encode_prompts(
            tok, records, "chat", 16)[0], tok.pad_id), tok, [r["messages"][0]["content"] for r in records], data.gold_score, 12)
        print("\n            RM score (greedy)   gold score (greedy)   KL to SFT")
        for name, r in (("SFT", result["before"]), ("PPO" if cfg.algo == "ppo" else "ReMax", result["after"])):
            print(f"{name:12}{r['reward_greedy']:8.3f}          {r['gold_greedy']:8.3f}              {r['kl']:.3f}")
        print(f"\nmetrics: {root}/{{sft,rm,remax}}/metrics.jsonl; HF checkpoints: {root}/{{sft,rm,remax}}/final")
    return result


def main(argv=None):
    cfg = parse_args(argv)
    validate(cfg)
    cfg.out_dir = cfg.out_dir or f"out/{cfg.stage}"          # each stage its own: no stage writes over its input
    ctx = Dist(cfg.device)
    with metrics.one_line_errors(ctx, "train.py", "lower --batch_size or --max_new_tokens, add --activation_checkpointing, "
                              "or use more GPUs (FSDP shards weights and optimizer state)",
                                 lambda: metrics.resume_hint(Path(cfg.out_dir) / "checkpoints", ctx, cfg.stage != "demo")):
        if cfg.stage != "demo":
            ctx.split(cfg.batch_size)                   # before any model is read, not at the first step
        {"demo": demo, "sft": train_sft, "rm": train_rm, "remax": train_remax}[cfg.stage](cfg, ctx)


if __name__ == "__main__":
    metrics.run_main(main)
