"""What a run shows and logs: its config (config.json, and the flags that differ from the defaults on the
console), held-out evaluation of the policy (the official code's: rewards of sampled and greedy responses,
KL to the reference, exact per-token KL), statistics of a training batch, metrics.jsonl (one JSON line per
step, strict JSON) with its optional plot, progress lines a person can follow, and how it ends: one line
for bad input, for Ctrl-C (with the command that resumes), and no interpreter teardown.

A mean over ranks of each rank's own std or token mean is not the whole batch's: the batch statistics
(reward, baseline and advantage spreads, kl_token, entropy) and the losses gather per-response values or
sum numerators and denominators, so they are the same with 1 or 8 ranks. Every other row value is a mean
over ranks of equal-sized shares (exact for row means; PPO's per-token diagnostics are per-rank means).
"""
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

import data
import remax
from fsdp import Dist, Rank0Failed, atomic_write, check_run, gathered, json_or_none, log, on_rank0
from model import Transformer, generate, positions_from_mask, response_logprobs


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
                top_p: float, top_k: int, seed: int, gold=None, tok=None, compile: bool = False, chunk: int = 0) -> dict:
    """Reward of greedy and sampled responses on held-out prompts, and the sampled responses' KL to pi_ref:
    kl, the sequence estimate sum_t k1_t; kl_exact, the official metric (the exact KL over the vocabulary
    at each response token, averaged over tokens). Responses are sampled as in training (official), from
    a generator of their own, so evaluating never moves the training samples. gold(prompt text, response
    text) -> float: a programmatic score of the greedy responses (decoded with `tok`), e.g. data.gold_score.
    chunk: prompts decoded at once (train.py: the training batch's), so evaluation needs no more memory than
    a rollout; every chunk replays the one noise draw at its global rows, so the samples are one call's."""
    B, chunk = len(prompts), chunk or len(prompts)
    sums, kl_exact, kl_tokens = {}, 0.0, 0.0
    for s in range(0, B, chunk):
        prompt, mask = data.left_pad(prompts[s:s + chunk], pad_id, ctx.device)
        n = len(prompt)
        with gathered(policy):
            resp, rmask = generate(policy, prompt, mask, max_new_tokens, n=2, top_p=top_p, top_k=top_k, compile=compile,
                                   generator=torch.Generator(ctx.device).manual_seed(seed), pad_id=pad_id,
                                   temperature=torch.tensor([temperature] * n + [0.0] * n),
                                   row_offset=ctx.rank * B + s, total_rows=B * ctx.world)
        r = reward_fn(prompt.repeat(2, 1), mask.repeat(2, 1), resp, rmask)
        logp, _ = response_logprobs(policy, prompt, mask, resp[:n], rmask[:n])
        ref_logp, _ = response_logprobs(ref, prompt, mask, resp[:n], rmask[:n])
        part = {"reward_sampled": r[:n].sum().item(), "reward_greedy": r[n:].sum().item(),
                "kl": torch.where(rmask[:n], logp - ref_logp, 0.0).sum().item(), "length_greedy": rmask[n:].sum().item()}
        if gold is not None:
            texts = tok.decode_batch(p[m].tolist() for p, m in zip(prompt, mask))
            greedy = tok.decode_batch(x[m].tolist() for x, m in zip(resp[n:], rmask[n:]))
            part["gold_greedy"] = sum(gold(p, a) for p, a in zip(texts, greedy))
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        tokens = ctx.sum(float(rmask[:n].sum()))          # exact_kl_over_ranks: a mean over the chunk's tokens
        kl_exact += exact_kl_over_ranks(policy, ref, prompt, mask, resp[:n], rmask[:n], ctx) * tokens
        kl_tokens += tokens
    return ctx.mean({k: v / B for k, v in sums.items()}) | {"kl_exact": kl_exact / max(1.0, kl_tokens)}


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
        if not self.on:                 # rank 0 writes the file, so rank 0 alone draws it
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
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


def start_run(out: Path, config: dict, defaults: dict, resume, ctx: Dist, tag: str) -> Path:
    """Check and create the output folder (rank 0), write config.json, print the flags that differ from the
    defaults (and on --resume, those changed since the earlier run). resume: the run's identity (run_identity),
    which the folder's checkpoints must share, checked before any model is read; False for a fresh run."""
    if resume:
        check_run(out / "checkpoints", resume)

    def write_config():
        if not resume and any((out / "checkpoints").glob("step_*")):
            # A later --resume would otherwise pick up whichever run's checkpoint has the highest step.
            raise ValueError(f"--out_dir {out}: holds checkpoints of an earlier run; add --resume to continue "
                             "it, or use another --out_dir")
        if resume and (out / "config.json").is_file():
            old = json_or_none((out / "config.json").read_text()) or {}
            changed = [f"--{k} {old[k]} -> {v}" for k, v in config.items() if k != "resume" and k in old and old[k] != v]
            if changed:
                print(f"[resume] flags changed since the earlier run: {', '.join(changed)}", flush=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
        except OSError as e:
            raise OSError(f"--out_dir {out}: not writable ({e.strerror})") from None
        given = " ".join(f"--{k} {v}" for k, v in config.items() if v != defaults.get(k))
        print(f"[{tag}] world={ctx.world} device={ctx.device} {given} (all flags: {out / 'config.json'})", flush=True)
    on_rank0(ctx, write_config)
    return out


class Progress:
    """Console lines a person can follow: a step line at least every `every` seconds (and at the first and
    last step, and every tenth of the run) with step/total, elapsed time and ETA; a line when an evaluation
    or a checkpoint save starts and when it ends (at 7B each takes minutes)."""

    def __init__(self, ctx: Dist, name: str, start: int, total: int, every: float = 10.0):
        self.ctx, self.name, self.start, self.total, self.every = ctx, name, start, total, every
        self.t0 = self.last = time.perf_counter()

    def step(self, step: int, row: dict, show=()):
        now, done = time.perf_counter(), step - self.start
        if not (step in (self.start + 1, self.total) or now - self.last >= self.every or step % max(1, self.total // 10) == 0):
            return
        self.last = now
        eta = (now - self.t0) / done * (self.total - step)
        what = "skipped: non-finite reward, loss or grad norm" if row.get("skipped") else fmt({k: row.get(k) for k in show})
        log(self.ctx, f"[{self.name}] step {step}/{self.total} {what} | {_clock(now - self.t0)} elapsed, "
                      f"ETA {_clock(eta)}")

    @contextmanager
    def phase(self, what: str):
        t = time.perf_counter()
        log(self.ctx, f"[{self.name}] {what} ...")
        yield
        log(self.ctx, f"[{self.name}] {what}: done in {_clock(time.perf_counter() - t)}")
        self.last = time.perf_counter()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def fmt(d: dict) -> str:
    """Integers as integers, lr in e-notation, other numbers to 3 decimals; None (not logged) left out."""
    return " ".join(f"{k} {v}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v:.2e}" if k == "lr"
                    else f"{k} {v:.3f}" for k, v in d.items() if v is not None)


def run_identity(config: dict, safe) -> dict:
    """What a checkpoint shares with the run that may resume it: every flag but the `safe` ones, a flag that
    names a file or folder (or file.py:function) by its content, so a moved checkpoint still resumes and a
    changed one does not."""
    def value(v):
        path, _, name = v.rpartition(":") if isinstance(v, str) and ":" in v else (v, "", "")
        return fingerprint(path) + _ + name if isinstance(path, str) and path and os.path.exists(path) else v
    return {k: value(v) for k, v in config.items() if k not in safe}


def fingerprint(path) -> str:
    """What a file, or a checkpoint folder, holds by content: every byte of its JSON (config, tokenizer) and of
    a data file; of its weights, the size and three 64 KB samples (the start, middle and end), enough to
    tell two trainings apart without reading 14 GB."""
    path, digest = Path(path), hashlib.sha256()
    for p in sorted(path.iterdir()) if path.is_dir() else [path]:
        if not p.is_file():
            continue
        with p.open("rb") as f:
            if p.suffix in (".safetensors", ".bin", ".pt"):
                size = p.stat().st_size
                digest.update(str(size).encode())
                for offset in (0, size // 2, max(0, size - (1 << 16))):
                    f.seek(offset)
                    digest.update(f.read(1 << 16))
            else:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def resume_hint(root: Path, ctx: Dist, resumable: bool = True) -> str:
    """Where the newest checkpoint is and the command that resumes from it (this one, with --resume)."""
    done = sorted(root.glob("step_*/meta.json"))
    if not (resumable and done):
        return f"no checkpoint to resume from{f' in {root}' if resumable else ''}: run the same command again"
    launch = "python" if ctx.world == 1 else f"torchrun --nproc_per_node={ctx.world}"
    args = " ".join(a for a in sys.argv[1:] if a != "--resume")
    return f"the newest checkpoint is {done[-1].parent}; resume with: {launch} {sys.argv[0]} {args} --resume"


@contextmanager
def one_line_errors(ctx: Dist, prog: str, oom_hint: str, interrupted):
    """Bad input ends with one line naming the problem, on every rank, and the process group is torn down.
    Ctrl-C ends with interrupted() on rank 0 (where the last checkpoint is, how to resume) and quietly elsewhere,
    whatever it interrupted: a collective whose peer already left, or a checkpoint save, fails in its own way."""
    sigint = []

    def on_sigint(*_):
        sigint.append(True)
        raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        yield
    except BaseException as e:
        if sigint or isinstance(e, KeyboardInterrupt):
            raise SystemExit(f"{prog}: interrupted; {interrupted()}" if ctx.rank == 0 else 130) from None
        if isinstance(e, torch.OutOfMemoryError):
            raise SystemExit(f"{prog}: out of memory on rank {ctx.rank} ({ctx.device}): {oom_hint}") from None
        if isinstance(e, (ValueError, OSError)):
            raise SystemExit(f"{prog}: {e}") from None
        if isinstance(e, Rank0Failed):
            raise SystemExit(f"{prog}: rank {ctx.rank}: {e}") from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        dist.destroy_process_group()


def run_main(main):
    """The process entry point: main(), a SystemExit's message as one line on stderr, then os._exit. Everything
    is written, renamed and closed by then: skipping interpreter teardown avoids PyTorch's distributed C++
    threads racing it and aborting ("terminate called without an active exception", pytorch#190489)."""
    try:
        main()
        code = 0
    except SystemExit as e:                                  # a bad-input line (or argparse's usage / --help)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 130 if "interrupted" in e.code else int(e.code is not None)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def compare_answers(paths: dict, prompt, mask, tok, texts: list[str], score, max_new_tokens: int, label="gold"):
    """Greedy answers of each checkpoint in `paths` ({name: folder}) to the same prompts, side by side with
    score(prompt text, answer)."""
    answers = [tok.decode_batch(r[m].tolist() for r, m in zip(*generate(Transformer.from_pretrained(p).eval(), prompt,
                                                                         mask, max_new_tokens, temperature=0.0)))
               for p in paths.values()]
    print("\nprompt     " + "        ".join(f"{name} answer ({label})" for name in paths))
    for x, *row in zip(texts, *answers):
        print(f"{x:10s} " + "     ".join(f"{a:12s} ({score(x, a):.2f})" for a in row))
