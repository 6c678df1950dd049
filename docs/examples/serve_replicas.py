"""Spread chat requests over `longreach serve --replicas N` and show which replica answered each and what each
replica's prefix cache did (docs/serve.md, "Scale-out on Ray Serve").

    longreach serve --model smollm2-135m --replicas 2 &
    python docs/examples/serve_replicas.py
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

DOC = ("Our office moved in 2021 from Leeds to 14 Harbour Street, Bristol. The lift is out of order on "
       "Mondays. Deliveries go to the loading bay behind the bakery. ") * 20 + "The door code is 4417. "
QUESTIONS = ("What is the door code?", "Which street is the office on?", "When is the lift out of order?",
             "Where do deliveries go?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--replicas", type=int, default=2, help="how many replicas' /health to collect")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url + "/v1", api_key="none")

    def ask(question: str) -> tuple[str, str, str, int, float]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model=args.model, max_tokens=16, temperature=0,
                                               messages=[{"role": "user", "content": DOC + "\n\n" + question}])
        replica = reply.model_extra["longreach"]["replica"]
        cached = reply.usage.prompt_tokens_details.cached_tokens
        return question, reply.choices[0].message.content, replica, cached, time.perf_counter() - start

    with ThreadPoolExecutor(4) as pool:
        for question, answer, replica, cached, seconds in pool.map(ask, QUESTIONS * 2):
            print(f"{replica:12s} cached {cached:4d} {seconds:6.2f}s  {question} -> {answer!r}")
    health: dict[str, dict] = {}
    for _ in range(40):  # /health lands on either replica: ask until each has answered
        reply = httpx.get(args.url + "/health").json()
        health[reply["replica"]] = reply
        if len(health) == args.replicas:
            break
    for replica, reply in health.items():
        cache = {k: reply["prefix_cache"][k] for k in ("hits", "misses", "entries")}
        print(replica, "served", reply["requests"]["served"], "prefix cache", cache)


if __name__ == "__main__":
    main()
