"""The reward r(x, a) of ReMax: reward models, the Bradley-Terry loss that trains them, reward functions.

Algorithm 1 line 5 needs one scalar per (prompt, response): r(x, a) for the sampled response and
r(x, ā) for the greedy one, whose reward is the baseline b(x); remax.py puts both in one batch and
calls the reward function once. A reward function is any callable

    reward_fn(prompt [B, P], prompt_mask, response [B, N], response_mask) -> Tensor[B] float32

on the POLICY's tokens (left-padded prompt, right-padded response), so these are interchangeable:
`ModelReward` (a reward model sharing the policy's tokenizer, as in the official code),
`RetokenizedReward` (a reward model with its own tokenizer and chat format: the released
Mistral-7B-Instruct + UltraRM-13B run) and `TextReward` (rule-based rewards for verifiable tasks).

Score position, everywhere: the head is read at the last real token of each row, found from the
mask (never from a pad id, which may equal EOS). A finished response is cut after its first stop
token, so it is scored at that EOS (the official `forward_value`: "the first pad/EOS position after
the prompt"); a truncated response (no EOS) is scored at its last token, with no penalty.
"""
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (ModelConfig, Transformer, checkpoint_index, positions_from_mask, read_json, read_tensors,
                   save_hf_checkpoint)

# Head tensor name by config.json architecture. UltraRM's LlamaRewardModel names its head regression_head.
HEADS = {"LlamaForSequenceClassification": "score.weight", "MistralForSequenceClassification": "score.weight",
         "LlamaRewardModel": "regression_head.weight"}


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last True in each row: where the reward head is read."""
    if not bool(mask.any(-1).all()):
        raise ValueError("mask: every row needs at least one real token to be scored")
    return mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)


class RewardModel(nn.Module):
    """r_phi(x, a): the decoder backbone plus a bias-free scalar head (the paper's step 2 reward model).

    Attribute names are Hugging Face's *ForSequenceClassification ones (`model.*`, `score.weight`), so
    the state dict is the checkpoint. Scores equal transformers' wherever both read the same position:
    transformers takes the last token that is not `pad_token_id` (the last column if no pad id is
    set); we take the last True of the mask, which also handles left-padded prompts and pad == EOS.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config, lm_head=False)
        self.score = nn.Linear(config.dim, 1, bias=False)

    def forward(self, tokens, mask=None):
        """tokens [B, T], mask [B, T] bool (True = real token; default all) -> scores [B] float32."""
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        h = self.model(tokens, positions_from_mask(mask), mask, return_hidden=True)
        last = h[torch.arange(h.shape[0], device=h.device), last_real_index(mask)]
        # [:, 0] of the head output would be a view, which FSDP2 cannot hook for backward. The dot product
        # in fp32: in bf16 a score near 5 moves in steps of 1/32, enough to zero a small r - b.
        return last.float() @ self.score.weight[0].float()

    @classmethod
    def _assemble(cls, config, backbone: dict, head: torch.Tensor, dtype, device) -> "RewardModel":
        # Built on the meta device and filled by assignment: no throwaway random init of a 7B model.
        with torch.device("meta"):
            rm = cls(config)
        rm.model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in backbone.items()}, assign=True)
        rm.model.reset_rope()
        rm.score.weight = nn.Parameter(head.to(device=device, dtype=dtype))
        return rm

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "RewardModel":
        """Load a Llama/Mistral *ForSequenceClassification folder with num_labels 1 (or UltraRM's LlamaRewardModel)."""
        path = Path(path)
        source = path / "config.json"
        d = read_json(source)
        arch = (d.get("architectures") or ["LlamaForSequenceClassification"])[0]
        if arch not in HEADS:
            raise ValueError(f"{source}: architectures {arch!r} is not a reward model (expected one of "
                             f"{', '.join(HEADS)}); start one from a policy with RewardModel.init_from_policy")
        labels = d.get("num_labels", len(d["id2label"]) if "id2label" in d else 1)
        if labels != 1:
            raise ValueError(f"{source}: num_labels={labels}, expected 1 (a scalar reward head)")
        config = ModelConfig.from_hf(d, source=str(source))
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(config, lm_head=False).state_dict().items()}
        where = checkpoint_index(path, shapes | {HEADS[arch]: torch.Size([1, config.dim])})
        state = {k: read_tensors(*w) for k, w in where.items()}
        head = state.pop(HEADS[arch])
        return cls._assemble(replace(config, tie_embeddings=False), state, head, dtype, device)

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, state_dict: dict | None = None, extra_files=()):
        """Write the transformers layout (config.json + safetensors), which AutoModelForSequenceClassification loads.

        state_dict: the full (gathered) weights when the model is sharded; extra_files: e.g. the tokenizer's.
        transformers needs config.pad_id set to score batches of more than one row.
        """
        state = state_dict if state_dict is not None else self.state_dict()
        cfg = self.config.to_hf()
        arch = ("Mistral" if self.config.model_type == "mistral" else "Llama") + "ForSequenceClassification"
        cfg.update(architectures=[arch], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False,
                   torch_dtype=str(state["score.weight"].dtype).removeprefix("torch."))
        save_hf_checkpoint(path, cfg, dict(state), max_shard_bytes, extra_files)

    @classmethod
    def init_from_policy(cls, policy: Transformer, head_std: float = 0.0, generator=None) -> "RewardModel":
        """A reward model to train with `bradley_terry_loss`, its backbone copied from a language model.

        The paper's step 2 starts the RM from a pretrained/SFT model (the official code: OPT-350M, or the
        Llama-2-7B SFT model). The head starts at zero by default, so r = 0 everywhere and the first BT
        loss is exactly log 2; the backbone gets gradient once the head has moved (from step 2 on).
        head_std > 0 draws it from N(0, head_std^2) instead. The copy shares no storage with the policy.
        """
        w = policy.embed_tokens.weight
        backbone = {k: v.detach().clone() for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        head = torch.zeros(1, policy.config.dim, dtype=w.dtype, device=w.device)
        if head_std:
            head.normal_(0.0, head_std, generator=generator)
        return cls._assemble(replace(policy.config, tie_embeddings=False), backbone, head, w.dtype, w.device)


def bradley_terry_loss(r_chosen, r_rejected):
    """Step 2 of the paper: mean over pairs of -log sigmoid(r(x, y_w) - r(x, y_l)), and pairwise accuracy.

    d loss / d r_chosen = -(1 - sigmoid(margin)) / B. logsigmoid keeps huge margins finite. Accuracy
    counts strict wins only (a tie is an error), as the official evaluation's `chosen > rejected`.
    """
    margin = r_chosen.float() - r_rejected.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach()


def freeze(model: nn.Module) -> nn.Module:
    """The reference policy and the reward model are never trained: eval mode, no parameter needs grad.

    They run in the training compute dtype (bf16 in the paper's Llama script): load them with
    `from_pretrained(path, dtype=...)`, which keeps RoPE's frequencies in fp32 (a blanket .to(dtype) would not).
    """
    model.eval()
    model.requires_grad_(False)
    return model


def truncate_at_stop(response, response_mask, stop_ids: list[int]):
    """The response mask up to and including the first stop token (the official first-EOS rule).

    A no-op on `generate`'s masks; it guards against masks that run past the EOS (e.g. all True).
    """
    if not stop_ids:
        return response_mask
    stop = (torch.isin(response, torch.tensor(stop_ids, device=response.device)) & response_mask).int()
    return response_mask & (stop.cumsum(-1) - stop == 0)


def _stop_ids(tokenizer, stop_ids):
    return ([] if tokenizer.eos_id is None else [tokenizer.eos_id]) if stop_ids is None else list(stop_ids)


def decode_rows(tokenizer, prompt, prompt_mask, response, response_mask, stop_ids: list[int]):
    """Policy tokens -> (prompt texts, response texts, finished: list[bool], True where a stop token ended it)."""
    prompt, prompt_mask, response, response_mask = (t.cpu() for t in (prompt, prompt_mask, response, response_mask))
    response_mask = truncate_at_stop(response, response_mask, stop_ids)
    stop = torch.tensor(stop_ids, dtype=torch.long)
    finished = (torch.isin(response, stop) & response_mask).any(-1)
    prompts = tokenizer.decode_batch([r[m].tolist() for r, m in zip(prompt, prompt_mask)])
    responses = tokenizer.decode_batch([r[m].tolist() for r, m in zip(response, response_mask)])
    return prompts, responses, finished.tolist()


class ModelReward:
    """r(x, a) from a reward model that shares the policy's tokenizer and chat format (as in the official code).

    Scores prompt + response as one sequence, at the response's first stop token or, if truncated,
    its last token. Freezes `rm`. stop_ids: default the RM's config.eos_id; [] disables the cut.
    """

    def __init__(self, rm: RewardModel, stop_ids: list[int] | None = None):
        self.rm = freeze(rm)
        self.stop_ids = rm.config.stop_ids if stop_ids is None else list(stop_ids)

    # no_grad rather than inference_mode: the rewards later multiply log-probs that need grad, and
    # inference tensors cannot be saved for backward.
    @torch.no_grad()
    def __call__(self, prompt, prompt_mask, response, response_mask):
        response_mask = truncate_at_stop(response, response_mask, self.stop_ids)
        device = self.rm.score.weight.device
        tokens = torch.cat([prompt, response], 1).to(device)
        mask = torch.cat([prompt_mask, response_mask], 1).to(device)
        return self.rm(tokens, mask).to(prompt.device)


def mistral_to_ultrarm(prompt_text: str, response_text: str) -> str:
    """UltraRM's template "Human: {instruction}\nAssistant: {completion}" for a single-turn Mistral-Instruct
    prompt "[INST] {instruction} [/INST]" (the released ReMax run re-templated its responses this way).
    UltraRM was trained on single turns: any other prompt is an error, not a garbled RM input."""
    m = re.fullmatch(r"\s*\[INST\](.*?)\[/INST\]\s*", prompt_text, flags=re.DOTALL)
    if m is None or "[INST]" in m.group(1):
        raise ValueError(f"--reward_format ultrarm: expected a single-turn Mistral-Instruct prompt "
                         f"'[INST] ... [/INST]', got {prompt_text[:80]!r}")
    return f"Human: {m.group(1).strip()}\nAssistant: {response_text}"


class RetokenizedReward:
    """r(x, a) from a reward model with its own tokenizer and chat format (Mistral-7B-Instruct + UltraRM-13B).

    Per row: decode the policy's prompt and response (up to its first stop token, special tokens
    dropped), text = format_fn(prompt_text, response_text), encode it with the RM's tokenizer (which
    adds the RM's own BOS), and score the right-padded batch at each row's last token. append_eos:
    add the RM's EOS to responses that finished, when that is how the RM was trained (DeepSpeed-Chat
    RMs: yes; UltraRM: no); a truncated response never gets one, so it is scored at its last token.
    The RM sees the whole text: nothing is cut to fit its context.
    """

    def __init__(self, rm: RewardModel, rm_tokenizer, policy_tokenizer, format_fn=mistral_to_ultrarm, *,
                 append_eos: bool = False, stop_ids: list[int] | None = None):
        self.rm, self.rm_tokenizer, self.policy_tokenizer = freeze(rm), rm_tokenizer, policy_tokenizer
        self.format_fn, self.append_eos = format_fn, append_eos
        if append_eos and rm_tokenizer.eos_id is None:
            raise ValueError(f"{getattr(rm_tokenizer, 'path', 'rm_tokenizer')}: append_eos=True but the RM "
                             "tokenizer has no eos_token")
        self.stop_ids = _stop_ids(policy_tokenizer, stop_ids)

    def encode(self, prompt, prompt_mask, response, response_mask) -> list[list[int]]:
        """The RM's token ids for each row (what `__call__` scores)."""
        prompts, responses, finished = decode_rows(self.policy_tokenizer, prompt, prompt_mask, response,
                                                   response_mask, self.stop_ids)
        ids = self.rm_tokenizer.encode_batch([self.format_fn(p, r) for p, r in zip(prompts, responses)])
        eos = [self.rm_tokenizer.eos_id] if self.append_eos else []
        return [row + eos if done else row for row, done in zip(ids, finished)]

    @torch.no_grad()
    def __call__(self, prompt, prompt_mask, response, response_mask):
        ids = self.encode(prompt, prompt_mask, response, response_mask)
        T = max(len(r) for r in ids)
        pad = self.rm_tokenizer.pad_id or 0
        device = self.rm.score.weight.device
        tokens = torch.tensor([r + [pad] * (T - len(r)) for r in ids], device=device)
        mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in ids], device=device)
        return self.rm(tokens, mask).to(prompt.device)


class TextReward:
    """A rule-based r(x, a) for verifiable tasks, from fn(prompts, responses) -> list[float] | Tensor.

    fn gets lists of strings: the policy's tokens decoded, each response up to its first stop token
    (default: the tokenizer's EOS), special tokens dropped.
    """

    def __init__(self, fn, tokenizer, stop_ids: list[int] | None = None):
        self.fn, self.tokenizer = fn, tokenizer
        self.stop_ids = _stop_ids(tokenizer, stop_ids)

    @classmethod
    def from_file(cls, spec: str, tokenizer, stop_ids: list[int] | None = None) -> "TextReward":
        """spec "path/to/file.py:function", the function (prompts: list[str], responses: list[str]) -> list[float]
        (the shape of verl's custom reward function and TRL's reward_funcs). The file runs as Python: your own code."""
        import importlib.util
        path, _, name = spec.rpartition(":")
        if not path or not Path(path).is_file():
            raise ValueError(f"--reward_fn {spec}: expected an existing path/to/file.py:function")
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, name, None)):
            raise ValueError(f"--reward_fn {spec}: {path} defines no function {name!r}")
        return cls(getattr(module, name), tokenizer, stop_ids)

    @torch.no_grad()
    def __call__(self, prompt, prompt_mask, response, response_mask):
        prompts, responses, _ = decode_rows(self.tokenizer, prompt, prompt_mask, response, response_mask,
                                            self.stop_ids)
        r = torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32).detach()
        if r.shape != (len(prompts),):
            raise ValueError(f"reward fn {getattr(self.fn, '__name__', self.fn)!r} returned shape {list(r.shape)}, "
                             f"expected [{len(prompts)}] (one reward per response)")
        return r.to(prompt.device)
