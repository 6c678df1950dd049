"""Time to first token through `longreach serve`: a first question about a long document, then a second,
different question about the same document (the prefix cache's reuse), as a client sees them.

    longreach serve --model smollm2-135m --method dense &          # or --method snapkv:density=0.25, ...
    python docs/examples/serve_ttft.py --model smollm2-135m --tokens 16384

Prints one JSON line per question: tokens in the prompt, tokens reused from the prefix cache, seconds to the
first streamed token and to the end. The document is passkey filler (the eval's passkey task text), so the
answers can be checked too.
"""

from __future__ import annotations

import argparse
import json
import time

import openai

from longreach.eval.tasks.passkey import FILLER, INSTRUCTION, NEEDLE

QUESTIONS = ("\n\nWhat is the pass key? Answer with the number only.", "\n\nWhich number was given as the pass key?")


def document(words: int, key: str = "71432") -> str:
    """About 1.3 tokens a word for SmolLM2's tokenizer; the needle in the middle."""
    pool = FILLER.split(" ")
    filler = " ".join(pool[i % len(pool)] for i in range(words))
    half = len(filler) // 2
    return INSTRUCTION + filler[:half] + NEEDLE.format(key=key) + filler[half:]


def ask(client: openai.OpenAI, model: str, text: str, method: str | None, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, answer, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"method": method} if method else None)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            answer.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens,
            "ttft_s": round(first or float("nan"), 3), "total_s": round(time.perf_counter() - start, 3),
            "answer": "".join(answer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m", help="the id the server serves (see /v1/models)")
    parser.add_argument("--tokens", type=int, default=16384, help="document length, roughly, in tokens")
    parser.add_argument("--method", default=None, help="a per-request method spec (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=3600)
    doc = document(int(args.tokens / 1.3))
    for i, question in enumerate(QUESTIONS, 1):
        row = ask(client, args.model, doc + question, args.method, args.max_tokens)
        print(json.dumps({"question": i, "method": args.method or "server default", **row}), flush=True)


if __name__ == "__main__":
    main()
