"""How learned proxies score held-out chit-chat replies along the lexicon sentiment scale: the over-optimisation
sweep's diagnostic (its labeller prefers replies near 0.4 and dislikes gushing ones; does a proxy know?).

    python experiments/proxy_shape.py runs/overoptimization_sweep/proxies/pairs*

Prints JSON: per proxy folder, the mean (normalised) proxy reward of test-split replies in each bin of their
`sentiment_lexicons` score, with the bin counts. 1,500 replies sampled with seed 0.
"""

import argparse
import json
import random

import numpy as np

from rlgen.data import load_rows
from rlgen.models import set_threads
from rlgen.rewards import LearnedReward
from rlgen.rewards.rules import sentiment_lexicons

EDGES = [-1.0, -0.2, 0.1, 0.3, 0.4, 0.5, 0.7, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("proxies", nargs="+", help="reward-model folders")
    parser.add_argument("--replies", type=int, default=1500)
    args = parser.parse_args()
    set_threads(1)
    rows = random.Random(0).sample(load_rows("chitchat", "test", ("prompt", "completion")), args.replies)
    prompts, replies = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    sentiment = np.array(sentiment_lexicons(prompts, replies))
    bins = np.digitize(sentiment, EDGES[1:-1])  # bin i: [EDGES[i], EDGES[i + 1]), the last one closed
    labels = [f"[{lo}, {hi})" for lo, hi in zip(EDGES[:-1], EDGES[1:])]
    out = {"bins": labels, "counts": [int((bins == i).sum()) for i in range(len(labels))], "proxies": {}}
    for folder in args.proxies:
        reward = np.array(LearnedReward(folder)(prompts, replies))
        out["proxies"][folder] = [round(float(reward[bins == i].mean()), 3) for i in range(len(labels))]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
