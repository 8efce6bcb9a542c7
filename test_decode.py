"""Decoding built for a GPU, checked on a CPU (issue 16): the compiled one-token step, no per-token host sync,
fp32 log-probs, attention that keeps to fused kernels. To be merged into test_remax.py."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import model as M
from model import chunked_logprobs, generate, positions_from_mask, response_logprobs
from test_remax import _model_left_padded, _model_tiny

torch.set_num_threads(1)

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
