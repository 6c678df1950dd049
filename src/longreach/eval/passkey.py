"""Passkey retrieval: a random number hidden at a chosen depth of repetitive filler.

The prompt is built to an exact token length for the model's tokenizer (within 1%), so lengths
mean the same thing for every model; a seed makes each sample reproducible.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch

PREFIX = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only.\nThe pass key is"
ANSWER = "The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: str
    gold: str
    length: int  # tokens in the prompt
    depth: float  # where the needle sits, 0 = start, 1 = end
    seed: int
    chat: bool = False  # the prompt already holds the chat template: tokenize without special tokens


def make_passkey(tokenizer, length: int, depth: float, seed: int = 0, chat: bool = False) -> PasskeySample:
    """A prompt of ``length`` tokens (+-1%) with the passkey at relative ``depth``.

    With ``chat`` and a tokenizer that has a chat template, the text is the user turn and
    the answer starts the assistant turn, as instruction-tuned models expect.
    """
    use_chat = chat and getattr(tokenizer, "chat_template", None) is not None

    def wrap(body: str) -> str:
        if not use_chat:
            return body + QUESTION
        turn = [{"role": "user", "content": body + QUESTION.removesuffix("\nThe pass key is")}]
        head = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        return head + ANSWER
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(key=key)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=not use_chat)["input_ids"])

    fixed = n_tokens(wrap(PREFIX + needle))
    per_filler = max(1, n_tokens(FILLER * 20) // 20)
    units = max(0, (length - fixed) // per_filler)
    for _ in range(8):  # converge on the exact length
        before = round(units * depth)
        text = wrap(PREFIX + FILLER * before + needle + FILLER * (units - before))
        got = n_tokens(text)
        if abs(got - length) <= max(1, length // 100) or units == 0:
            break
        units = max(0, units + (length - got) // per_filler)
    return PasskeySample(text, key, got, depth, seed, use_chat)


def score_passkey(prediction: str, gold: str) -> float:
    """1.0 when the first number in the continuation is the key."""
    found = re.findall(r"\d+", prediction)
    return float(bool(found) and found[0] == gold)


def run_passkey(model, tokenizer, sample: PasskeySample, max_new_tokens: int = 10) -> dict:
    """Greedy continuation of one sample; returns prediction, score and timings."""
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=not sample.chat).to(model.device)
    with torch.no_grad():
        start = time.perf_counter()
        first = model(**ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        past = first.past_key_values
        token = first.logits[:, -1:].argmax(-1)
        generated = [token]
        start = time.perf_counter()
        mask = ids["attention_mask"]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            step = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
            past = step.past_key_values
            token = step.logits[:, -1:].argmax(-1)
            generated.append(token)
        decode = time.perf_counter() - start
    text = tokenizer.decode(torch.cat(generated, dim=-1)[0], skip_special_tokens=True)
    return {
        "prediction": text.strip(),
        "gold": sample.gold,
        "score": score_passkey(text, sample.gold),
        "prefill_s": prefill,
        "decode_s": decode,
        "decode_tokens": max_new_tokens - 1,
    }
