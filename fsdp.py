"""Distributed plumbing, nothing of ReMax: ranks, FSDP2 sharding and loading, the gathered policy for a
rollout, the optimizer step, export, DCP checkpoints read safely, files written atomically.

The FSDP2 recipe is torchtitan's (torch >= 2.6): a process group and a 1-D device mesh; build the model on
the meta device; `fully_shard` every transformer block, then the root; materialise with `to_empty`; rank 0
reads the checkpoint and broadcasts it into the shards; create the optimizer after sharding, so it holds
the DTensor shards. Trained models keep fp32 master weights and compute in the compute dtype
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); frozen ones hold the compute dtype. Resume
state is a `torch.distributed.checkpoint` folder (`get_state_dict` / `set_state_dict`); exports gather the
full state dict and rank 0 writes a Hugging Face folder. A plain `python train.py` is a world of one: the
same code path, on an in-memory store.
"""
import json
import logging
import math
import os
import pickle
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException      # a BaseException: each rank's read errors
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import memory
from model import Tokenizer, Transformer, checkpoint_index, read_config, read_json, read_tensors
from reward import HEADS


class Dist:
    """Rank, world and device; reductions of Python numbers over the ranks."""

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

    def _reduce(self, values, op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, values: dict) -> dict:
        return {k: v / self.world for k, v in zip(values, self._reduce(list(values.values())))}

    def sum(self, x: float) -> float:
        return self._reduce([x])[0]

    def max(self, x: float) -> float:
        return self._reduce([x], dist.ReduceOp.MAX)[0]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of every rank, in rank order (each rank holds as many)."""
        x = x.detach().to(self.device, torch.float64)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)


def log(ctx: Dist, *args):
    """print on rank 0."""
    if ctx.rank == 0:
        print(*args, flush=True)


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


# --------------------------------------------------------------------------- models

def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU, fp32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def shard(model, blocks, mesh, dtype: torch.dtype, trainable: bool):
    """fully_shard each transformer block, then the root. Trainable: fp32 master weights, compute in `dtype`,
    fp32 gradient reduction. Frozen models already hold the compute dtype and need no policy."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if trainable and dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def load_model(path, ctx: Dist, dtype: torch.dtype, trainable: bool, cls=Transformer, activation_checkpointing=False,
               vocab_size: int = 0, flag: str = "--policy"):
    """Build on the meta device, shard, then stream the checkpoint into the shards (load_weights). Trained
    models hold fp32 master weights, frozen ones `dtype`. vocab_size: the tokenizer's, which the
    embeddings must cover (a larger id would be a device-side assert on a GPU, not an error message).
    """
    path = Path(path)
    config = read_config(path)
    if vocab_size > config.vocab_size:
        raise ValueError(f"{flag}: the model has {config.vocab_size} embeddings but the tokenizer {vocab_size} tokens; "
                         "use the matching --tokenizer (or --reward_format ultrarm for a reward model with its own "
                         "tokenizer)")
    with torch.device("meta"):
        model = cls(config)
    backbone = model if isinstance(model, Transformer) else model.model       # a reward model or critic
    model.to(torch.float32 if trainable else dtype)
    shard(model, backbone.layers, ctx.mesh, dtype, trainable)
    model.to_empty(device=ctx.device)
    load_weights(model, path, ctx)
    backbone.reset_rope()
    backbone.activation_checkpointing = trainable and activation_checkpointing
    if not trainable:
        model.eval().requires_grad_(False)
        # FSDP2 keeps a root's parameters (embeddings, lm_head) gathered after its forward, for the backward that
        # follows; a frozen model has none, and would hold them for the rest of the run (0.8 GB a rank at 7B).
        model.register_forward_hook(lambda module, *_: module.reshard())
    return model


def load_weights(model, path, ctx: Dist):
    """Rank 0 reads the checkpoint one tensor at a time (model.read_tensors, memory-mapped) and broadcasts it
    in the shard's dtype; each rank copies its own rows into its shard. Rank 0's host memory so peaks near one
    tensor plus its shard, where building the whole model in fp32 first took ~3x the bf16 file (50 GB at 7B)."""
    params = dict(model.named_parameters())                   # a tied lm_head is listed once, as embed_tokens
    names = {k: k.removeprefix("model.") for k in params}     # reward models and critics: HF's names

    def index():
        type(model).from_pretrained(path, device="meta")      # the class's own checks, from the headers only
        if not isinstance(model, Transformer):                 # UltraRM names its head regression_head
            arch = (read_json(Path(path) / "config.json").get("architectures") or ["LlamaForSequenceClassification"])[0]
            names["score.weight"] = HEADS[arch]
        return checkpoint_index(path, {names[k]: p.shape for k, p in params.items()})
    where = on_rank0(ctx, index)
    with torch.no_grad():
        for k, p in params.items():
            full = read_tensors(*where[names[k]]) if ctx.rank == 0 else None
            if ctx.world > 1:
                full = full.to(ctx.device, p.dtype) if ctx.rank == 0 else \
                    torch.empty(p.shape, dtype=p.dtype, device=ctx.device)
                dist.broadcast(full, src=0)
            local, rows = p.to_local(), -(-p.shape[0] // ctx.world)     # FSDP2 shards dim 0 as torch.chunk does
            local.copy_(full[ctx.rank * rows:ctx.rank * rows + local.shape[0]])


def export(model, path, ctx: Dist, tokenizer: Tokenizer | None = None, extra_files=()):
    """Gather the full weights (all ranks take part) and let rank 0 write a transformers-loadable folder, with
    the tokenizer's files and extra_files (e.g. the source's generation_config.json: its sampling defaults)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if model.config.pad_id is None and tokenizer and tokenizer.pad_id not in (None, tokenizer.eos_id):
        # transformers' *ForSequenceClassification scores batches only with a pad id, at the last non-pad
        # token: the tokenizer's own pad is safe there (an EOS used as pad would move the score off the EOS).
        model.config.pad_id = tokenizer.pad_id
    files = [*(tokenizer.files() if tokenizer else ()), *extra_files]
    on_rank0(ctx, lambda: model.save_pretrained(path, state_dict=state, extra_files=files))


@contextmanager
def gathered(model, seconds: dict | None = None):
    """Keep the policy's parameters unsharded for a whole rollout; seconds["gathered"]: how long it lasted.

    Decoding runs one forward per token; letting FSDP all-gather every block for every token would
    dominate generation time. This is the role DeepSpeed's hybrid engine plays in the official code.
    """
    t, modules = time.perf_counter(), [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        if seconds is not None:
            seconds["gathered"] = time.perf_counter() - t


def adamw(model, lr: float, weight_decay: float, betas: tuple) -> torch.optim.AdamW:
    """AdamW over the model's (sharded) trainable parameters, so create it after sharding. No weight decay on
    norms (1-D), as the official code's get_optimizer_grouped_parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 over the run (the official scripts: cosine, no warmup)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def make_update(ctx: Dist, lr: float, grad_clip: float, lr_scale: dict | None = None):
    """update(model, optimizer, loss, token_mask=None) -> (grad norm | None, loss): backward, clip, one step.

    A token mean (token_mask given) is rescaled to the *global* batch: FSDP averages gradients over ranks,
    so each rank's mean times its share of the tokens makes the step one process's with the whole batch,
    whatever the world size. A non-finite loss on any rank, or a non-finite gradient norm (over all
    shards), skips the step on every rank. lr_scale: {optimizer: its learning rate / lr}.
    """
    def update(model, optimizer, loss, token_mask=None):
        n = 0.0 if token_mask is None else token_mask.sum().item()
        scale = 1.0 if token_mask is None else n * ctx.world / max(1.0, ctx.sum(n))
        if ctx.sum(0.0 if torch.isfinite(loss) else 1.0):
            model.zero_grad(set_to_none=True)
            return None, math.nan
        (loss * scale).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
        for g in optimizer.param_groups:
            g["lr"] = lr * (lr_scale or {}).get(optimizer, 1)
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (norm if math.isfinite(norm) else None), loss.item() * scale
    return update


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak: CUDA's allocator statistics, or the kernel's high-water mark VmHWM on a CPU
    (getrusage's ru_maxrss starts a child process at its parent's peak)."""
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory.peak_rss_bytes()) / 2**30


# --------------------------------------------------------------------------- checkpoints

def _train_state(trained: dict, gen: torch.Generator) -> dict:
    state = {"rng": gen.get_state()}
    for name, (model, opt) in trained.items():
        state[name], state[f"{name}_optim"] = get_state_dict(model, opt)
    return state


def save_checkpoint(root: Path, trained: dict, step: int, gen: torch.Generator, ctx: Dist, meta: dict):
    """DCP checkpoint of {name: (model, optimizer)} and the sampling RNG, written to a temp folder and
    renamed, then `latest` updated: a kill at any moment leaves the previous checkpoint loadable. Only
    then are checkpoints older than the newest two removed."""
    final, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
    on_rank0(ctx, lambda: shutil.rmtree(tmp, ignore_errors=True))        # left by a run killed mid-save
    dcp.save(_train_state(trained, gen), checkpoint_id=str(tmp))
    dist.barrier()

    def publish():
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
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


def load_checkpoint(root: Path, trained: dict, gen: torch.Generator, ctx: Dist) -> dict:
    """Restore the newest complete checkpoint that reads back; returns its meta.json ({"step": 0} if none).

    Complete = renamed from its temp folder (meta.json is written before the rename), so even a kill
    between the rename and the `latest` update resumes from the newest one. One that does not read back
    (truncated, tampered) is skipped with a warning for the one before it: the newest two are kept for this.
    """
    done = sorted(root.glob("step_*/meta.json"))
    if not done:
        log(ctx, f"[resume] no checkpoint under {root}: starting at step 0")
        return {"step": 0}
    skipped = []
    for path in reversed([m.parent for m in done]):
        state = _train_state(trained, gen)
        try:                            # every rank raises together: DCP gathers each rank's read errors
            logging.disable(logging.ERROR)              # DCP logs its own tracebacks; the warning below says it
            dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
            meta = json.loads((path / "meta.json").read_text())
        except (Exception, CheckpointException) as e:    # unreadable for whatever reason: the previous may be fine
            e = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e   # (error, stack)
            if isinstance(e, (KeyboardInterrupt, torch.OutOfMemoryError)):
                raise e from None       # not the checkpoint's fault
            skipped.append(path)
            log(ctx, f"[resume] warning: skipping {path}, which does not read back ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]})")
            continue
        finally:
            logging.disable(logging.NOTSET)
        for name, (model, opt) in trained.items():
            set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
        gen.set_state(state["rng"])
        # Out of the way, not deleted: keeping "the newest two" must not drop the checkpoint resumed from.
        on_rank0(ctx, lambda: [os.replace(p, p.with_name(f"unreadable_{p.name}")) for p in skipped])
        log(ctx, f"[resume] from {path}: continuing after step {meta['step']}")
        return meta
    raise ValueError(f"--resume: no checkpoint under {root} reads back (each is named above); start a fresh run "
                     "in another --out_dir")


def check_run(root: Path, run: dict):
    """Refuse to resume from another run's checkpoints: a checkpoint's meta.json holds the `run` that wrote it
    (stage, algorithm, models and data by content, every flag that changes what a step does)."""
    metas = [m for m in map(lambda p: json_or_none(p.read_text()), sorted(root.glob("step_*/meta.json"))) if m]
    if not metas:
        return
    old = metas[-1].get("run", {})
    diff = [f"--{k} {old.get(k, '?')} -> {v}" if not str(v).startswith("sha256:") else f"--{k} (another file)"
            for k, v in run.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"--resume: the checkpoints in {root} were written by another run ({', '.join(diff)}); "
                         "resume with the same settings, or start afresh in another --out_dir")


# --------------------------------------------------------------------------- run folders and files

def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_or_none(line: str):
    try:                                   # a kill mid-write leaves at most one partial last line
        return json.loads(line)
    except json.JSONDecodeError:
        return None
