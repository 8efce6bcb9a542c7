"""GPU smoke test: what `torchrun --nproc_per_node=8 train.py` at 7B depends on, checked on one GPU in minutes.

    python smoke.py             # or: python bench.py smoke (CUDA; under 10 minutes)
    python smoke.py --cpu       # tiny shapes, gloo, bf16 on a CPU: the test suite's run

One table. The SDPA kernel each attention call takes in prefill, decode and training (a math fallback is flagged:
it materialises [B, H, T, T]). Our bf16 logits and transformers' (when installed), both against fp32. The
sampler's log-probs (the KV-cached decode forward) against the learner's (one full forward, response_logprobs),
in bf16 and fp32: ReMax takes pi_old = pi_theta, so their gap is a bf16 rollout's off-policy error. Decode
milliseconds per token at the Llama-2-7B shape (4 of its 32 layers, random weights) for 1 and 8 prompts, eager
and compiled; host syncs per generate call (torch.cuda.set_sync_debug_mode). memory.py's plan against one
measured step of each algorithm (check_memory, also the test suite's check on a CPU). train.py end to end under
torchrun --nproc_per_node=1 (NCCL on a GPU) with bf16 and activation checkpointing: SFT, RM, ReMax for 3 steps
with a checkpoint, --resume to step 4, PPO for 3 steps. Exit status 1 when a row fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import memory
from model import ModelConfig, Transformer, generate, positions_from_mask, response_logprobs

REPO = Path(__file__).resolve().parent
SEVEN_B = dict(memory.SHAPES["llama-2-7b"], num_hidden_layers=4)           # 4 of Llama-2-7B's 32 layers
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def config(d: dict, **kw) -> ModelConfig:
    return replace(ModelConfig.from_hf({"model_type": "llama", **d}), eos_id=None, bos_id=None, **kw)


def random_model(c: ModelConfig, device, dtype) -> Transformer:
    with torch.device(device):
        return Transformer(c).init_weights(generator=torch.Generator(device).manual_seed(0)).to(dtype).reset_rope().eval()


def left_padded(batch: int, length: int, vocab: int, device):
    tokens = torch.randint(3, vocab, (batch, length), device=device)
    mask = torch.arange(length, device=device)[None] >= (torch.arange(batch, device=device) % 4 * length // 8)[:, None]
    return tokens.masked_fill(~mask, 0), mask


# --------------------------------------------------------------------------- kernels and numerics

@contextmanager
def sdpa_calls(calls: list, label: str):
    """Record the backend torch's dispatcher picks for every F.scaled_dot_product_attention call (model.py's)."""
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        names = {int(b): name for name, b in torch.nn.attention.SDPBackend.__members__.items()}
        calls.append((label, tuple(q.shape), tuple(k.shape), attn_mask is not None, str(q.dtype)[6:], names[choice]))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    F.scaled_dot_product_attention = spy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def attention_kernels(shape: dict, device, dtype) -> list:
    rows, calls = [], []
    for kv in sorted({shape["num_key_value_heads"], shape["num_attention_heads"]}):     # GQA and MHA
        m = random_model(config(dict(shape, num_key_value_heads=kv, num_hidden_layers=1)), device, dtype)
        tokens, mask = left_padded(2, 64, m.config.vocab_size, device)
        with sdpa_calls(calls, f"prefill kv={kv}"), torch.no_grad():
            m(tokens[:1, :48])                                  # no padding: plain causal
        with sdpa_calls(calls, f"prefill+decode kv={kv}"):
            generate(m, tokens, mask, 2, temperature=0.0)
        m.train().requires_grad_(True)
        with sdpa_calls(calls, f"training kv={kv}"):
            logp, _ = response_logprobs(m, tokens, mask, tokens[:, :16], torch.ones_like(tokens[:, :16], dtype=torch.bool))
            logp.sum().backward()
    for label, q, k, masked, dt, kernel in dict.fromkeys(calls):
        bad = kernel == "MATH" and device.type == "cuda"
        rows.append((f"SDPA {label}", f"{kernel} q{list(q)} k{list(k)}{' masked' if masked else ''} {dt}",
                     False if bad else None))
    return rows or [("SDPA", "no F.scaled_dot_product_attention call seen", False)]


def logits_vs_transformers(device) -> list:
    try:
        import transformers
    except ImportError:
        return [("bf16 logits vs transformers", "transformers not installed", None)]
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg = transformers.LlamaConfig(**dict(SEVEN_B, num_hidden_layers=2), initializer_range=0.02)
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf.save_pretrained(tmp)
        ours = {dt: Transformer.from_pretrained(tmp, dtype=dt, device=device).eval()
                for dt in (torch.float32, torch.bfloat16)}
        tokens, mask = left_padded(4, 96, hf_cfg.vocab_size, device)
        pos = positions_from_mask(mask)
        with torch.no_grad():
            ref = ours[torch.float32](tokens, pos, mask).float().log_softmax(-1)[mask]
            hf.to(device)
            hf_fp32 = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits.log_softmax(-1)[mask]
            hf.to(device, torch.bfloat16)
            hf_bf16 = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits.float().log_softmax(-1)[mask]
            ours_bf16 = ours[torch.bfloat16](tokens, pos, mask).float().log_softmax(-1)[mask]
    err = lambda x: (x - ref).abs().max().item()
    return [("fp32 log-probs, ours vs transformers", f"max |diff| {(hf_fp32 - ref).abs().max().item():.2e}",
             (hf_fp32 - ref).abs().max().item() < 1e-3),
            ("bf16 log-probs vs fp32", f"ours {err(ours_bf16):.3f}, transformers {err(hf_bf16):.3f} (max |diff|)",
             err(ours_bf16) <= 1.5 * err(hf_bf16) + 1e-3)]


def sampler_vs_learner(shape: dict, device) -> list:
    """log pi(a_t) from the decode path (the prefill, then one cached forward per token, as generate runs) and from
    the learner's single forward over prompt + response: equal up to kernel rounding."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        m = random_model(config(shape), device, dtype)
        prompt, mask = left_padded(4, 32, m.config.vocab_size, device)
        resp, rmask = generate(m, prompt, mask, 32, temperature=1.0, generator=torch.Generator(device).manual_seed(0))
        with torch.no_grad():
            learner, _ = response_logprobs(m, prompt, mask, resp, rmask)
            cache, P = m.make_cache(len(prompt), prompt.shape[1] + resp.shape[1]), prompt.shape[1]
            key = torch.cat([mask, rmask], 1)
            steps = [m(prompt, positions_from_mask(mask), mask, cache=cache, last_only=True)[:, -1]]
            for i in range(resp.shape[1] - 1):
                steps.append(m(resp[:, i:i + 1], mask.sum(-1, keepdim=True) + i, key, cache=cache, cache_pos=P + i,
                               last_only=True)[:, -1])
            sampler = torch.stack(steps, 1).float().log_softmax(-1).gather(-1, resp[..., None])[..., 0]
        d = (sampler - learner).abs()[rmask]
        tol = 1e-4 if dtype == torch.float32 else 0.1
        rows.append((f"sampler vs learner log-probs, {str(dtype)[6:]}", f"max |diff| {d.max().item():.2e}, mean "
                     f"{d.mean().item():.2e}", d.max().item() < tol))
    return rows


def decode_speed(shape: dict, device, label: str) -> list:
    rows, m = [], random_model(config(shape), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for batch in (1, 8):
        prompt, mask = left_padded(batch, 128, m.config.vocab_size, device)
        for compile in (False, True) if device.type == "cuda" else (False,):
            run = partial(generate, m, prompt, mask, 64, temperature=1.0, compile=compile)
            run()                                                            # warm-up (and compilation)
            torch.cuda.synchronize() if device.type == "cuda" else None
            t = time.perf_counter()
            resp, _ = run()
            torch.cuda.synchronize() if device.type == "cuda" else None
            ms = 1000 * (time.perf_counter() - t) / resp.shape[1]
            rows.append((f"decode {label}, {batch} prompt(s), {'compiled' if compile else 'eager'}",
                         f"{ms:.1f} ms/token ({batch * 1000 / ms:.0f} tokens/s)", None))
    return rows


def host_syncs(shape: dict, device) -> list:
    if device.type != "cuda":
        return [("host syncs per generate call", "CUDA only", None)]
    m = random_model(config(shape), device, torch.bfloat16)
    prompt, mask = left_padded(8, 128, m.config.vocab_size, device)
    generate(m, prompt, mask, 64)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            generate(m, prompt, mask, 64)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    n = sum("synchroniz" in str(w.message) for w in seen)
    return [("host syncs per generate call (64 tokens)", str(n), None)]


# --------------------------------------------------------------------------- memory: the plan against a measured step

class Meter:
    """Peak memory of consecutive phases above a base: CUDA's allocator statistics, or the kernel's VmHWM (reset
    through /proc/self/clear_refs), with free()d heap pages handed back first so RSS counts live tensors."""

    def __init__(self, device: torch.device):
        self.cuda, self.peaks, self.name = device.type == "cuda", {}, None
        self.base = self.now()

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def phase(self, name: str | None):
        """Close the current phase (its peak above base; the largest if it ran before) and start `name`."""
        if self.name is not None:
            peak = torch.cuda.max_memory_allocated() if self.cuda else memory.peak_rss_bytes()
            self.peaks[self.name] = max(self.peaks.get(self.name, 0), peak - self.base)
        self.name = name
        self.now()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def write_checkpoints(root: Path, policy: ModelConfig, reward: ModelConfig, dtype):
    """Random policy and reward model (no EOS: every response runs max_new_tokens long), and a tiny warm-up model."""
    from reward import RewardModel
    Transformer(replace(policy, eos_id=None, bos_id=None)).init_weights().to(dtype).save_pretrained(root / "policy")
    rm = Transformer(replace(reward, eos_id=None, bos_id=None)).init_weights()
    RewardModel.init_from_policy(rm, head_std=0.02).to(dtype).save_pretrained(root / "rm")
    Transformer(config(TINY)).init_weights().save_pretrained(root / "tiny")


def measure(spec: dict) -> dict:
    """Run in a fresh process: a warm-up step (AdamW's states), then one measured step of spec["algo"] as train.py
    runs it (fsdp.load_model, remax.remax_step or ppo.ppo_iteration, fsdp.make_update) and metrics.eval_policy.
    Peaks of memory.plan's phases above the base: this process after a tiny model's forward and backward, so
    one-time library allocations are not counted."""
    import data
    import fsdp
    import metrics
    import ppo
    import remax
    from reward import ModelReward, RewardModel
    ctx, dtype, root = fsdp.Dist(spec["device"]), getattr(torch, spec["dtype"]), Path(spec["checkpoints"])
    tiny = fsdp.load_model(root / "tiny", ctx, dtype, True)
    tiny(torch.ones(1, 4, dtype=torch.long, device=ctx.device)).sum().backward()
    del tiny
    meter, ac = Meter(ctx.device), spec["activation_checkpointing"]
    policy = fsdp.load_model(root / "policy", ctx, dtype, True, activation_checkpointing=ac)
    ref = fsdp.load_model(root / "policy", ctx, dtype, False)
    reward_fn = ModelReward(fsdp.load_model(root / "rm", ctx, dtype, False, RewardModel))
    adamw = partial(fsdp.adamw, lr=1e-7, weight_decay=0.1, betas=(0.9, 0.95))
    opt = adamw(policy)
    if spec["algo"] == "ppo":
        critic = fsdp.load_model(root / "rm", ctx, dtype, True, ppo.Critic, activation_checkpointing=ac)
        step = partial(ppo.ppo_iteration, critic=critic, critic_optimizer=adamw(critic))
        optimizers = [opt, step.keywords["critic_optimizer"]]
    else:
        step, optimizers = partial(remax.remax_step, loss_opts=remax.OFFICIAL), [opt]
    for o in optimizers:
        o.register_step_pre_hook(lambda *_: meter.phase("optimizer step"))
        o.register_step_post_hook(lambda *_: meter.phase("loss and backward"))

    @contextmanager
    def gather(model):
        meter.phase("rollout")
        with fsdp.gathered(model) as m:
            yield m
        meter.phase("loss and backward")

    b, e, P, N = spec["batch_size"], spec["eval_size"], spec["max_prompt_len"], spec["max_new_tokens"]
    tokens, mask = left_padded(max(b, e), P, policy.config.vocab_size, ctx.device)
    prompts = [t[m].tolist() for t, m in zip(tokens, mask)]
    prompt, prompt_mask = data.left_pad(prompts[:b], 0, ctx.device)
    sampling = dict(max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0, pad_id=0,
                    generator=torch.Generator(ctx.device).manual_seed(2))
    update = fsdp.make_update(ctx, 1e-7, 1.0)
    step(policy, ref, reward_fn, prompt, prompt_mask, opt, update, gather=fsdp.gathered, **sampling)
    meter.phase(None)
    meter.peaks["between steps"] = meter.now() - meter.base
    step(policy, ref, reward_fn, prompt, prompt_mask, opt, update, gather=gather, **sampling)
    meter.phase("evaluation")
    metrics.eval_policy(policy, ref, reward_fn, prompts[:e], ctx, pad_id=0, max_new_tokens=N, temperature=1.0,
                        top_p=1.0, top_k=0, seed=3)
    meter.phase(None)
    return meter.peaks | {"peak": max(meter.peaks.values())}


def check_memory(policy: str, *, batch_size: int, max_prompt_len: int, max_new_tokens: int, dtype: str, device: str,
                 activation_checkpointing: bool = False, eval_size: int = 0) -> dict:
    """memory.plan's phases at world 1 next to one measured step of each algorithm (`measure`, a fresh process each,
    so neither carries the other's high-water mark): memory.run's result with "measured" added."""
    args = memory.parse_args(["--policy", policy, "--world", "1", "--batch_size", str(batch_size), "--max_prompt_len",
                              str(max_prompt_len), "--max_new_tokens", str(max_new_tokens), "--dtype", dtype,
                              "--eval_size", str(eval_size or batch_size),
                              "--activation_checkpointing" if activation_checkpointing else "--no-activation_checkpointing"])
    result = memory.run(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(Path(tmp), memory.shape(policy), memory.shape(policy), getattr(torch, dtype))
        for algo in ("remax", "ppo"):
            spec = dict(vars(args), algo=algo, device=device, checkpoints=tmp, eval_size=eval_size or batch_size)
            p = subprocess.run([sys.executable, __file__, "--_measure", json.dumps(spec)], capture_output=True,
                               text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if p.returncode:
                raise RuntimeError(f"smoke.py: measuring {algo} failed:\n{p.stderr[-3000:]}")
            result[algo]["measured"] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def memory_rows(r: dict) -> list:
    out = []
    for algo in ("remax", "ppo"):
        plan, meas = r[algo]["phases"], r[algo]["measured"]
        worst = max((plan[k] / meas[k] - 1 for k in meas if k != "peak"), key=abs)
        out.append((f"memory plan vs measured, {algo}", f"peak {plan['peak'] / 2**30:.2f} / {meas['peak'] / 2**30:.2f} GB "
                    f"({plan['peak'] / meas['peak'] - 1:+.0%}; worst phase {worst:+.0%})",
                    abs(plan["peak"] / meas["peak"] - 1) <= 0.15))
    return out


# --------------------------------------------------------------------------- train.py end to end

def train_end_to_end(device: str) -> list:
    """SFT, RM, ReMax 3 steps with a checkpoint, --resume to step 4, PPO 3 steps: torchrun, bf16, checkpointing."""
    import data
    from model import Tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = data.write_synthetic_jsonl(root / "data", seed=0, n_sft=32, n_pref=32, n_rl=32, n_eval=8)
        tok = Tokenizer(data.write_char_tokenizer(root / "tok"))
        init = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, bos_id=1, eos_id=2, pad_id=0)
        Transformer(ModelConfig(**init)).init_weights().save_pretrained(root / "init", extra_files=tok.files())
        common = ["--prompt_format", "chat", "--max_prompt_len", "16", "--dtype", "bfloat16", "--activation_checkpointing",
                  "--device", device, "--batch_size", "8"]
        rl = ["--stage", "remax", "--policy", root / "sft/final", "--reward_model", root / "rm/final", "--data",
              files["remax"], "--eval_data", files["eval"], "--eval_size", "8", "--max_new_tokens", "8", *common]
        runs = [("sft", ["--stage", "sft", "--policy", root / "init", "--data", files["sft"], "--max_len", "32",
                         "--max_steps", "2", *common]),
                ("rm", ["--stage", "rm", "--policy", root / "sft/final", "--data", files["rm"], "--max_len", "32",
                        "--eval_size", "8", "--max_steps", "2", *common]),
                ("remax, 3 steps, checkpoint at 2", [*rl, "--max_steps", "3", "--save_every", "2"]),
                ("remax --resume to step 4", [*rl, "--max_steps", "4", "--save_every", "2", "--resume"]),
                ("ppo, 3 steps", [*rl, "--algo", "ppo", "--max_steps", "3", "--out_dir", root / "ppo"])]
        for name, args in runs:
            out = ["--out_dir", root / name.split(",")[0].split()[0]] if "--out_dir" not in args else []
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                str(REPO / "train.py"), *map(str, args + out)], capture_output=True, text=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            ok = p.returncode == 0 and ("--resume" not in args or "continuing after step 2" in p.stdout)
            last = (p.stderr.strip().splitlines() or ["?"])[-1] if p.returncode else f"{time.perf_counter() - t:.0f} s"
            rows.append((f"train.py {name} (torchrun, bf16, AC)", last[:90], ok))
    return rows


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on a CPU, gloo (the test suite's run)")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)        # check_memory's child process
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(json.loads(args._measure))))
        return []
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("smoke.py: no CUDA device; run with --cpu for the tiny CPU version")
    device = torch.device("cpu" if args.cpu else "cuda")
    shape, label = (TINY, "tiny shape") if args.cpu else (SEVEN_B, "Llama-2-7B shape, 4 of 32 layers")
    rows = attention_kernels(shape, device, torch.bfloat16 if not args.cpu else torch.float32)
    rows += logits_vs_transformers(device) if not args.cpu else []
    rows += sampler_vs_learner(shape, device) + decode_speed(shape, device, label) + host_syncs(shape, device)
    if not args.cpu:
        rows += memory_rows(check_memory("360m", batch_size=8, max_prompt_len=128, max_new_tokens=128, dtype="bfloat16",
                                         device="cuda", activation_checkpointing=True, eval_size=8))
    rows += train_end_to_end(device.type)
    width = max(len(r[0]) for r in rows)
    print(f"smoke test on {torch.cuda.get_device_name() if not args.cpu else 'CPU'}, torch {torch.__version__}")
    for name, result, ok in rows:
        print(f"{'FAIL' if ok is False else 'ok  ' if ok else '    '} {name:{width}}  {result}")
    if any(ok is False for _, _, ok in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)            # skip interpreter teardown: the distributed threads can abort it (see fsdp.py)
