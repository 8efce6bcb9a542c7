"""SFT -> reward model -> ReMax: the paper's three steps, one process or torchrun, under FSDP2.

    python train.py                                    # built-in demo: all three steps, tiny model, CPU
    torchrun --nproc_per_node=8 train.py --stage remax --policy out/sft/final \\
        --reward_model out/rm/final --data prompts.jsonl --preset official

`train_remax` reads like Algorithm 1: rollout of the sampled and greedy responses (lines 3-4), their
rewards (line 5), the policy's log-probs (line 6), the loss and one optimizer step (line 7).
Every run prints its config, writes it to <out_dir>/config.json and logs <out_dir>/metrics.jsonl.
"""
import argparse
import json
import math
import os
import pickle
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import data
import ppo
import remax
from model import ModelConfig, Tokenizer, Transformer, generate, positions_from_mask, read_config, read_json, response_logprobs
from reward import ModelReward, RetokenizedReward, RewardModel, bradley_terry_loss, mistral_to_ultrarm


@dataclass
class Config:
    stage: str = "demo"            # demo (all three on the built-in task) | sft | rm | remax
    algo: str = "remax"            # remax | ppo (the paper's comparison, ppo.py; stage remax only)
    critic: str = ""               # ppo: critic init (RM folder); default --reward_model, as DS-Chat
    critic_lr: float = 5e-6        # ppo: the critic's peak learning rate (same schedule as --lr)
    example: str = ""              # smollm2-sentiment: ReMax on a real pretrained model with a VADER reward (README)
    policy: str = ""               # HF folder: model to fine-tune (sft), to initialise the RM from (rm), SFT policy (remax)
    reward_model: str = ""         # HF *ForSequenceClassification folder (remax)
    reward_format: str = "same"    # same: the RM reads the policy's tokens (official) | ultrarm: decode, re-template
                                   # as "Human: ..\nAssistant: ..", re-encode with the RM's tokenizer (Mistral + UltraRM)
    tokenizer: str = ""            # HF folder with tokenizer.json; default: --policy
    data: str = ""                 # JSONL: SFT pairs (sft) | preference pairs (rm) | prompts (remax)
    eval_data: str = ""            # JSONL held out for evaluation; default: the last eval_size records of --data
    split: str = ""                # sft | rm | remax: that part of the paper's 20/40/40 split of --data ("" = all)
    data_seed: int = 1234          # the split's shuffle (official)
    eval_size: int = 64
    prompt_format: str = "auto"    # auto (chat template if the tokenizer has one, else hh) | chat | hh | plain
    out_dir: str = "out/run"
    # ReMax (remax.py); None = the preset's value
    preset: str = "official"       # official (the released scripts) | algorithm1 (the paper's Algorithm 1 verbatim)
    baseline: str = "greedy"       # greedy (ReMax) | none (REINFORCE) | rloo (second sample, RLOO-2)
    kl: str | None = None
    beta: float | None = None
    gamma: float | None = None
    clip: float | None = None
    norm: str | None = None
    temperature: float = 1.0
    top_p: float | None = None     # None = the preset's: official 0.9, algorithm1 1.0 (unbiased only at 1)
    top_k: int = 0
    max_prompt_len: int = 256
    overlong: str = "truncate"     # a prompt over max_prompt_len: truncate (keep its last tokens, as official) | error
    max_new_tokens: int = 256
    max_len: int = 512             # sft / rm: prompt + response tokens
    # optimisation (defaults: the official Llama-2-7B ReMax script)
    lr: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 0
    grad_clip: float = 1.0
    batch_size: int = 8            # global: prompts (remax), pairs (rm), examples (sft) per optimizer step
    epochs: int = 1
    max_steps: int = 0             # 0 = as many as `epochs` gives
    dtype: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    activation_checkpointing: bool = False
    eval_every: int = 0            # 0 = only before and after training
    gold: str = ""                 # synthetic: also score held-out greedy answers with the built-in task's gold score
    target_kl: float = 0.0         # stop once eval kl_exact (per-token) reaches it (official 1.0); 0 = never
    save_every: int = 0            # 0 = no periodic checkpoints (the final export is always written)
    resume: bool = False
    max_bad_steps: int = 5         # consecutive non-finite steps tolerated before stopping
    seed: int = 2023
    device: str = "auto"


def parse_args(argv=None, **defaults) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    base = Config(**defaults)
    for f in fields(Config):
        v = getattr(base, f.name)
        if f.type is bool or isinstance(v, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=v)
        else:
            kind = {int: int, float: float, str: str}.get(type(v)) or (float if f.name in ("beta", "gamma", "clip", "top_p") else str)
            p.add_argument(f"--{f.name}", type=kind, default=v)
    return Config(**vars(p.parse_args(argv)))


class Dist:
    """Rank, world and device. A plain `python train.py` is a world of one: the same FSDP code path."""

    def __init__(self, device: str = "auto"):
        single = "RANK" not in os.environ
        cuda = torch.cuda.is_available() and device != "cpu"
        self.rank, self.world = (0, 1) if single else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        self.device = torch.device(f"cuda:{0 if single else os.environ['LOCAL_RANK']}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            # One process needs no rendezvous: an in-memory store, so no port to pick and no TCP server thread.
            store = dict(store=dist.HashStore(), rank=0, world_size=1) if single else {}
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None, **store)
        self.mesh = init_device_mesh(self.device.type, (self.world,))

    def split(self, global_batch: int) -> slice:
        if global_batch % self.world:
            raise ValueError(f"--batch_size {global_batch} must be divisible by the world size {self.world}")
        b = global_batch // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def mean(self, values: dict) -> dict:
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def sum(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def max(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()


def log(ctx: Dist, *args):
    if ctx.rank == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------- FSDP2 models

def compute_dtype(cfg: Config, ctx: Dist) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def shard(model, blocks, cfg: Config, ctx: Dist, trainable: bool):
    """fully_shard each transformer block, then the root (torchtitan's recipe).

    Trainable: fp32 master weights, bf16 compute on GPU, fp32 gradient reduction. Frozen models
    (reference policy, reward model) already hold the compute dtype and need no policy.
    """
    dtype = compute_dtype(cfg, ctx)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if trainable and dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=ctx.mesh, mp_policy=mp)
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    return model


def load_model(path, cfg: Config, ctx: Dist, trainable: bool, cls=Transformer):
    """Build on the meta device, shard, then rank 0 reads the checkpoint and broadcasts the shards.

    Only rank 0 holds a full copy (in host memory), so 8 ranks need not 8x the host memory.
    """
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = cls(config)
    backbone = model.model if isinstance(model, RewardModel) else model
    state = on_rank0(ctx, lambda: cls.from_pretrained(path).state_dict()) or {}
    dtype = torch.float32 if trainable else compute_dtype(cfg, ctx)
    model.to(dtype)
    shard(model, backbone.layers, cfg, ctx, trainable)
    model.to_empty(device=ctx.device)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    backbone.reset_rope()
    backbone.activation_checkpointing = trainable and cfg.activation_checkpointing
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def export(model, path, ctx: Dist, tokenizer: Tokenizer | None = None):
    """Gather the full weights (all ranks take part) and let rank 0 write a transformers-loadable folder."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if model.config.pad_id is None and tokenizer and tokenizer.pad_id not in (None, tokenizer.eos_id):
        # transformers' *ForSequenceClassification scores batches only with a pad id, at the last non-pad
        # token: the tokenizer's own pad is safe there (an EOS used as pad would move the score off the EOS).
        model.config.pad_id = tokenizer.pad_id
    on_rank0(ctx, lambda: model.save_pretrained(path, state_dict=state,
                                                extra_files=tokenizer.files() if tokenizer else ()))


@contextmanager
def gathered(model):
    """Keep the policy's parameters unsharded for a whole rollout.

    Decoding runs one forward per token; letting FSDP all-gather every block for every token would
    dominate generation time. This is the role DeepSpeed's hybrid engine plays in the official code.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# --------------------------------------------------------------------------- optimisation

def make_optimizer(model, cfg: Config):
    # No weight decay on norms (1-D), as the official code's get_optimizer_grouped_parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True)


def lr_at(step: int, cfg: Config, total: int) -> float:
    """Linear warmup, then cosine decay to 0 over the run (the official scripts: cosine, no warmup)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_step(model, opt, cfg: Config, lr: float) -> float | None:
    """Clip the global gradient norm (over all shards) and step; None and no step if it is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
    if not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return None
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# --------------------------------------------------------------------------- checkpoints and metrics

def _train_state(trained: dict, gen: torch.Generator) -> dict:
    state = {"rng": gen.get_state()}
    for name, (model, opt) in trained.items():
        state[name], state[f"{name}_optim"] = get_state_dict(model, opt)
    return state


def save_checkpoint(trained: dict, step: int, gen: torch.Generator, cfg: Config, ctx: Dist, best=None):
    """DCP checkpoint of {name: (model, optimizer)} and the sampling RNG, written to a temp folder and
    renamed, then `latest` updated: a kill at any moment leaves the previous checkpoint loadable. Only
    then are checkpoints older than the newest two removed."""
    root = Path(cfg.out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
    on_rank0(ctx, lambda: shutil.rmtree(tmp, ignore_errors=True))        # left by a run killed mid-save
    dcp.save(_train_state(trained, gen), checkpoint_id=str(tmp))
    dist.barrier()

    def publish():
        (tmp / "meta.json").write_text(json.dumps({"step": step, "best": best, "config": asdict(cfg)}))
        shutil.rmtree(final, ignore_errors=True)         # a stale copy from a run that died after this step
        os.replace(tmp, final)
        atomic_write(root / "latest", final.name)
        for old in sorted(root.glob("step_*"))[:-2]:     # the newest two: a 7B run's states are ~84 GB each
            shutil.rmtree(old, ignore_errors=True)
    on_rank0(ctx, publish)


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP .metadata file holds; anything else in it is refused, not executed."""

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
                ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("collections", "OrderedDict")) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds")


class SafeReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint unpickles its .metadata with plain pickle and non-tensor entries with
    torch.load(weights_only=False); check both with restricted unpicklers first, so that resuming from a
    tampered checkpoint fails instead of running code. Tensors are already read with weights_only=True."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            _MetadataUnpickler(f).load()
        return super().read_metadata(*args, **kwargs)


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)          # raises on anything but plain data (step counts, lrs)
        value.seek(0)
        super().load_bytes(read_item, value)


def load_checkpoint(trained: dict, gen: torch.Generator, cfg: Config, ctx: Dist) -> dict:
    """Restore the newest complete checkpoint; returns its meta.json ({"step": 0} if none): the step to
    continue from and the best eval reward so far.

    Complete = renamed from its temp folder (meta.json is written before the rename), so even a kill
    between the rename and the `latest` update resumes from the newest one.
    """
    root = Path(cfg.out_dir) / "checkpoints"
    done = sorted(root.glob("step_*/meta.json"))
    if not done:
        log(ctx, f"[resume] no checkpoint under {root}: starting at step 0")
        return {"step": 0}
    path = done[-1].parent
    state = _train_state(trained, gen)
    dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
    for name, (model, opt) in trained.items():
        set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
    gen.set_state(state["rng"])
    meta = json.loads((path / "meta.json").read_text())
    log(ctx, f"[resume] from {path}: continuing after step {meta['step']}")
    return meta


def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_or_none(line: str):
    try:                                   # a kill mid-write leaves at most one partial last line
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Metrics:
    """One JSON line per step (rank 0); on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, ctx: Dist, start_step: int = 0):
        self.path, self.on = path, ctx.rank == 0
        if self.on and path.exists():
            # Row k is logged after step k; a fresh run (start 0) starts the file anew.
            keep = [l for l in map(_json_or_none, path.read_text().splitlines()) if l and 0 < start_step >= l["step"]]
            keep = [json.dumps(l) for l in keep]
            atomic_write(path, "".join(l + "\n" for l in keep))

    def write(self, row: dict):
        if self.on:             # NaN / inf (a skipped step) as null: bare NaN is not JSON outside Python
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")


class Rank0Failed(Exception):
    """Raised on the other ranks when rank 0 failed in on_rank0; rank 0 reports the cause itself."""


def on_rank0(ctx: Dist, fn):
    """fn() on rank 0 only; if it fails every rank raises, so no rank is left waiting in a collective."""
    result, error = None, None
    if ctx.rank == 0:
        try:
            result = fn()
        except Exception as e:          # any failure: the other ranks must not wait in a collective forever
            error = e
    if ctx.sum(float(error is not None)):
        raise error or Rank0Failed("rank 0 failed (its message is above)")
    return result


def start_run(cfg: Config, ctx: Dist) -> Path:
    out = Path(cfg.out_dir)

    def write_config():
        if not cfg.resume and any((out / "checkpoints").glob("step_*")):
            # A later --resume would otherwise pick up whichever run's checkpoint has the highest step.
            raise ValueError(f"--out_dir {out}: holds checkpoints of an earlier run; add --resume to continue "
                             "it, or use another --out_dir")
        if cfg.resume and (out / "config.json").is_file():
            # The earlier rows of metrics.jsonl were made under the old config.json, which is replaced now.
            old = _json_or_none((out / "config.json").read_text()) or {}
            changed = [f"--{k} {old[k]} -> {v}" for k, v in asdict(cfg).items() if k != "resume" and k in old and old[k] != v]
            if changed:
                print(f"[resume] flags changed since the earlier run: {', '.join(changed)}", flush=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        except OSError as e:
            raise OSError(f"--out_dir {out}: not writable ({e.strerror})") from None
        print(f"[{cfg.stage}] world={ctx.world} device={ctx.device} config:\n{json.dumps(asdict(cfg), indent=1)}", flush=True)
    on_rank0(ctx, write_config)
    return out


# --------------------------------------------------------------------------- step 3: ReMax

def remax_options(cfg: Config) -> dict:
    """The preset's remax_loss options with the flags given on top. A preset's beta belongs to its own KL
    mode: --kl none drops it, and a KL mode with no beta (--preset algorithm1 has 0) asks for --beta."""
    opts = dict(remax.OFFICIAL if cfg.preset == "official" else remax.ALGORITHM_1)
    for k in ("kl", "beta", "gamma", "clip", "norm"):
        if getattr(cfg, k) is not None:
            opts[k] = getattr(cfg, k)
    if cfg.kl == "none" and cfg.beta is None:
        opts["beta"] = 0.0
    if opts["kl"] == "none" and opts["beta"]:
        raise ValueError(f"--beta {opts['beta']} has no effect with --kl none: add --kl k1_onestep or k1_to_go, "
                         "or drop --beta")
    if opts["kl"] != "none" and not opts["beta"]:
        raise ValueError(f"--kl {opts['kl']} with beta 0 (--preset {cfg.preset}) is no penalty: add --beta, "
                         "e.g. 0.05 (official), or use --kl none")
    return opts


def sampling_top_p(cfg: Config) -> float:
    return cfg.top_p if cfg.top_p is not None else (0.9 if cfg.preset == "official" else 1.0)


def train_remax(cfg: Config, ctx: Dist, gold=None, reward_fn=None) -> dict:
    """Algorithm 1 under FSDP2: one optimizer step per freshly generated batch (on-policy, as official).

    reward_fn: any callable (prompt, prompt_mask, response, response_mask) -> [B] rewards (reward.py);
    default: the reward model at --reward_model. gold: an optional (prompt, response) -> float evaluated
    on greedy responses of held-out prompts (the built-in task's programmatic score).
    """
    out = start_run(cfg, ctx)
    gold = data.gold_score if cfg.gold == "synthetic" else gold
    tok = Tokenizer(cfg.tokenizer or cfg.policy)
    check_stop(tok, cfg.policy, "policy")
    train_prompts, eval_prompts = load_prompts(cfg, tok, ctx)
    if reward_fn is None and cfg.reward_format == "ultrarm":     # every prompt now, before any model is read
        for text in tok.decode_batch(train_prompts + eval_prompts):
            mistral_to_ultrarm(text, "")
    policy = load_model(cfg.policy, cfg, ctx, trainable=True)
    check_vocab(tok, policy, "policy")
    ref = load_model(cfg.policy, cfg, ctx, trainable=False)      # pi_ref: the frozen SFT init
    if reward_fn is None:
        rm = load_model(cfg.reward_model, cfg, ctx, trainable=False, cls=RewardModel)
        if cfg.reward_format == "same":
            check_vocab(tok, rm, "reward_model")
        reward_fn = ModelReward(rm) if cfg.reward_format == "same" else \
            RetokenizedReward(rm, Tokenizer(cfg.reward_model), tok, mistral_to_ultrarm)
    opt = make_optimizer(policy, cfg)
    trained = {"model": (policy, opt)}
    if cfg.algo == "ppo":                     # the paper's comparison: a critic initialised from the RM
        critic = load_model(cfg.critic or cfg.reward_model, cfg, ctx, trainable=True, cls=ppo.Critic)
        check_vocab(tok, critic, "critic" if cfg.critic else "reward_model")
        trained["critic"] = (critic, make_optimizer(critic, cfg))
    gen = torch.Generator(ctx.device).manual_seed(cfg.seed)
    opts = remax_options(cfg) if cfg.algo == "remax" else None
    steps_per_epoch = len(train_prompts) // cfg.batch_size
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    if steps_per_epoch == 0:
        raise ValueError(f"--data {cfg.data}: {len(train_prompts)} prompts{held_out(cfg)} are fewer than one batch "
                         f"(--batch_size {cfg.batch_size})")
    resumed = load_checkpoint(trained, gen, cfg, ctx) if cfg.resume else {"step": 0}
    start = resumed["step"]
    metrics = Metrics(out / "metrics.jsonl", ctx, start)
    log(ctx, f"[{cfg.algo}] {len(train_prompts)} prompts, {total} steps of {cfg.batch_size}, "
             + (f"options {opts}" if cfg.algo == "remax" else f"kl_ctl {ppo_kl(cfg)}, critic_lr {cfg.critic_lr}"))
    evaluate = lambda: eval_policy(policy, ref, reward_fn, eval_prompts, tok, cfg, ctx, gold)
    first = evaluate() if start == 0 else None
    if first:
        metrics.write({"step": 0, **{f"eval/{k}": v for k, v in first.items()}})
        log(ctx, f"[{cfg.algo}] before: " + fmt(first))
    best, bad, ev = resumed.get("best", -math.inf), 0, None
    local = ctx.split(cfg.batch_size)
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, total)
        idx = data.batch_indices(len(train_prompts), cfg.batch_size, step, cfg.seed, ctx.rank, ctx.world)
        prompt, prompt_mask = data.left_pad([train_prompts[i] for i in idx], tok_pad(tok), ctx.device)
        with gathered(policy):                                                  # Algorithm 1 lines 3-5
            ro = remax.rollout(policy, prompt, prompt_mask, reward_fn,
                               baseline="none" if cfg.algo == "ppo" else cfg.baseline,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=sampling_top_p(cfg),
                               top_k=cfg.top_k, pad_id=tok_pad(tok), generator=gen, row_offset=local.start,
                               total_rows=cfg.batch_size)
        t_gen = time.perf_counter() - t0
        # token_mean is over the *global* batch: rescale each rank's local mean so that FSDP's gradient
        # average equals one process with the whole batch, whatever the world size. The official code
        # (DeepSpeed) averages each GPU's own token mean instead; the two agree on one GPU and whenever
        # every rank holds as many response tokens, and only ours is independent of the GPU count.
        n_local = ro.response_mask.sum().item()
        scale = n_local * ctx.world / max(1.0, ctx.sum(n_local))

        def update(model, optimizer, loss, scale=scale):
            if ctx.sum(0.0 if torch.isfinite(loss) else 1.0):               # every rank skips together
                model.zero_grad(set_to_none=True)
                return None
            (loss * scale).backward()
            return optimizer_step(model, optimizer, cfg, lr * (cfg.critic_lr / cfg.lr if model is not policy else 1))

        finite = torch.isfinite(ro.reward) & torch.isfinite(ro.baseline)
        if ctx.sum(float((~finite).sum())):                                     # a NaN/inf reward: skip the step
            stats, grad_norm = {}, None
        elif cfg.algo == "ppo":
            critic, opt_critic = trained["critic"]
            stats = ppo.ppo_step(policy, critic, ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask,
                                 ro.reward, opt_policy=opt, opt_critic=opt_critic, update=update, kl_ctl=ppo_kl(cfg))
            grad_norm = stats.pop("grad_norm")
            stats.update(loss=stats["loss"] * scale, value_loss=stats["value_loss"] * scale)   # global token means
            stats["critic_grad_norm"] = float("nan") if stats["critic_grad_norm"] is None else stats["critic_grad_norm"]
        else:
            with torch.no_grad():
                ref_logp, _ = response_logprobs(ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
            logp, entropy = response_logprobs(policy, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)  # line 6
            # pi_old = pi_theta: one step per batch, no dropout, so the sampling-time log-probs are these.
            loss, stats = remax.remax_loss(logp, logp.detach(), ref_logp, ro.reward, ro.baseline, ro.response_mask, **opts)
            s = scale if opts["norm"] == "token_mean" else 1.0
            grad_norm = update(policy, opt, loss, s)                                                # line 7
            stats.update(loss=loss.item() * s, entropy=masked_mean(entropy, ro.response_mask))
        bad = bad + 1 if grad_norm is None else 0
        row = {**stats, **ro.stats, "grad_norm": grad_norm, "lr": lr, "skipped": grad_norm is None}
        row = {**ctx.mean({k: float("nan") if v is None else float(v) for k, v in row.items()}), "step": step + 1,
               "skipped": grad_norm is None}
        if grad_norm is None:
            row["bad_prompts"] = bad_prompts(~finite, len(train_prompts), step, cfg, ctx)
            log(ctx, f"[{cfg.algo}] step {step + 1}: non-finite reward/loss/grad norm (prompts {row['bad_prompts']}), "
                     f"step skipped ({bad} in a row)")
        dt = time.perf_counter() - t0
        row.update(t_gen=t_gen, t_train=dt - t_gen, tokens_per_s=ctx.sum(n_local) / dt, peak_mem_gb=peak_memory_gb(ctx))
        if (step + 1) % max(1, cfg.eval_every or total) == 0 or step + 1 == total:
            ev = evaluate()
            row.update({f"eval/{k}": v for k, v in ev.items()})
            log(ctx, f"[{cfg.algo}] step {step + 1}: " + fmt(ev))
            if ev["reward_sampled"] > best:                # official: the best sampled eval reward
                best = ev["reward_sampled"]
                export(policy, out / "best", ctx, tok)
            if cfg.target_kl and ev["kl_exact"] >= cfg.target_kl:
                log(ctx, f"[{cfg.algo}] eval kl_exact {ev['kl_exact']:.3f} reached --target_kl {cfg.target_kl}: stopping")
                metrics.write(row)
                break
        metrics.write(row)
        if step % 10 == 0 or step + 1 == total:
            log(ctx, f"[{cfg.algo}] step {step + 1}/{total} loss {row.get('loss', math.nan):.4f} reward "
                     f"{row.get('reward_mean', math.nan):.3f} baseline {row.get('baseline_mean', 0):.3f} "
                     f"kl {row.get('kl', math.nan):.4f} {dt:.2f}s")
        if bad >= cfg.max_bad_steps:
            raise SystemExit(f"[{cfg.algo}] {bad} consecutive non-finite steps (--max_bad_steps {cfg.max_bad_steps}): "
                             "stopping; check the reward function and lower --lr")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(trained, step + 1, gen, cfg, ctx, best)
    export(policy, out / "final", ctx, tok)
    if ctx.rank == 0:
        plot_metrics(out / "metrics.jsonl")
    log(ctx, f"[{cfg.algo}] wrote {out / 'final'} (best eval: {out / 'best'}), metrics {out / 'metrics.jsonl'}")
    # The loop's last step always evaluated (at total, or where --target_kl stopped it): that is the final policy.
    return {"before": first, "after": ev if ev is not None else evaluate()}


def ppo_kl(cfg: Config) -> float:
    return 0.1 if cfg.beta is None else cfg.beta                 # DS-Chat's kl_ctl


def bad_prompts(bad_rows, n: int, step: int, cfg: Config, ctx: Dist) -> list[int]:
    """Indices into --data of the prompts whose rollout had a non-finite reward, over all ranks."""
    flags = torch.zeros(cfg.batch_size, device=ctx.device)
    B = flags.shape[0] // ctx.world
    flags[ctx.rank * B:(ctx.rank + 1) * B] = bad_rows.view(-1, B).any(0).float()   # rloo: 2 rows per prompt
    dist.all_reduce(flags)
    batch = data.batch_indices(n, cfg.batch_size, step, cfg.seed)             # the global batch, ranks joined
    return [int(i) for i in batch[flags.cpu() > 0]]


@torch.no_grad()
def eval_policy(policy, ref, reward_fn, prompts, tok, cfg: Config, ctx: Dist, gold=None) -> dict:
    """Reward of greedy and sampled responses on held-out prompts, and the sampled responses' KL to pi_ref:
    kl, the sequence estimate sum_t k1_t; kl_exact, the official metric (the exact KL over the vocabulary
    at each response token, averaged over tokens)."""
    n = len(prompts) - len(prompts) % ctx.world
    mine = prompts[ctx.rank * (n // ctx.world):(ctx.rank + 1) * (n // ctx.world)]
    prompt, mask = data.left_pad(mine, tok_pad(tok), ctx.device)
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    B = len(mine)
    with gathered(policy):
        resp, rmask = generate(policy, prompt, mask, cfg.max_new_tokens, n=2, generator=g,
                               top_p=sampling_top_p(cfg), top_k=cfg.top_k,
                               temperature=torch.tensor([cfg.temperature] * B + [0.0] * B), pad_id=tok_pad(tok),
                               row_offset=ctx.rank * B, total_rows=n)
    both_p, both_m = prompt.repeat(2, 1), mask.repeat(2, 1)
    r = reward_fn(both_p, both_m, resp, rmask)
    logp, _ = response_logprobs(policy, prompt, mask, resp[:B], rmask[:B])
    ref_logp, _ = response_logprobs(ref, prompt, mask, resp[:B], rmask[:B])
    kl = ((logp - ref_logp) * rmask[:B]).sum(-1)           # sequence KL estimate (k1), summed over tokens
    stats = {"reward_sampled": r[:B].mean().item(), "reward_greedy": r[B:].mean().item(),
             "kl": kl.mean().item(), "length_greedy": rmask[B:].sum(-1).float().mean().item()}
    if gold is not None:
        texts = tok.decode_batch(p[m].tolist() for p, m in zip(prompt, mask))
        greedy = tok.decode_batch(x[m].tolist() for x, m in zip(resp[B:], rmask[B:]))
        stats["gold_greedy"] = sum(gold(p, a) for p, a in zip(texts, greedy)) / B
    stats = ctx.mean(stats)
    stats["kl_exact"] = exact_kl_over_ranks(policy, ref, prompt, mask, resp[:B], rmask[:B], ctx)
    return stats


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


def plot_metrics(path: Path, keys=("reward_mean", "baseline_mean", "kl", "eval/reward_greedy", "eval/kl")):
    """metrics.png next to metrics.jsonl: reward and KL against steps, when matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in map(_json_or_none, path.read_text().splitlines()) if r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            axes[int("kl" in k)].plot(*zip(*pts), label=k, marker="." if k.startswith("eval/") else None)
    for ax, title in zip(axes, ("reward", "KL to the reference")):
        ax.set(title=title, xlabel="step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    plt.close(fig)


def masked_mean(x, mask) -> float:
    return ((x * mask).sum() / mask.sum().clamp_min(1)).item()


def peak_memory_gb(ctx: Dist) -> float:
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.3f}" for k, v in d.items())


def check_vocab(tok: Tokenizer, model, flag: str):
    """Token ids past the embedding would be a device-side assert on GPU, not an error message."""
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"--{flag}: the model has {model.config.vocab_size} embeddings but the tokenizer "
                         f"{tok.vocab_size} tokens; use the matching --tokenizer (or --reward_format ultrarm "
                         "for a reward model with its own tokenizer)")


def check_stop(tok: Tokenizer, path, flag: str):
    """SFT ends every response with the tokenizer's EOS; generation stops on the checkpoint's eos_token_id(s)."""
    stop_ids = read_config(path).stop_ids
    if tok.eos_id is not None and tok.eos_id not in stop_ids:
        raise ValueError(f"--{flag} {path}: the tokenizer's eos token {tok.eos_id} is not among the model's stop ids "
                         f"{stop_ids} (eos_token_id in config.json / generation_config.json): "
                         "responses trained to end with it would never stop generation")


def tok_pad(tok: Tokenizer) -> int:
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


SPLITS = ("sft", "rm", "remax")


def read_data(cfg: Config, reader) -> list[dict]:
    """--data through `reader`; with --split, only that part of the paper's 2:4:4 split (the same rows
    for all three stages, so SFT, RM and RL data never overlap, as in the official data_split 2,4,4)."""
    records = reader(cfg.data)
    return data.split_records(records, (2, 4, 4), cfg.data_seed)[SPLITS.index(cfg.split)] if cfg.split else records


def load_prompts(cfg: Config, tok: Tokenizer, ctx: Dist):
    """Step-3 prompts x ~ rho (token ids), and the held-out evaluation prompts."""
    records = read_data(cfg, data.read_prompts)
    held = data.read_prompts(cfg.eval_data) if cfg.eval_data else records[-cfg.eval_size:]
    if not cfg.eval_data:
        records = records[:-cfg.eval_size]
    train, counts = data.encode_prompts(tok, records, cfg.prompt_format, cfg.max_prompt_len, cfg.overlong)
    held, _ = data.encode_prompts(tok, held[:cfg.eval_size], cfg.prompt_format, cfg.max_prompt_len, cfg.overlong)
    if len(held) < ctx.world:
        raise ValueError(f"--eval_data/--eval_size: {len(held)} evaluation prompts for {ctx.world} ranks; "
                         "expected at least one per rank")
    log(ctx, f"[data] {cfg.data}: {len(train)} train / {len(held)} eval prompts (--eval_size {cfg.eval_size}), "
             f"{counts['prompts_truncated']} truncated to their last {cfg.max_prompt_len} tokens, "
             f"{len(train) % cfg.batch_size} left out per epoch"
             + (f"; {len(held) % ctx.world} eval prompts left out (not divisible by {ctx.world} ranks)"
                if len(held) % ctx.world else ""))
    return train, held


# --------------------------------------------------------------------------- steps 1 and 2: SFT and reward model

def held_out(cfg: Config) -> str:
    return "" if cfg.eval_data else f" left after holding out --eval_size {cfg.eval_size} for evaluation"


def fit(cfg: Config, ctx: Dist, model, examples: list, loss_fn, name: str, eval_fn=None) -> Path:
    """The supervised loop both SFT and RM training use: shuffle, shard, loss, clip, AdamW, cosine."""
    out = Path(cfg.out_dir)
    if len(examples) < cfg.batch_size:
        raise ValueError(f"--data {cfg.data}: {len(examples)} {name} examples{held_out(cfg) if eval_fn else ''} "
                         f"are fewer than one batch (--batch_size {cfg.batch_size})")
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.max_steps or data.steps_per_epoch(len(examples), cfg.batch_size) * cfg.epochs
    start = load_checkpoint({"model": (model, opt)}, gen, cfg, ctx)["step"] if cfg.resume else 0
    metrics = Metrics(out / "metrics.jsonl", ctx, start)
    ctx.split(cfg.batch_size)
    log(ctx, f"[{name}] {len(examples)} examples, {total} steps of {cfg.batch_size}")
    bad = 0
    for step in range(start, total):
        t0 = time.perf_counter()
        idx = data.batch_indices(len(examples), cfg.batch_size, step, cfg.seed, ctx.rank, ctx.world)
        loss, stats = loss_fn(model, [examples[i] for i in idx])
        lr = lr_at(step, cfg, total)
        if not ctx.sum(0.0 if torch.isfinite(loss) else 1.0):      # every rank skips together
            loss.backward()
            grad_norm = optimizer_step(model, opt, cfg, lr)
        else:
            model.zero_grad(set_to_none=True)
            grad_norm = None
        bad = bad + 1 if grad_norm is None else 0
        if bad >= cfg.max_bad_steps:
            raise SystemExit(f"[{name}] {bad} consecutive non-finite steps (--max_bad_steps {cfg.max_bad_steps}): stopping")
        row = ctx.mean({"loss": loss.item(), **stats})
        row.update(step=step + 1, lr=lr, grad_norm=grad_norm, skipped=grad_norm is None, seconds=time.perf_counter() - t0)
        if eval_fn and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total):
            row.update({f"eval/{k}": v for k, v in eval_fn(model).items()})
        metrics.write(row)
        if step % 20 == 0 or step + 1 == total:
            log(ctx, f"[{name}] step {step + 1}/{total} " + fmt({k: v for k, v in row.items()
                                                                 if isinstance(v, float) and k != "seconds"}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint({"model": (model, opt)}, step + 1, gen, cfg, ctx)
    return out


def train_sft(cfg: Config, ctx: Dist) -> Path:
    """Step 1: maximise log pi(response | prompt) on demonstrations (loss on response tokens and EOS only)."""
    out = start_run(cfg, ctx)
    tok = Tokenizer(cfg.tokenizer or cfg.policy)
    check_stop(tok, cfg.policy, "policy")
    examples, counts = data.encode_sft(tok, read_data(cfg, data.read_sft), cfg.prompt_format, cfg.max_prompt_len,
                                       cfg.max_len - cfg.max_prompt_len, cfg.overlong)
    log(ctx, f"[data] {cfg.data}: {len(examples)} SFT pairs, {counts}")
    model = load_model(cfg.policy, cfg, ctx, trainable=True)
    check_vocab(tok, model, "policy")

    def loss_fn(model, batch):
        tokens, mask, loss_mask = data.sft_batch(batch, tok_pad(tok), ctx.device)
        targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
        logp, _ = model(tokens, mask=mask, targets=targets)
        m = loss_mask[:, 1:]
        n = m.sum().item()
        # Token mean over the global batch, whatever the world size (see train_remax).
        return -(logp[:, :-1] * m).sum() * ctx.world / ctx.sum(n), {"tokens": float(n)}
    fit(cfg, ctx, model, examples, loss_fn, "sft")
    export(model, out / "final", ctx, tok)
    log(ctx, f"[sft] wrote {out / 'final'}")
    return out / "final"


def train_rm(cfg: Config, ctx: Dist) -> Path:
    """Step 2: a reward model initialised from --policy, trained with the Bradley-Terry loss on preference pairs."""
    out = start_run(cfg, ctx)
    tok = Tokenizer(cfg.tokenizer or cfg.policy)
    records = read_data(cfg, data.read_preferences)
    held = data.read_preferences(cfg.eval_data)[:cfg.eval_size] if cfg.eval_data else records[-cfg.eval_size:]
    records = records if cfg.eval_data else records[:-cfg.eval_size]
    enc = lambda r: data.encode_preferences(tok, r, cfg.prompt_format, cfg.max_prompt_len, cfg.max_len - cfg.max_prompt_len,
                                            cfg.overlong)
    (examples, counts), (held, _) = enc(records), enc(held)
    log(ctx, f"[data] {cfg.data}: {len(examples)} train / {len(held)} eval pairs, {counts}")
    if len(held) < ctx.world:
        raise ValueError(f"--eval_data/--eval_size: {len(held)} evaluation pairs for {ctx.world} ranks; "
                         "expected at least one per rank")
    # The paper's step 2 starts the RM from the SFT model: written once as an RM folder, then loaded sharded.
    on_rank0(ctx, lambda: RewardModel.init_from_policy(Transformer.from_pretrained(cfg.policy)).save_pretrained(out / "init"))
    model = load_model(out / "init", cfg, ctx, trainable=True, cls=RewardModel)
    on_rank0(ctx, lambda: shutil.rmtree(out / "init"))            # read: a full fp32 copy (~28 GB at 7B) no longer needed
    check_vocab(tok, model, "policy")

    def loss_fn(model, batch):
        tokens, mask = data.preference_batch(batch, tok_pad(tok), ctx.device)
        r = model(tokens, mask)
        loss, acc = bradley_terry_loss(r[:len(batch)], r[len(batch):])
        return loss, {"accuracy": acc.item(), "reward_chosen": r[:len(batch)].mean().item(),
                      "reward_rejected": r[len(batch):].mean().item()}

    @torch.no_grad()
    def eval_fn(model):
        n = len(held) - len(held) % ctx.world
        _, stats = loss_fn(model, held[ctx.rank * (n // ctx.world):(ctx.rank + 1) * (n // ctx.world)])
        return ctx.mean({"accuracy": stats["accuracy"]})
    fit(cfg, ctx, model, examples, loss_fn, "rm", eval_fn)
    export(model, out / "final", ctx, tok)
    log(ctx, f"[rm] wrote {out / 'final'}")
    return out / "final"


# --------------------------------------------------------------------------- the built-in demo

DEMO_MODEL = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, max_seq_len=64,
                  bos_id=1, eos_id=2, pad_id=0)
# The demo's three stages (python train.py); `bench.py curves` reuses DEMO_COMMON and DEMO_REMAX.
DEMO_COMMON = dict(max_prompt_len=16, max_len=32, prompt_format="chat", weight_decay=0.0, eval_size=64)
# SFT must learn which letter comes next (not only the first), or neither the RM initialised from it
# nor RL can tell right letters from wrong ones; batches of 64 cost little more per step than 32 on a CPU.
DEMO_SFT = dict(lr=4e-3, batch_size=64, epochs=3, warmup_steps=10)
DEMO_RM = dict(lr=2e-3, batch_size=64, epochs=2, warmup_steps=10)
DEMO_REMAX = dict(lr=2e-4, batch_size=32, max_steps=60, eval_every=20, max_new_tokens=12, top_p=1.0, beta=0.05,
                  gold="synthetic")


def demo(cfg: Config, ctx: Dist):
    """All three steps on the built-in task (data.synthetic_task), with a tiny model, on a CPU in minutes.

    The task: spell the prompt's letters in order. SFT imitates a sloppy demonstrator, the RM learns
    noisy preferences, and ReMax should raise both the RM's and the gold score of greedy answers.
    --lr, --max_steps, --preset, --baseline and --algo given on the command line apply to step 3; --seed
    (data, initial model and all three stages), --out_dir and --device to everything; any other flag is an
    error (main), not silently ignored.
    """
    root = Path(cfg.out_dir if cfg.out_dir != Config.out_dir else "out/demo")
    names = {"sft": "sft.jsonl", "rm": "preferences.jsonl", "remax": "prompts.jsonl", "eval": "eval_prompts.jsonl"}
    files = {k: root / "data" / v for k, v in names.items()}
    if ctx.rank == 0:
        data.write_synthetic_jsonl(root / "data", seed=cfg.seed)
        tok_dir = data.write_char_tokenizer(root / "tokenizer")
        init = Transformer(ModelConfig(**DEMO_MODEL)).init_weights(generator=torch.Generator().manual_seed(cfg.seed))
        init.save_pretrained(root / "init", extra_files=Tokenizer(tok_dir).files())
    dist.barrier()
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
        show_samples(Path(sft), root / "remax" / "final", files["eval"])
        b, a = result["before"], result["after"]
        print("\n            RM score (greedy)   gold score (greedy)   KL to SFT")
        print(f"SFT         {b['reward_greedy']:8.3f}          {b['gold_greedy']:8.3f}              {b['kl']:.3f}")
        print(f"{'PPO' if cfg.algo == 'ppo' else 'ReMax':12}{a['reward_greedy']:8.3f}          {a['gold_greedy']:8.3f}              {a['kl']:.3f}")
        print(f"\nmetrics: {root}/{{sft,rm,remax}}/metrics.jsonl; checkpoints (HF layout): {root}/{{sft,rm,remax}}/final")
    return result


def show_samples(sft_path: Path, remax_path: Path, eval_file: Path, n: int = 5):
    tok = Tokenizer(sft_path)
    records = data.read_prompts(eval_file)[:n]
    ids, _ = data.encode_prompts(tok, records, "chat", 16)
    prompt, mask = data.left_pad(ids, tok_pad(tok))
    print("\nprompt     SFT answer (gold)        ReMax answer (gold)")
    answers = []
    for path in (sft_path, remax_path):
        resp, rmask = generate(Transformer.from_pretrained(path).eval(), prompt, mask, 12, temperature=0.0)
        answers.append(tok.decode_batch(r[m].tolist() for r, m in zip(resp, rmask)))
    for r, a, b in zip(records, *answers):
        x = r["messages"][0]["content"]
        print(f"{x:10s} {a:12s} ({data.gold_score(x, a):.2f})     {b:12s} ({data.gold_score(x, b):.2f})")


def check_rl_flags(cfg: Config):
    """Step-3 flags, checked before any model is loaded: a bad value would otherwise surface only after
    three checkpoints were read and the first evaluation ran."""
    choices = dict(baseline=remax.BASELINES, kl=remax.KL_MODES, norm=remax.NORMS)
    for flag, allowed in choices.items():
        if getattr(cfg, flag) is not None and getattr(cfg, flag) not in allowed:
            raise SystemExit(f"--{flag}: expected one of {', '.join(allowed)}, got {getattr(cfg, flag)!r}")
    ranges = [("beta", cfg.beta, lambda v: v >= 0, ">= 0"), ("gamma", cfg.gamma, lambda v: 0 < v <= 1, "in (0, 1]"),
              ("clip", cfg.clip, lambda v: v > 0, "> 0"), ("temperature", cfg.temperature, lambda v: v >= 0, ">= 0"),
              ("top_p", cfg.top_p, lambda v: 0 < v <= 1, "in (0, 1]"), ("top_k", cfg.top_k, lambda v: v >= 0, ">= 0"),
              ("max_new_tokens", cfg.max_new_tokens, lambda v: v >= 1, ">= 1")]
    for flag, value, ok, rule in ranges:
        if value is not None and not ok(value):        # `not ok`: NaN fails every rule
            raise SystemExit(f"--{flag}: expected {rule}, got {value!r}")
    if cfg.algo == "ppo":
        given = [f"--{k}" for k in ("kl", "gamma", "clip", "norm") if getattr(cfg, k) is not None]
        given += ["--baseline"] if cfg.baseline != "greedy" else []
        if given:
            raise SystemExit(f"{', '.join(given)}: ReMax loss options, unused by --algo ppo (ppo.py keeps DS-Chat's "
                             "gamma 1, lambda 0.95 and reward clip 5; --beta sets its kl_ctl)")
        if cfg.reward_format == "ultrarm" and not cfg.critic:
            raise SystemExit("--algo ppo --reward_format ultrarm: add --critic, a value model on the policy's "
                             "tokenizer (the reward model reads its own tokens, the critic the policy's)")
    else:
        try:
            remax_options(cfg)
        except ValueError as e:
            raise SystemExit(str(e)) from None


DEMO_FLAGS = ("stage", "lr", "max_steps", "preset", "baseline", "algo", "seed", "out_dir", "device")
STEP3_FLAGS = ("algo", "critic", "critic_lr", "reward_model", "reward_format", "preset", "baseline", "kl", "beta",
               "gamma", "clip", "norm", "temperature", "top_p", "top_k", "max_new_tokens", "gold", "target_kl")
UNUSED_FLAGS = {"sft": STEP3_FLAGS + ("eval_data", "eval_size", "eval_every"), "rm": STEP3_FLAGS, "remax": ("max_len",)}


def unused_flags(cfg: Config) -> list[str]:
    """Flags given (not at their default) that this stage would ignore: an error, not a silent no-op."""
    if cfg.stage == "demo":
        names = [f.name for f in fields(Config) if f.name not in DEMO_FLAGS]
    else:
        names = UNUSED_FLAGS.get(cfg.stage, ()) + (("critic", "critic_lr") if cfg.algo == "remax" else ())
    return [f"--{n}" for n in names if getattr(cfg, n) != getattr(Config, n)]


def main(argv=None):
    cfg = parse_args(argv)
    unused = [] if cfg.example else unused_flags(cfg)
    if unused and cfg.stage == "demo":
        raise SystemExit(f"{', '.join(unused)}: the demo takes only --{', --'.join(DEMO_FLAGS[1:])}; "
                         "run --stage sft / rm / remax for the rest")
    if unused:
        raise SystemExit(f"{', '.join(unused)}: not used by --stage {cfg.stage}"
                         + (" (--critic and --critic_lr are for --algo ppo)" if "--critic" in unused or
                            "--critic_lr" in unused else ""))
    stages = {"demo": demo, "sft": train_sft, "rm": train_rm, "remax": train_remax}
    if cfg.stage not in stages:
        raise SystemExit(f"--stage: expected one of {', '.join(stages)}, got {cfg.stage!r}")
    if cfg.algo not in ("remax", "ppo"):
        raise SystemExit(f"--algo: expected remax or ppo, got {cfg.algo!r}")
    need = {"sft": ("policy", "data"), "rm": ("policy", "data"), "remax": ("policy", "reward_model", "data")}
    for flag in need.get(cfg.stage, ()):
        if not getattr(cfg, flag):
            raise SystemExit(f"--{flag} is required for --stage {cfg.stage}")
    if cfg.split not in ("", *SPLITS):
        raise SystemExit(f"--split: expected one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if cfg.preset not in ("official", "algorithm1"):
        raise SystemExit(f"--preset: expected official or algorithm1, got {cfg.preset!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--dtype: expected auto, float32 or bfloat16, got {cfg.dtype!r}")
    ranges = [("batch_size", 1), ("eval_size", 1), ("epochs", 1), ("max_prompt_len", 1), ("max_bad_steps", 1),
              ("max_steps", 0), ("eval_every", 0), ("save_every", 0), ("warmup_steps", 0), ("weight_decay", 0),
              ("target_kl", 0), ("lr", 1e-30), ("critic_lr", 1e-30), ("grad_clip", 1e-30)]
    for flag, low in ranges:
        if not getattr(cfg, flag) >= low:             # `not >=`: NaN fails too
            raise SystemExit(f"--{flag}: expected {'> 0' if low == 1e-30 else f'>= {low}'}, got {getattr(cfg, flag)!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device available to torch {torch.__version__}")
    if cfg.stage in ("sft", "rm") and cfg.max_len <= cfg.max_prompt_len:
        raise SystemExit(f"--max_len {cfg.max_len} must exceed --max_prompt_len {cfg.max_prompt_len} "
                         "(the rest is the response's room)")
    if cfg.reward_format not in ("same", "ultrarm"):
        raise SystemExit(f"--reward_format: expected same or ultrarm, got {cfg.reward_format!r}")
    if cfg.gold not in ("", "synthetic"):
        raise SystemExit(f"--gold: expected synthetic or nothing, got {cfg.gold!r}")
    if cfg.example and cfg.example not in ("smollm2-sentiment",):
        raise SystemExit(f"--example: expected smollm2-sentiment, got {cfg.example!r}")
    if cfg.stage in ("remax", "demo") and not cfg.example:
        check_rl_flags(cfg)
    for flag in ("policy", "reward_model", "critic", "tokenizer"):
        if getattr(cfg, flag) and not Path(getattr(cfg, flag)).is_dir():
            raise SystemExit(f"--{flag} {getattr(cfg, flag)}: folder not found (expected a Hugging Face checkpoint folder)")
    ctx = Dist(cfg.device)
    try:
        if cfg.stage != "demo" and not cfg.example:
            ctx.split(cfg.batch_size)                   # before any model is read, not at the first step
        if cfg.example:
            import convert
            convert.smollm2_sentiment(cfg, ctx)
        else:
            stages[cfg.stage](cfg, ctx)
    except torch.OutOfMemoryError:
        raise SystemExit(f"train.py: out of memory on rank {ctx.rank} ({ctx.device}): lower --batch_size or "
                         "--max_new_tokens, add --activation_checkpointing, or use more GPUs (FSDP shards "
                         "weights and optimizer state)") from None
    except (ValueError, OSError) as e:                       # bad input: one line, no traceback
        raise SystemExit(f"train.py: {e}") from None
    except Rank0Failed as e:
        raise SystemExit(f"train.py: rank {ctx.rank}: {e}") from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
        code = 0
    except SystemExit as e:                                  # a bad-input line (or argparse's usage / --help)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    # Everything is written, renamed and closed. Skip interpreter teardown: PyTorch's distributed C++ threads
    # can race it and abort the process ("terminate called without an active exception", pytorch#190489).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
