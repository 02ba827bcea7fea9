"""The synthetic oracle benchmark of SeqGAN (Yu et al. 2017, section 5): metrics of an LSTM generator against
the oracle LSTM that produced its training data (`rlgen.lstm.build_oracle`), and a temperature sweep.

- eval/nll_oracle: mean per-token NLL of generator samples under the oracle (the paper's metric);
- eval/nll_test: generator NLL of held-out oracle samples;
- eval/nll_self: generator NLL of its own samples (its entropy rate).
`temperature_sweep` gives the same metrics for a generator sampled at lower temperatures, to compare SeqGAN
with MLE at matched entropy.
"""

from __future__ import annotations

import dataclasses

import torch

from rlgen.config import SamplingConfig
from rlgen.lstm import SeqGANLSTMForCausalLM
from rlgen.policy import Policy


@torch.no_grad()
def oracle_metrics(model: SeqGANLSTMForCausalLM, oracle: SeqGANLSTMForCausalLM, test_ids: torch.Tensor,
                   n: int, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """eval/nll_oracle (oracle NLL of n generator samples), eval/nll_test (NLL of held-out oracle samples
    test_ids [M, T]) and eval/nll_self (NLL of the generator's own samples: its entropy rate), the last two
    under the generator sampled at `temperature` (softmax(logits / temperature))."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    samples, logps = model.sample(n, test_ids.shape[1], temperature, g)
    return {"eval/nll_oracle": oracle.nll(samples), "eval/nll_test": model.nll(test_ids, temperature),
            "eval/nll_self": float(-logps.mean())}


def temperature_sweep(policy: Policy, temperatures: list[float], *, oracle: SeqGANLSTMForCausalLM | None = None,
                      test_ids: torch.Tensor | None = None, n: int = 10000, prompts: list[str] | None = None,
                      reward_fns: list[tuple[str, object]] = (), sampling: SamplingConfig | None = None,
                      seed: int = 0) -> list[dict[str, float]]:
    """The generator sampled at each temperature: an entropy-matched control for adversarial training.

    LSTM generators with an oracle get `oracle_metrics` (nll_oracle / nll_test / nll_self); any other policy
    gets the shared evaluator (`evaluate_policy`) on `prompts` at each temperature. One dict per temperature.
    """
    rows = []
    for temp in temperatures:
        if isinstance(policy.base_model, SeqGANLSTMForCausalLM) and oracle is not None:
            metrics = oracle_metrics(policy.base_model, oracle, test_ids, n, temp, seed)
        else:
            from rlgen.evaluation import evaluate_policy

            settings = dataclasses.replace(sampling or SamplingConfig(), temperature=temp)
            metrics = evaluate_policy(policy, list(prompts or []), list(reward_fns), settings)
        rows.append({"temperature": temp, **metrics})
    return rows


def nll_oracle_at_entropy(sweep: list[dict[str, float]], nll_self: float) -> float | None:
    """NLL-oracle of the temperature-scaled generator whose own-sample NLL (entropy rate) is `nll_self`: linear
    interpolation between the `temperature_sweep` rows bracketing it; None outside the swept range."""
    points = sorted((row["eval/nll_self"], row["eval/nll_oracle"]) for row in sweep)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= nll_self <= x1:
            return y0 + (y1 - y0) * (nll_self - x0) / (x1 - x0) if x1 > x0 else y0
    return None
