"""Regenerate examples/data/reviews.jsonl, the small sample dataset that ships with the repo.

usage: python tools/make_sample_data.py [N] [OUT]

Deterministic: product reviews with a rating label, token ids and metadata,
the shape of data shardstream exists for.
"""

from __future__ import annotations

import json
import os
import random
import sys

GOOD = "great love excellent perfect happy recommend solid fast sturdy beautiful".split()
BAD = "broken awful slow refund cheap disappointed flimsy late noisy useless".split()
FILL = "the a this it was and very product quality price delivery box colour size".split()


def review(i: int, rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    words = rng.choices(FILL, k=rng.randint(6, 30)) + rng.choices(GOOD if positive else BAD,
                                                                   k=rng.randint(1, 4))
    rng.shuffle(words)
    text = " ".join(words)
    vocab = sorted(set(GOOD + BAD + FILL))
    return {"__key__": f"review-{i:05d}", "text": text,
            "input_ids": [vocab.index(w) + 1 for w in words],
            "label": int(positive), "stars": rng.randint(4, 5) if positive else rng.randint(1, 2),
            "meta": {"lang": "en", "verified": rng.random() < 0.8}}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "examples", "data", "reviews.jsonl")
    rng = random.Random(0)
    with open(out, "w") as f:
        for i in range(n):
            f.write(json.dumps(review(i, rng)) + "\n")


if __name__ == "__main__":
    main()
