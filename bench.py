"""Benchmarks, one subcommand each; every run writes a JSON result and prints a short table.

  python bench.py gen --compile       # our generate(), eager and compiled, vs transformers' generate, fp32 CPU
  python bench.py gen --device cuda --dtype bfloat16 --size 1b --compile   # + decode GB/s vs the HBM roofline
  python bench.py gen --smoke         # tiny sizes, seconds (the test suite's run)
  python bench.py step --size 7m --batch 4 --prompt_len 32 --new_tokens 32   # ReMax vs PPO per step, CPU
  python bench.py step --device cuda --dtype bfloat16 --size 1b --batch 8 --prompt_len 256 --new_tokens 256
  python bench.py maxbatch --device cuda --dtype bfloat16 --size 1b       # largest batch that fits, GPU only

`gen` times the whole generate call (prefill included) on the same random-init Llama checkpoint,
loaded by both implementations, in one process: same dtype, threads, batch, sampling, EOS disabled.

`step` times one training step of ReMax and of PPO on the same random-init shapes, batch and lengths
(EOS disabled, so every response is new_tokens long), split into generate / reward / logprobs (every forward
after the rollout, and the loss) / backward / optimizer, and their peak memory, the paper's compute claims
(PPO: ~2x the time, ~2x the memory at 7B):
  ReMax: remax.rollout (B sampled + B greedy rows, one prefill) | RM on 2B rows | ref and policy log-probs,
         remax_loss | backward | AdamW step.                                        3 models, 1 optimizer
  PPO:   remax.rollout(baseline="none") (B sampled rows) | RM on B rows | ppo.experience (ref log-probs, critic
         values), ppo.ppo_step's actor and critic forwards | their backwards | their AdamW steps, 1 ppo epoch
         (DS-Chat step 3).                                                          4 models, 2 optimizers
Memory: on CUDA torch.cuda.max_memory_allocated of the steps after a warm-up (weights and Adam states
included), the peak statistics reset between the algorithms, whose models are freed in between. On CPU
each algorithm runs in its own process (bench.py re-invokes itself) and reports its peak RSS (the kernel's
VmHWM, memory.peak_rss_bytes; getrusage's ru_maxrss would start at the parent's peak); `base` is that peak
before any model is built.

`memory` is memory.py's per-rank plan (no weights read), `smoke` the GPU smoke test (smoke.py):
  python bench.py memory --policy llama-2-7b --world 8 --batch_size 8 --activation_checkpointing
  python bench.py smoke

`maxbatch` (CUDA) finds the largest batch at which one whole step of each algorithm fits, by doubling and
then bisecting on torch.OutOfMemoryError. With --smoke on CPU it runs the search against a simulated
memory limit (--sim_limit rows), only to exercise the code.

`curves` (curves.py) records learning curves of ReMax, REINFORCE, RLOO-2 and PPO on the built-in task:
  python bench.py curves                          # 4 algos x 3 seeds on CPU; runs `python train.py` first if needed
"""
import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

import memory
import ppo
import remax
from model import ModelConfig, Transformer, generate, response_logprobs
from reward import ModelReward, RewardModel, freeze

# Llama shapes: "7m" (~7M parameters) and "40m" (~56M) are for CPU, "1b" is Llama-3.2-1B's shape.
SIZES = {
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=176, vocab_size=256),
    "7m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=704, vocab_size=8192),
    "40m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
# Peak HBM bandwidth by GPU name, first match wins (H100 SXM is HBM3, the PCIe card HBM2e).
HBM_GBS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor()


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, device: str, repeats: int):
    """(min seconds, last result) over `repeats` calls after one warm-up: the least-disturbed run."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), out


def build_checkpoint(path: Path, size: str, dtype, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM saved by transformers; no EOS id, so neither side can stop early."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES[size], bos_token_id=1, eos_token_id=None, pad_token_id=0, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


def decode_bytes(model: Transformer, batch: int, context: int) -> int:
    """HBM bytes one decode step must read: every weight once (the embedding table only through the
    tied lm_head) plus keys and values of `context` positions for each row and layer."""
    c = model.config
    elem = model.embed_tokens.weight.element_size()
    # named_parameters lists a tied matrix once, under embed_tokens.
    weights = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight" or c.tie_embeddings)
    return (weights + 2 * c.n_layers * batch * c.n_kv_heads * context * c.head_dim) * elem


def run_gen(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "ckpt", args.size, dtype)
        ours = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
        hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(3, ours.config.vocab_size, (B, P), generator=g, device=device)
    mask = torch.ones(B, P, dtype=torch.bool, device=device)

    def run_ours(n, compile=False):
        return generate(ours, prompt, mask, n, temperature=1.0, top_p=1.0, top_k=0, stop_ids=[], generator=g,
                        compile=compile)[0]

    def run_hf(n):
        gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
        return hf.generate(prompt, attention_mask=mask.long(), generation_config=gc)[:, P:]

    result, runs = {}, {"ours": run_ours, "compiled": lambda n: run_ours(n, True), "hf": run_hf}
    for name, fn in ((k, f) for k, f in runs.items() if args.compile or k != "compiled"):   # warm-up compiles
        total, tokens = best_of(lambda: fn(N), device, args.repeats)
        # The prefill is eager either way (a compiled one-token call would only compile another graph).
        prefill = result["ours"]["prefill_s"] if name == "compiled" else best_of(lambda: fn(1), device, args.repeats)[0]
        if tuple(tokens.shape) != (B, N):
            raise RuntimeError(f"{name}: generated shape {list(tokens.shape)}, expected {[B, N]}")
        result[name] = dict(total_s=total, prefill_s=prefill, tok_s=B * N / total,
                            decode_tok_s=B * (N - 1) / max(total - prefill, 1e-9), shape=list(tokens.shape))
    out = dict(cmd="gen", size=args.size, device=device, machine=machine(device), dtype=args.dtype,
               threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
               params=sum(p.numel() for p in ours.parameters()),
               batch=B, prompt_len=P, new_tokens=N, repeats=args.repeats, timing="best of repeats after 1 warm-up",
               sampling="do_sample, temperature 1, top_p 1, top_k 0, no EOS",
               ratio=result["ours"]["tok_s"] / result["hf"]["tok_s"], **result)
    if args.compile:
        out["ratio_compiled"] = result["compiled"]["tok_s"] / result["hf"]["tok_s"]
    if device.startswith("cuda"):
        fastest = result.get("compiled", result["ours"])
        step_s = (fastest["total_s"] - fastest["prefill_s"]) / (N - 1)
        nbytes = decode_bytes(ours, B, P + N // 2)
        peak = next((v for k, v in HBM_GBS.items() if k in out["machine"]), args.peak_gbs)
        out["roofline"] = dict(bytes_per_step=nbytes, step_s=step_s, achieved_gbs=nbytes / step_s / 1e9,
                               peak_gbs=peak, fraction=nbytes / step_s / 1e9 / peak,
                               roofline_decode_tok_s=B * peak * 1e9 / nbytes)
    return out


def print_gen(r: dict):
    print(f"gen {r['size']} ({r['params'] / 1e6:.1f}M params) {r['dtype']} on {r['machine']}, {r['threads']} threads; "
          f"B={r['batch']} P={r['prompt_len']} N={r['new_tokens']}, {r['sampling']}")
    print(f"{'':9}{'total s':>9}{'prefill s':>11}{'tok/s':>10}{'decode tok/s':>14}")
    for name in (n for n in ("ours", "compiled", "hf") if n in r):
        x = r[name]
        print(f"{name:9}{x['total_s']:9.3f}{x['prefill_s']:11.4f}{x['tok_s']:10.1f}{x['decode_tok_s']:14.1f}")
    print(f"ours / transformers: {r['ratio']:.2f}x new tokens/s (whole generate call)"
          + (f"; compiled: {r['ratio_compiled']:.2f}x" if "ratio_compiled" in r else ""))
    if "roofline" in r:
        f = r["roofline"]
        print(f"decode step {f['step_s'] * 1e3:.2f} ms reads {f['bytes_per_step'] / 1e9:.2f} GB: "
              f"{f['achieved_gbs']:.0f} GB/s = {f['fraction']:.0%} of {f['peak_gbs']:.0f} GB/s "
              f"(roofline {f['roofline_decode_tok_s']:.0f} tok/s)")


# --------------------------------------------------------------------------- step: ReMax vs PPO

ALGOS = ("remax", "ppo")
PHASES = ("generate", "reward", "logprobs", "backward", "optimizer")


class Models:
    """Random-init models of one shape for one algorithm: policy (trained), ref and RM (frozen), critic (PPO).

    The RM's backbone is the policy's and its head random (std 0.02); the critic is a trainable copy of the
    RM (ppo.Critic.from_reward_model), as DS-Chat initialises it. No EOS: responses run new_tokens long.
    """

    def __init__(self, algo: str, size: str, device: str, dtype, seed: int = 0):
        cfg = ModelConfig.from_hf(dict(model_type="llama", **SIZES[size]))
        cfg = replace(cfg, eos_id=None, bos_id=None)
        torch.manual_seed(seed)
        with torch.device(device):
            policy = Transformer(cfg)
        # fp32 init, then the run's dtype; reset_rope keeps RoPE's frequencies in fp32.
        self.policy = policy.init_weights(std=0.02).to(dtype).reset_rope().train()
        self.ref = freeze(copy.deepcopy(self.policy))
        rm = RewardModel.init_from_policy(self.policy, head_std=0.02)
        self.critic = ppo.Critic.from_reward_model(rm).train() if algo == "ppo" else None
        self.reward_fn = ModelReward(rm)                     # freezes rm
        self.rm = rm
        self.opt = _adamw(self.policy)
        self.opt_critic = _adamw(self.critic) if self.critic is not None else None

    def all(self):
        return [m for m in (self.policy, self.ref, self.rm, self.critic) if m is not None]

    def trained(self):
        return [m for m in (self.policy, self.critic) if m is not None]

    def params(self) -> dict:
        names = ("policy", "ref", "rm", "critic")
        return {n: sum(p.numel() for p in m.parameters())
                for n, m in zip(names, (self.policy, self.ref, self.rm, self.critic)) if m is not None}


def _adamw(model):
    # The official scripts' betas; lr is irrelevant to the cost, tiny so that the weights stay sane.
    return torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)


class Clock:
    """Seconds per phase of one step, each interval synchronised on CUDA; a phase timed inside another (the
    reward inside the rollout, the updates inside ppo_step) is taken out of the outer one."""

    def __init__(self, device: str):
        self.device, self.t, self.inner = device, dict.fromkeys(PHASES, 0.0), [0.0]

    @contextmanager
    def __call__(self, phase: str):
        sync(self.device)
        self.inner.append(0.0)                  # time spent in phases nested in this one
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            dt = time.perf_counter() - t
            self.t[phase] += dt - self.inner.pop()
            self.inner[-1] += dt

    def scored(self, reward_fn):
        def fn(*a):
            with self("reward"):
                return reward_fn(*a)
        return fn

    def update(self, model, optimizer, loss, token_mask=None):
        """ppo._update, its backward and its optimizer step timed apart."""
        with self("backward"):
            loss.backward()
        with self("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norm.item(), loss.item()


def remax_step(m: Models, prompt, prompt_mask, new_tokens: int, clock: Clock, gen) -> None:
    """Algorithm 1 as train.py runs it: rollout with the greedy baseline, ref log-probs, loss, backward, AdamW."""
    with clock("generate"):
        ro = remax.rollout(m.policy, prompt, prompt_mask, clock.scored(m.reward_fn), baseline="greedy",
                           max_new_tokens=new_tokens, generator=gen)
    with clock("logprobs"):
        with torch.no_grad():
            ref_logp, _ = response_logprobs(m.ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
        logp, _ = response_logprobs(m.policy, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
        loss, _ = remax.remax_loss(logp, logp.detach(), ref_logp, ro.reward, ro.baseline, ro.response_mask,
                                   **remax.ALGORITHM_1)
    clock.update(m.policy, m.opt, loss)


def ppo_step(m: Models, prompt, prompt_mask, new_tokens: int, clock: Clock, gen) -> None:
    """DS-Chat step 3 with its defaults: one sample per prompt, RM score, ref log-probs and values, ppo.ppo_step."""
    with clock("generate"):
        ro = remax.rollout(m.policy, prompt, prompt_mask, clock.scored(m.reward_fn), baseline="none",
                           max_new_tokens=new_tokens, generator=gen)
    with clock("logprobs"):              # ref log-probs and values, then ppo_step's forwards; its updates timed apart
        logp_ref, values_old = ppo.experience(m.critic, m.ref, ro.prompt, ro.prompt_mask, ro.response,
                                              ro.response_mask)
        ppo.ppo_step(m.policy, m.critic, m.ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask, ro.reward,
                     opt_policy=m.opt, opt_critic=m.opt_critic, update=clock.update, logp_ref=logp_ref,
                     values_old=values_old)


STEPS = {"remax": remax_step, "ppo": ppo_step}


def _prompts(m: Models, batch: int, prompt_len: int, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.randint(3, m.policy.config.vocab_size, (batch, prompt_len), generator=g, device=device)
    return prompt, torch.ones_like(prompt, dtype=torch.bool)


def _rss_bytes() -> int:
    return memory.peak_rss_bytes()


def _free(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def step_one(args, algo: str) -> dict:
    """Time `algo`'s step in this process: build its models, 1 warm-up step, `repeats` timed steps, peak memory."""
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device.startswith("cuda")
    _free(device)
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    m = Models(algo, args.size, device, dtype)
    weights = torch.cuda.memory_allocated() - base if cuda else None
    prompt, prompt_mask = _prompts(m, args.batch, args.prompt_len, device, seed=1)
    gen = torch.Generator(device=device).manual_seed(2)
    step = STEPS[algo]
    step(m, prompt, prompt_mask, args.new_tokens, Clock(device), gen)           # warm-up, creates Adam states
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() - base if cuda else None
    steps = []
    for _ in range(args.repeats):
        clock = Clock(device)
        step(m, prompt, prompt_mask, args.new_tokens, clock, gen)
        steps.append(dict(clock.t, total=sum(clock.t.values())))
    seconds = {k: statistics.median(s[k] for s in steps) for k in (*PHASES, "total")}
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes()
    out = dict(models=len(m.all()), optimizers=len(m.trained()), params=m.params(), seconds=seconds, steps=steps,
               tokens_per_s=args.batch * args.new_tokens / seconds["total"],
               peak_bytes=peak, base_bytes=base, peak_above_base_bytes=peak - base)
    if cuda:
        out.update(weights_bytes=weights, static_bytes=static)
    del m
    _free(device)
    return out


def _child_argv(args, algo: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "step", "--size", args.size, "--batch", str(args.batch),
            "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--device", args.device, "--dtype", args.dtype, "--out", str(out), "--_algo", algo]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def run_step(args) -> dict:
    cuda = args.device.startswith("cuda")
    result = {}
    for algo in ALGOS:
        if cuda:
            result[algo] = step_one(args, algo)
            continue
        # CPU: a fresh process per algorithm, so VmHWM is this algorithm's own high-water mark.
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{algo}.json"
            rc = subprocess.run(_child_argv(args, algo, out), env=dict(os.environ)).returncode
            if rc != 0:
                raise RuntimeError(f"bench.py step: the {algo} subprocess failed (exit code {rc}; its stderr is above)")
            result[algo] = json.loads(out.read_text())
    r, p = result["remax"], result["ppo"]
    ratio = {f"{k}_s": r["seconds"][k] / p["seconds"][k] if p["seconds"][k] else None for k in (*PHASES, "total")}
    ratio.update(peak_memory=r["peak_bytes"] / p["peak_bytes"],
                 peak_memory_above_base=r["peak_above_base_bytes"] / max(p["peak_above_base_bytes"], 1))
    return dict(cmd="step", size=args.size, device=args.device, machine=machine(args.device), dtype=args.dtype,
                threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                params_per_model=p["params"]["policy"], batch=args.batch, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, repeats=args.repeats,
                timing="median over repeats after 1 warm-up step; total = median of the step totals",
                memory=("torch.cuda.max_memory_allocated over the timed steps (weights + Adam states + activations)"
                        if cuda else "peak RSS (VmHWM) of a subprocess per algorithm; base = its peak before building models"),
                remax=r, ppo=p, ratio=ratio)


def _mb(x) -> str:
    return f"{x / 2**20:.0f}"


def print_step(r: dict):
    print(f"step {r['size']} ({r['params_per_model'] / 1e6:.1f}M params per model) {r['dtype']} on {r['machine']}, "
          f"{r['threads']} threads; B={r['batch']} P={r['prompt_len']} N={r['new_tokens']}, {r['repeats']} timed steps")
    cols, fmt = (*PHASES, "total"), lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{'':11}{'models':>7}" + "".join(f"{h + ' s':>10}" for h in ("gen", "reward", "logp", "bwd", "opt", "total"))
          + f"{'peak MB':>9}{'above base':>12}")
    for name in ALGOS:
        x, s = r[name], r[name]["seconds"]
        print(f"{name:11}{x['models']:7d}" + "".join(f"{s[k]:10.3f}" for k in cols)
              + f"{_mb(x['peak_bytes']):>9}{_mb(x['peak_above_base_bytes']):>12}")
    q = r["ratio"]
    print(f"{'remax/ppo':11}{'':7}" + "".join(f"{fmt(q[k + '_s']):>10}" for k in cols)
          + f"{fmt(q['peak_memory']):>9}{fmt(q['peak_memory_above_base']):>12}")


# --------------------------------------------------------------------------- maxbatch

def search_max(fits, start: int = 1, cap: int = 4096, tol: float = 0.0):
    """Largest b in [0, cap] with fits(b), fits monotone: double from `start` until a failure, then bisect
    until hi - lo <= max(1, tol * lo). Returns (b, capped): capped when even `cap` fits."""
    lo, hi, b = 0, None, max(1, start)
    while hi is None:
        b = min(b, cap)
        if not fits(b):
            hi = b
        elif b == cap:
            return cap, True
        else:
            lo, b = b, b * 2
    while hi - lo > max(1, int(tol * lo)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def run_maxbatch(args) -> dict | None:
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device.startswith("cuda")
    if not cuda and not args.smoke:
        print("bench.py maxbatch: needs a CUDA device (--device cuda); on CPU only --smoke runs (simulated limit). "
              "No result written.")
        return None
    result = {}
    for algo in ALGOS:
        _free(device)
        m = Models(algo, args.size, device, dtype)
        step, gen = STEPS[algo], torch.Generator(device=device).manual_seed(2)
        step(m, *_prompts(m, 1, args.prompt_len, device, 1), args.new_tokens, Clock(device), gen)   # Adam states
        trials = []

        def fits(b: int) -> bool:
            ok, t = True, time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                if not cuda and b > args.sim_limit:
                    raise torch.OutOfMemoryError(f"simulated: batch {b} > --sim_limit {args.sim_limit}")
                step(m, *_prompts(m, b, args.prompt_len, device, b), args.new_tokens, Clock(device), gen)
            except torch.OutOfMemoryError:
                ok = False
            for model in m.trained():
                model.zero_grad(set_to_none=True)
            trial = dict(batch=b, fits=ok, seconds=time.perf_counter() - t)
            if cuda:
                trial["peak_bytes"] = torch.cuda.max_memory_allocated()
            _free(device)
            trials.append(trial)
            print(f"maxbatch {algo}: batch {b} {'fits' if ok else 'out of memory'}", flush=True)
            return ok

        best, capped = search_max(fits, args.start, args.max_batch, args.tol)
        peak = next((t.get("peak_bytes") for t in trials if t["batch"] == best), None)
        result[algo] = dict(max_batch=best, capped=capped, models=len(m.all()), peak_bytes_at_max=peak, trials=trials)
        del m, fits
        _free(device)
    r, p = result["remax"]["max_batch"], result["ppo"]["max_batch"]
    return dict(cmd="maxbatch", size=args.size, device=device, machine=machine(device), dtype=args.dtype,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, max_batch_cap=args.max_batch, tol=args.tol,
                simulated=not cuda, sim_limit=None if cuda else args.sim_limit,
                search="double from --start until OOM, then bisect to max(1, tol * lo) rows; one whole step per trial",
                ratio=r / p if p else None, **result)


def print_maxbatch(r: dict):
    sim = f" (SIMULATED limit of {r['sim_limit']} rows: code path only)" if r["simulated"] else ""
    print(f"maxbatch {r['size']} {r['dtype']} on {r['machine']}, P={r['prompt_len']} N={r['new_tokens']}{sim}")
    print(f"{'':8}{'models':>7}{'max batch':>11}{'peak MB':>9}{'trials':>8}")
    for name in ALGOS:
        x = r[name]
        cap = "+" if x["capped"] else ""
        peak = "-" if x["peak_bytes_at_max"] is None else _mb(x["peak_bytes_at_max"])
        print(f"{name:8}{x['models']:7d}{str(x['max_batch']) + cap:>11}{peak:>9}{len(x['trials']):8d}")
    print("remax/ppo max batch: " + ("-" if r["ratio"] is None else f"{r['ratio']:.2f}x"))


COMMANDS = {"gen": (run_gen, print_gen), "step": (run_step, print_step), "maxbatch": (run_maxbatch, print_maxbatch)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("gen", help="new tokens/s: our generate() vs transformers' model.generate")
    gen.add_argument("--size", choices=list(SIZES), default="40m")
    gen.add_argument("--batch", type=int, default=16)
    gen.add_argument("--prompt-len", "--prompt_len", type=int, default=64)
    gen.add_argument("--new-tokens", "--new_tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=3)
    gen.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM GB/s when the GPU name is not known")
    gen.add_argument("--compile", action="store_true", help="also time generate(compile=True): the compiled decode step")
    step = sub.add_parser("step", help="ReMax vs PPO: seconds per training step and phase, peak memory")
    maxb = sub.add_parser("maxbatch", help="ReMax vs PPO: the largest batch whose whole step fits (CUDA)")
    for s in (step, maxb):
        s.add_argument("--size", choices=list(SIZES), default="40m")
        s.add_argument("--prompt-len", "--prompt_len", type=int, default=64)
        s.add_argument("--new-tokens", "--new_tokens", type=int, default=64)
    step.add_argument("--batch", type=int, default=8)
    step.add_argument("--repeats", type=int, default=3)
    step.add_argument("--_algo", choices=ALGOS, default=None, help=argparse.SUPPRESS)   # the CPU subprocess
    maxb.add_argument("--start", type=int, default=1, help="first batch tried (then doubled)")
    maxb.add_argument("--max-batch", "--max_batch", type=int, default=4096, help="stop searching above this")
    maxb.add_argument("--tol", type=float, default=1 / 32, help="bisect until hi - lo <= max(1, tol * lo)")
    maxb.add_argument("--sim-limit", "--sim_limit", type=int, default=5, help="--smoke on CPU: rows that 'fit'")
    for s in sub.choices.values():
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        s.add_argument("--out", default=None, help="JSON result path (default out/bench_<cmd>.json)")
        s.add_argument("--smoke", action="store_true", help="tiny sizes, 1 thread: runs in seconds (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.prompt_len, args.new_tokens, args.repeats = "smoke", 2, 8, 4, 1
        # One thread: tiny ops gain nothing from more, and spinning OpenMP threads crawl on a shared machine.
        args.threads = args.threads or 1
        if args.cmd == "maxbatch":
            args.tol, args.max_batch = 0.0, 64
    args.out = Path(args.out or f"out/bench_{args.cmd}.json")
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["memory"], ["smoke"], ["curves"]):      # scripts of their own: memory.py, smoke.py, curves.py
        return __import__(argv[0]).main(argv[1:])
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.py {args.cmd}: --device {args.device}, but torch {torch.__version__} sees no CUDA device")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    run, show = COMMANDS[args.cmd]
    child = getattr(args, "_algo", None)
    try:
        result = step_one(args, child) if child else run(args)
    finally:
        torch.set_num_threads(threads)       # called in-process (tests): leave the caller's setting alone
    if result is None:                       # nothing measured (maxbatch without CUDA)
        return None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not child:
        show(result)
    return result


if __name__ == "__main__":
    main()
