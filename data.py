"""Data for the paper's three steps: SFT pairs (step 1), preference pairs for the Bradley-Terry reward
model (step 2) and the prompts x ~ rho of ReMax (step 3, Algorithm 1 line 2), plus a built-in task.

Every reader returns the same records, whatever the JSONL layout:
    prompt      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "source": "f.jsonl:7"}
    SFT         the same + "response": str
    preference  the same + "chosen": str, "rejected": str
`messages` is the conversation up to the response (its last turn is the user's); `source` names the file
and line for every later error. The space after "Assistant:" in HH text is the format's, not the response's.

Prompt formats: "chat" renders the checkpoint's own chat_template (tokenizer_config.json) with jinja2
exactly as transformers' apply_chat_template does, "hh" is Anthropic's "\\n\\nHuman: ...\\n\\nAssistant:"
(the official scripts' Dahoas prompts, reproduced byte for byte), "plain" is one user message as is;
"auto" is chat when the tokenizer has a template, else hh. Every response gets the EOS appended: the
first EOS is an action (official), so SFT trains it and the reward model scores there.
"""
import json
import math
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat", "hh", "plain")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_SPLIT = "\n\nAssistant:"


def read_prompts(path) -> list[dict]:
    """Prompt records. SFT and preference files are read too (their responses are ignored), so the
    RL split of a Dahoas file gives the official step-3 prompts."""
    return [_record(row, where, "prompt") for where, row in _rows(path)]


def read_sft(path) -> list[dict]:
    """SFT records from {"prompt", "response"}, {"messages": [..., assistant]} or Dahoas rows (the
    official step 1 trains on prompt + chosen)."""
    return [_record(row, where, "sft") for where, row in _rows(path)]


def read_preferences(path) -> list[dict]:
    """Preference records from Dahoas rm-static / full-hh-rlhf rows {"prompt", "chosen", "rejected"},
    raw Anthropic HH rows {"chosen", "rejected"} (full transcripts, split at the last "\\n\\nAssistant:")
    or conversations (chosen / rejected as message lists ending with the assistant's answer)."""
    return [_record(row, where, "preference") for where, row in _rows(path)]


def write_jsonl(path, records) -> Path:
    """Records as JSONL in the simplest layout that reads back to them ("prompt" when one user turn)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            m = r["messages"]
            row = {"prompt": m[0]["content"]} if len(m) == 1 and m[0]["role"] == "user" else {"messages": m}
            row.update({k: r[k] for k in ("response", "chosen", "rejected") if k in r})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _rows(path):
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "file not found"
        raise FileNotFoundError(f"{path}: {what} (expected a JSONL file, one JSON object per line)")
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")    # a leading BOM is no data
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text (expected one JSON object per line)") from None
            if not line.strip():
                continue                            # a blank line holds no example: nothing is skipped
            try:
                row = json.loads(line.rstrip("\r\n"))     # so that colno counts within this line
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); "
                                 "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise ValueError(f"{path}: empty file (expected one JSON object per line)")
    return rows


def _record(row: dict, where: str, kind: str) -> dict:
    answers, hh = {}, False
    if "prompt" in row:
        messages, hh = _prompt_messages(row["prompt"], f"{where}: 'prompt'")
    elif "messages" in row:
        messages = _messages(row["messages"], f"{where}: 'messages'")
        if messages and messages[-1]["role"] == "assistant":
            answers["response"] = messages.pop()["content"]
    elif "chosen" in row and "rejected" in row:
        messages, answers["chosen"], answers["rejected"] = _split_pair(row["chosen"], row["rejected"], where)
    else:
        raise ValueError(f"{where}: expected a 'prompt' or 'messages' field (or Anthropic HH 'chosen' and 'rejected' "
                         f"transcripts), got fields {sorted(row)}")
    for k in ("response", "chosen", "rejected"):
        if k in row and k not in answers:
            answers[k] = _answer(row[k], messages, f"{where}: {k!r}", hh)
    if not messages or messages[-1]["role"] != "user":
        last = messages[-1]["role"] if messages else "no turns"
        raise ValueError(f"{where}: the prompt must end with a user turn (got {last})")
    record = {"messages": messages, "source": where}
    if kind == "sft":
        if "response" not in answers and "chosen" not in answers:
            raise ValueError(f"{where}: expected a 'response' (or 'chosen') field or a final assistant message")
        record["response"] = answers.get("response", answers.get("chosen"))
    elif kind == "preference":
        for k in ("chosen", "rejected"):
            if k not in answers:
                raise ValueError(f"{where}: expected a {k!r} field (preference pair: prompt, chosen, rejected)")
            record[k] = answers[k]
    return record


def _prompt_messages(value, where) -> tuple[list[dict], bool]:
    """A prompt string that starts with "Human:" is an HH transcript; any other string is one user turn."""
    if isinstance(value, str):
        if value.lstrip("\n").startswith("Human:"):
            return parse_hh(value), True
        return [{"role": "user", "content": value}], False
    return _messages(value, where), False


def _messages(value, where) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a string or a list of {{'role', 'content'}} messages, "
                         f"got {type(value).__name__}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}[{i}]: expected {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                             f"got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value, messages, where, hh: bool) -> str:
    """A response: a string, or a message list ending with the assistant's turn (after the prompt's turns)."""
    if isinstance(value, str):
        return value[1:] if hh and value.startswith(" ") else value
    turns = _messages(value, where)
    if not turns or turns[-1]["role"] != "assistant" or turns[:-1] not in ([], messages):
        raise ValueError(f"{where}: expected a string or messages ending with the assistant's answer to the prompt")
    return turns[-1]["content"]


def _split_pair(chosen, rejected, where):
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut_c, cut_r = chosen.rfind(HH_SPLIT), rejected.rfind(HH_SPLIT)
        if cut_c < 0 or cut_r < 0:
            raise ValueError(f"{where}: 'chosen' and 'rejected' must be HH transcripts containing {HH_SPLIT!r}")
        prompt = chosen[:cut_c + len(HH_SPLIT)]
        if rejected[:cut_r + len(HH_SPLIT)] != prompt:
            raise ValueError(f"{where}: 'chosen' and 'rejected' differ before their last {HH_SPLIT!r} "
                             "(expected one shared prompt)")
        messages = parse_hh(prompt)
        return messages, *(_answer(t[len(prompt):], messages, where, True) for t in (chosen, rejected))
    c, r = _messages(chosen, f"{where}: 'chosen'"), _messages(rejected, f"{where}: 'rejected'")
    if not (c and r and c[-1]["role"] == r[-1]["role"] == "assistant" and c[:-1] == r[:-1]):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must share the prompt turns and end with an assistant turn")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def parse_hh(text: str) -> list[dict]:
    """"\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: q2\\n\\nAssistant:" -> messages (format_hh inverts it).

    Text before the first "Human:" is a system message (Anthropic's legacy prompt layout); the final
    empty "Assistant:" is the generation prompt, not a turn.
    """
    parts = HH_TURN.split(text)
    messages = [{"role": "system", "content": parts[0]}] if parts[0] else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant",
                         "content": content[1:] if content.startswith(" ") else content})
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def format_hh(messages: list[dict]) -> str:
    names = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    return "".join(names.get(m["role"], "") + m["content"] for m in messages) + HH_SPLIT


class ChatTemplateError(ValueError):
    """The checkpoint's chat_template itself is broken (not the conversation it was given)."""


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, source: str = "",
                         **special_tokens) -> str:
    """The checkpoint's chat_template rendered as transformers' apply_chat_template does: jinja2's
    ImmutableSandboxedEnvironment (templates are untrusted code), trim_blocks, lstrip_blocks, the
    loopcontrols extension, `raise_exception`, `strftime_now`, a non-escaping `tojson`, and the
    special-token strings (bos_token, eos_token, pad_token) as variables. Unsafe attribute access
    (__class__, __globals__, ...) raises. Every failure is one ValueError naming `source` and the line: a
    ChatTemplateError if the template is broken, else its raise_exception refused the conversation."""
    try:
        import jinja2
    except ImportError:
        raise ImportError("prompt format 'chat' renders chat_template with jinja2: pip install 'jinja2>=3.1.6'") from None
    where = f"{source}: chat_template" if source else "chat_template"
    try:
        return _compile_template(template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **special_tokens)
    except ValueError as e:                 # its raise_exception refused these messages: the data's problem
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:                  # the template is untrusted code: any other failure is the template's
        tb, line = e.__traceback__, getattr(e, "lineno", None)
        while tb:                           # jinja2 maps runtime errors to the template's own line
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == "<template>" else line
            tb = tb.tb_next
        kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
        raise ChatTemplateError(f"{where}{f' line {line}' if line else ''}: {kind}{e}") from None


@lru_cache(maxsize=8)
def _compile_template(template: str):
    import datetime
    import jinja2
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    class Sandbox(ImmutableSandboxedEnvironment):
        """Refuses unsafe attributes (__class__, __subclasses__, ...) outright: the stock sandbox renders
        `{{ x.__class__ }}` as an empty string and only fails once the result is used."""
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env.from_string(template)


def resolve_format(fmt: str, tok) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"prompt format: expected one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        return "chat" if tok.chat_template else "hh"
    if fmt == "chat" and not tok.chat_template:
        raise ValueError("prompt format 'chat': the tokenizer has no chat_template (tokenizer_config.json); "
                         "use 'hh' or 'plain'")
    return fmt


def format_prompt(messages: list[dict], fmt: str, tok) -> str:
    """The prompt text the policy continues (fmt: auto, chat, hh or plain)."""
    fmt = resolve_format(fmt, tok)
    if fmt == "chat":
        special = {f"{n}_token": tok.decode([i], skip_special_tokens=False)
                   for n, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)) if i is not None}
        return render_chat_template(tok.chat_template, messages, True, getattr(tok, "chat_template_source", ""),
                                    **special)
    if fmt == "hh":
        return format_hh(messages)
    if len(messages) != 1:
        raise ValueError(f"prompt format 'plain' takes one user message, got {len(messages)} turns; use 'hh' or 'chat'")
    return messages[0]["content"]


def encode_prompts(tok, records, fmt="auto", max_len=256, overlong="truncate") -> tuple[list[list[int]], dict]:
    """Token ids of each formatted prompt, and the counts {"prompts_truncated": n, ...}.

    overlong="truncate" keeps an over-long prompt's last max_len tokens (official step 3, which keeps
    max_len - 1 and so also drops the BOS); overlong="error" (or "reject") raises, naming the record's
    file and line.
    """
    examples, counts = _encode(tok, records, (), fmt, max_len, 0, overlong)
    return [p for p, in examples], counts


def encode_sft(tok, records, fmt="auto", max_prompt_len=256, max_response_len=256,
               overlong="truncate") -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(prompt ids, response ids + EOS) per record, and {"prompts_truncated", "responses_truncated"}.

    The response tokens are those of the whole text after the prompt's tokens, as the policy will
    generate them (or, if the tokenizer merges across that boundary, the response encoded alone). A
    response longer than max_response_len (EOS included) keeps its first max_response_len tokens and
    no EOS, so a truncated answer is never taught to end there; overlong="error" raises instead.
    """
    return _encode(tok, records, ("response",), fmt, max_prompt_len, max_response_len, overlong)


def encode_preferences(tok, records, fmt="auto", max_prompt_len=256, max_response_len=256,
                       overlong="truncate") -> tuple[list[tuple[list[int], list[int], list[int]]], dict]:
    """(prompt ids, chosen ids + EOS, rejected ids + EOS) per record, and the counts (as encode_sft)."""
    return _encode(tok, records, ("chosen", "rejected"), fmt, max_prompt_len, max_response_len, overlong)


def _encode(tok, records, keys, fmt, max_prompt_len, max_response_len, overlong):
    if overlong not in ("truncate", "error", "reject"):       # "reject": the older name of "error"
        raise ValueError(f"overlong: expected 'truncate' or 'error', got {overlong!r}")
    fmt = resolve_format(fmt, tok)
    if keys and tok.eos_id is None:
        raise ValueError("the tokenizer has no eos_token (tokenizer_config.json or config.json eos_token_id); "
                         "every response ends with EOS")
    counts = {"prompts_truncated": 0, "responses_truncated": 0}
    out = []
    for r in records:
        prompt, text = _prompt_ids(tok, r, fmt, max_prompt_len, overlong, counts)
        out.append((prompt, *(_response_ids(tok, r, k, text, fmt, max_response_len, overlong, counts) for k in keys)))
    return out, counts


def _prompt_ids(tok, record, fmt, max_len, overlong, counts) -> tuple[list[int], str]:
    where = record.get("source", "record")
    try:
        text = format_prompt(record["messages"], fmt, tok)
    except ChatTemplateError:
        raise                               # the checkpoint's template is broken, not this record
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not text.strip() or not any(m["content"].strip() for m in record["messages"]):
        raise ValueError(f"{where}: empty prompt after formatting ({fmt}); expected some text")
    # A chat template writes the BOS itself, so its text is encoded without the tokenizer's specials.
    ids = tok.encode(text, add_special_tokens=fmt != "chat")
    if len(ids) > max_len:
        if overlong != "truncate":
            raise ValueError(f"{where}: prompt has {len(ids)} tokens, more than the maximum {max_len} "
                             "(--max_prompt_len; --overlong truncate keeps the last ones)")
        ids = ids[len(ids) - max_len:]
        counts["prompts_truncated"] += 1
    return ids, text


def _response_ids(tok, record, key, prompt_text, fmt, max_len, overlong, counts) -> list[int]:
    text = (" " if fmt == "hh" else "") + record[key]
    special = fmt != "chat"
    head = tok.encode(prompt_text, add_special_tokens=special)
    whole = tok.encode(prompt_text + text, add_special_tokens=special)
    ids = whole[len(head):] if whole[:len(head)] == head else tok.encode(text, add_special_tokens=False)
    if len(ids) + 1 > max_len:
        if overlong != "truncate":
            raise ValueError(f"{record.get('source', 'record')}: {key} has {len(ids) + 1} tokens with EOS, "
                             f"more than the maximum {max_len} (--max_len minus --max_prompt_len)")
        counts["responses_truncated"] += 1
        return ids[:max_len]
    return ids + [tok.eos_id]


def left_pad(seqs, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (tokens [B, P] long, mask [B, P] bool), left-padded: every response starts at column P."""
    return _pad(seqs, pad_id, True, device)


def _pad(seqs, pad_id, left, device):
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        tokens[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return tokens.to(device), mask.to(device)


def sft_batch(examples, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, response) pairs -> tokens [B, T], mask [B, T], loss_mask [B, T], right-padded.

    loss_mask is True on the response tokens (EOS included): token t is predicted from the logits at
    t - 1, so the loss is -sum(logp(tokens[:, 1:]) * loss_mask[:, 1:]); the prompt is never trained on.
    """
    tokens, mask = _pad([p + r for p, r in examples], pad_id, False, device)
    loss_mask, _ = _pad([[0] * len(p) + [1] * len(r) for p, r in examples], 0, False, device)
    return tokens, mask, loss_mask.bool()


def preference_batch(examples, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, chosen, rejected) -> tokens [2B, T], mask [2B, T], right-padded: rows :B are the chosen
    sequences, rows B: the rejected ones, so the reward model scores both (at the last real token,
    the EOS) in one forward."""
    return _pad([p + c for p, c, _ in examples] + [p + r for p, _, r in examples], pad_id, False, device)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Example indices of global batch `step` (this rank's contiguous 1/world of it) -> LongTensor.

    Each epoch is a fresh permutation drawn from (seed, epoch), so every rank computes the same order
    without communication and every rank gets the same number of batches. The last n % batch_size
    examples of each epoch's permutation (a different random subset every epoch) are left out of that
    epoch: the caller logs n % batch_size.
    """
    if batch_size % world or n < batch_size:
        raise ValueError(f"batch size {batch_size} must be divisible by the world size {world}" if batch_size % world
                         else f"{n} examples are fewer than one batch of {batch_size}")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    b = batch_size // world
    start = i * batch_size + rank * b
    return torch.from_numpy(order[start:start + b].astype(np.int64))


def split_records(records: list, weights=(2, 4, 4), seed: int = 1234) -> list[list]:
    """The paper's split (official data_split 2,4,4: SFT 20% / RM 40% / RL 40%, data seed 1234).

    Same rows as DeepSpeed-Chat's get_raw_dataset_split_index: numpy RandomState(seed) shuffles the
    indices, part sizes are rounded and any rounding excess is taken from the first part.
    """
    n = len(records)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / sum(weights) * n)))
    excess = bounds[-1] - n
    bounds = [0] + [b - excess for b in bounds[1:]]
    if any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"split {weights} of {n} records: the rounding excess {excess} is more than the first "
                         "part holds; use more records")
    order = np.arange(n, dtype=np.uint32)
    np.random.RandomState(seed).shuffle(order)
    return [[records[i] for i in order[a:b]] for a, b in zip(bounds, bounds[1:])]


ALPHABET = "abcdefghijklmnop"
DEMO_STOP, DEMO_ERROR = 0.5, 0.1       # the SFT demonstrator: stops early (more likely than it goes on) and errs
PREFERENCE_TEMPERATURE = 0.05          # Bradley-Terry label noise, in gold-score units
NEAR_MISSES = 0.7                      # share of preference pairs that are an answer and one edit of it
MAX_ANSWER_LEN = 10
SYNTHETIC_FILES = {"sft": "sft.jsonl", "rm": "preferences.jsonl", "remax": "prompts.jsonl", "eval": "eval_prompts.jsonl"}
CHARS = "\n :=" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "[]/"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}={{ m['content'] }}{{ eos_token }}"
                 "{% else %}{{ raise_exception('only user and assistant turns') }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")


def gold_score(prompt: str, response: str) -> float:
    """The built-in task's true reward in [0, 1]: 2 LCS(a, L) / (|a| + |L|) (ROUGE-L F1) between the
    response a and the prompt's letters L in order. 1 iff a spells L; a missing, wrong, repeated or
    misplaced letter costs. `prompt`: the record's text or its formatted text (special tokens skipped)."""
    letters = [c for c in prompt.split("Human:")[-1].split(HH_SPLIT)[0] if c in ALPHABET]
    response = response.strip()
    lcs = [0] * (len(response) + 1)
    for c in letters:
        diagonal = 0
        for j, d in enumerate(response, 1):
            diagonal, lcs[j] = lcs[j], diagonal + 1 if c == d else max(lcs[j], lcs[j - 1])
    return 2 * lcs[-1] / (len(response) + len(letters)) if letters or response else 0.0


def synthetic_task(seed: int = 0, n_sft: int = 8000, n_pref: int = 10000, n_rl: int = 1024,
                   n_eval: int = 128) -> dict[str, list[dict]]:
    """The built-in task, generated in code: {"sft", "rm", "remax", "eval"} record lists.

    Prompt: 3-6 distinct letters of ALPHABET in alphabetical order; the best response spells them
    (gold_score). SFT answers come from a mediocre demonstrator: it writes the letters in order but
    stops after each with probability DEMO_STOP and writes a wrong letter with probability DEMO_ERROR.
    Stopping is likelier than the right next letter, so the SFT policy knows the letters but its greedy
    answer is about one letter long: the room that RL has to improve. Preference pairs are, for a
    share NEAR_MISSES, an answer like the demonstrator's and a near miss of it (one letter added, dropped,
    replaced or inserted: the choices a policy that starts from SFT faces), else two answers of a noisier
    sampler. The chosen one is drawn by Bradley-Terry on gold at PREFERENCE_TEMPERATURE, so the labels are
    noisy and the RM only approximates gold. RL and eval prompts never occur in SFT or preference data.
    """
    if n_rl + n_eval > 5000:
        raise ValueError(f"n_rl + n_eval = {n_rl + n_eval}: at most 5000 distinct held-out prompts (of 14756)")
    rng = random.Random(seed)
    draw = lambda: "".join(sorted(rng.sample(ALPHABET, rng.randint(3, 6))))
    held_out = {}
    while len(held_out) < n_rl + n_eval:
        held_out[draw()] = None
    seen = lambda: next(x for x in iter(draw, None) if x not in held_out)
    prompts = {"sft": [seen() for _ in range(n_sft)], "rm": [seen() for _ in range(n_pref)],
               "remax": list(held_out)[:n_rl], "eval": list(held_out)[n_rl:]}
    out = {k: [{"messages": [{"role": "user", "content": x}], "source": f"synthetic:{k}:{i}"} for i, x in enumerate(v)]
           for k, v in prompts.items()}
    for r in out["sft"]:
        r["response"] = _letters_answer(rng, r["messages"][0]["content"], DEMO_STOP, DEMO_ERROR, 0.0, False)
    for r in out["rm"]:
        x = r["messages"][0]["content"]
        if rng.random() < NEAR_MISSES:
            a = _letters_answer(rng, x, rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.3), 0.0, False)
            b = _near_miss(rng, x, a)
        else:
            knobs = rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.4), rng.uniform(0.0, 0.4), rng.random() < 0.3
            a = _letters_answer(rng, x, *knobs)
            b = next((b for b in (_letters_answer(rng, x, *knobs) for _ in range(10)) if b != a), a)
        p_a = 1 / (1 + math.exp(-(gold_score(x, a) - gold_score(x, b)) / PREFERENCE_TEMPERATURE))
        r["chosen"], r["rejected"] = (a, b) if rng.random() < p_a else (b, a)
    return out


def _letters_answer(rng, letters, stop, error, repeat, shuffle) -> str:
    """Walk the prompt's letters (shuffled or in order): stop, write a wrong letter instead of the next,
    repeat an earlier one, or write the next; once they run out, only a repeating sampler goes on."""
    order = rng.sample(letters, len(letters)) if shuffle else letters
    out, i, others = [], 0, [c for c in ALPHABET if c not in letters]
    while len(out) < MAX_ANSWER_LEN and not (out and rng.random() < stop) and (i < len(order) or repeat):
        u = rng.random()
        if u < error:
            out.append(rng.choice(others))
            i += 1
        elif out and (u < error + repeat or i >= len(order)):
            out.append(rng.choice(out))
        else:
            out.append(order[i])
            i += 1
    return "".join(out)


def _near_miss(rng, letters, answer) -> str:
    """The answer with one edit: the prompt's next letter added, the last or any letter dropped, a
    letter replaced by a wrong one, a wrong or repeated letter appended, or a wrong letter inserted."""
    others = [c for c in ALPHABET if c not in letters]
    edit, i = rng.randrange(6), rng.randrange(len(answer)) if answer else 0
    if edit == 0:
        rest = [c for c in letters if c not in answer]
        return answer + (rest[0] if rest else rng.choice(others))
    if edit in (1, 2) and len(answer) > 1:
        return answer[:-1] if edit == 1 else answer[:i] + answer[i + 1:]
    if edit == 3 and answer:
        return answer[:i] + rng.choice([c for c in others if c != answer[i]]) + answer[i + 1:]
    if edit == 4:
        return answer + rng.choice(others if not answer or rng.random() < 0.5 else answer)
    return answer[:i] + rng.choice(others) + answer[i:]


def write_char_tokenizer(folder) -> Path:
    """The built-in task's tokenizer as a Hugging Face folder (tokenizer.json + tokenizer_config.json):
    one token per character of CHARS (enough for the HH and [INST] formats too), <pad> 0, <s> 1 (prepended by
    encode), </s> 2, <unk> 3, and a chat template "<s>{prompt}={response}</s>"."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *CHARS])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def write_synthetic_jsonl(folder, seed: int = 0, **sizes) -> dict[str, Path]:
    """synthetic_task as JSONL files (sft.jsonl, preferences.jsonl, prompts.jsonl, eval_prompts.jsonl)."""
    task = synthetic_task(seed, **sizes)
    return {k: write_jsonl(Path(folder) / name, task[k]) for k, name in SYNTHETIC_FILES.items()}
