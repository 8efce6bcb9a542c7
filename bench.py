"""Benchmarks, one subcommand each; every run writes a JSON result and prints a short table.

  python bench.py gen                 # our generate() vs transformers' model.generate, fp32 CPU
  python bench.py gen --device cuda --dtype bfloat16 --size 1b   # + decode GB/s vs the HBM roofline
  python bench.py gen --smoke         # tiny sizes, seconds (the test suite's run)

`gen` times the whole generate call (prefill included) on the same random-init Llama checkpoint,
loaded by both implementations, in one process: same dtype, threads, batch, sampling, EOS disabled.
"""
import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from model import Transformer, generate

# Llama shapes: "40m" is a ~56M-parameter model for CPU, "1b" is Llama-3.2-1B's shape.
SIZES = {
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=176, vocab_size=256),
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

    def run_ours(n):
        return generate(ours, prompt, mask, n, temperature=1.0, top_p=1.0, top_k=0, stop_ids=[], generator=g)[0]

    def run_hf(n):
        gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
        return hf.generate(prompt, attention_mask=mask.long(), generation_config=gc)[:, P:]

    result = {}
    for name, fn in (("ours", run_ours), ("hf", run_hf)):
        total, tokens = best_of(lambda: fn(N), device, args.repeats)
        prefill, _ = best_of(lambda: fn(1), device, args.repeats)
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
    if device.startswith("cuda"):
        step_s = (result["ours"]["total_s"] - result["ours"]["prefill_s"]) / (N - 1)
        nbytes = decode_bytes(ours, B, P + N // 2)
        peak = next((v for k, v in HBM_GBS.items() if k in out["machine"]), args.peak_gbs)
        out["roofline"] = dict(bytes_per_step=nbytes, step_s=step_s, achieved_gbs=nbytes / step_s / 1e9,
                               peak_gbs=peak, fraction=nbytes / step_s / 1e9 / peak,
                               roofline_decode_tok_s=B * peak * 1e9 / nbytes)
    return out


def print_gen(r: dict):
    print(f"gen {r['size']} ({r['params'] / 1e6:.1f}M params) {r['dtype']} on {r['machine']}, {r['threads']} threads; "
          f"B={r['batch']} P={r['prompt_len']} N={r['new_tokens']}, {r['sampling']}")
    print(f"{'':6}{'total s':>9}{'prefill s':>11}{'tok/s':>10}{'decode tok/s':>14}")
    for name in ("ours", "hf"):
        x = r[name]
        print(f"{name:6}{x['total_s']:9.3f}{x['prefill_s']:11.4f}{x['tok_s']:10.1f}{x['decode_tok_s']:14.1f}")
    print(f"ours / transformers: {r['ratio']:.2f}x new tokens/s (whole generate call)")
    if "roofline" in r:
        f = r["roofline"]
        print(f"decode step {f['step_s'] * 1e3:.2f} ms reads {f['bytes_per_step'] / 1e9:.2f} GB: "
              f"{f['achieved_gbs']:.0f} GB/s = {f['fraction']:.0%} of {f['peak_gbs']:.0f} GB/s "
              f"(roofline {f['roofline_decode_tok_s']:.0f} tok/s)")


COMMANDS = {"gen": (run_gen, print_gen)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("gen", help="new tokens/s: our generate() vs transformers' model.generate")
    gen.add_argument("--size", choices=[s for s in SIZES if s != "smoke"], default="40m")
    gen.add_argument("--batch", type=int, default=16)
    gen.add_argument("--prompt-len", type=int, default=64)
    gen.add_argument("--new-tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=3)
    gen.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM GB/s when the GPU name is not known")
    for s in sub.choices.values():
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        s.add_argument("--out", default=None, help="JSON result path (default out/bench_<cmd>.json)")
        s.add_argument("--smoke", action="store_true", help="tiny sizes that run in seconds (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.prompt_len, args.new_tokens, args.repeats = "smoke", 2, 8, 4, 1
    args.out = Path(args.out or f"out/bench_{args.cmd}.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run, show = COMMANDS[args.cmd]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    return result


if __name__ == "__main__":
    main()
