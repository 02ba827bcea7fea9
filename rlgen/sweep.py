"""`rlgen sweep`: reward over-optimisation against proxy quality (Gao et al. 2022), in one command.

1. Proxies: one learned reward model per entry of `num_pairs`, all from the same recipe (`proxy`: the same
   labeller, base model and steps; `seed` fixed), so they differ only in how many preference pairs they saw.
   With `ensemble_seeds`, more proxies at `ensemble_pairs` pairs, each with its own seed (its own sample of
   pairs and its own head initialisation), which with the seed-`proxy.seed` proxy at that size make the members
   of one `ensemble(...)` reward per form in `ensembles` (Coste et al. 2024).
2. Optimisation: for every proxy and every ensemble, `rlgen compare` of the `compare` methods against it alone
   (same starting model, budget, evaluation prompts and gold), one (reward, seed) run per process, `workers`
   processes side by side. Best-of-n (`bon` in `compare.methods`) is sampled once per seed for all of them (one
   comparison whose rewards are every proxy and ensemble, the first at weight 1, the rest at 0, scored on the
   same draws) and read per proxy with the unbiased estimator (rlgen.bon).
3. Report (rlgen.sweep.write_sweep_report): per proxy and method, from the per-prompt gold and KL of every
   evaluation of every seed: the measured gold peak and its fall by the last evaluation with a bootstrap SE over
   seeds and prompts (a turn is claimed only for a fall > 2 SE), and Gao et al.'s fit with a bootstrap interval
   for its peak KL. Writes sweep.md, sweep.csv, sweep.json, gold_vs_kl.png and peak_vs_quality.png.

Everything is resumable: a proxy whose summary exists and a run whose result.json exists are kept, so the same
command continues an interrupted sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from rlgen.config import CompareConfig, RewardModelConfig, SweepConfig, load_yaml, save_config, to_dict
from rlgen.errors import UserError
from rlgen.files import read_jsonl, write_json

BON = "bon"


@dataclasses.dataclass(frozen=True)
class Proxy:
    """One reward the sweep optimises: `name` (its folder under runs/), `spec` (a reward spec), `pairs` (training
    pairs of each member), `members` (1 for a single reward model), `folders` (the member reward-model folders)."""

    name: str
    spec: str
    pairs: int
    members: int
    folders: tuple[str, ...]


def sweep_proxies(cfg: SweepConfig) -> list[Proxy]:
    """Every reward the sweep optimises: the single proxies by size, then one ensemble per form."""
    folders = {name: c.output_dir for name, c in cfg.proxy_configs().items()}
    singles = [Proxy(f"pairs{n}", folders[f"pairs{n}"], n, 1, (folders[f"pairs{n}"],)) for n in cfg.num_pairs]
    if not cfg.ensemble_seeds:
        return singles
    members = tuple([folders[f"pairs{cfg.ensemble_pairs}"]] + [folders[f"pairs{cfg.ensemble_pairs}_seed{s}"]
                                                                for s in cfg.ensemble_seeds])
    listed = ", ".join(repr(m) for m in members)
    ensembles = [Proxy(f"ensemble_{form}", f"ensemble(members=[{listed}], combine='{form}', lam={cfg.uwo_lambda})",
                       cfg.ensemble_pairs, len(members), members) for form in cfg.ensembles]
    return singles + ensembles


def _proxy_kept(rm_cfg: RewardModelConfig) -> bool:
    """Whether the proxy was trained by an earlier call (its summary exists); one trained with other settings is
    refused, naming them."""
    from rlgen.reward_model import SUMMARY_FILE

    folder = Path(rm_cfg.output_dir)
    if not (folder / SUMMARY_FILE).is_file():
        return False
    saved, wanted = load_yaml(str(folder / "config.yaml")), to_dict(rm_cfg)
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise UserError(f"{folder}: trained earlier with other settings ({', '.join(changed)}); use another "
                        "output_dir or remove that folder")
    return True


def _train_proxy(rm_cfg: RewardModelConfig) -> str:
    from rlgen.reward_model import train_reward_model

    train_reward_model(rm_cfg)
    return f"{Path(rm_cfg.output_dir).name}: trained"


def _compare_done(compare_cfg: CompareConfig) -> bool:
    """Whether every (method, seed) run of this comparison finished in an earlier call (result.json)."""
    runs = Path(compare_cfg.output_dir) / "runs"
    return all((runs / m / f"seed{s}" / "result.json").is_file() for m in compare_cfg.methods
               for s in compare_cfg.seeds)


def _compare(compare_cfg: CompareConfig, report: bool = False) -> str:
    from rlgen.compare import run_compare

    run_compare(compare_cfg, report=report)
    return f"{Path(compare_cfg.output_dir).name} {','.join(compare_cfg.methods)} seeds {compare_cfg.seeds}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of the sweep for a worker process: `run(arg)` once the jobs at indices `after` have finished."""

    run: object
    arg: object
    after: frozenset[int] = frozenset()


def _run_jobs(jobs: list[Job], workers: int, done: set[int]) -> None:
    """Run `jobs` not in `done` in `workers` fresh processes (spawned: no torch state shared), each once its
    `after` jobs have finished, the first ready job in list order first; the first failure stops the sweep
    (finished jobs keep their output)."""
    done = set(done)
    pending = [i for i in range(len(jobs)) if i not in done]
    if not pending:
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        running = {}
        while pending or running:
            for i in [i for i in pending if jobs[i].after <= done][:workers - len(running)]:
                pending.remove(i)
                running[pool.submit(jobs[i].run, jobs[i].arg)] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done.add(running.pop(future))
                print(f"[sweep] {future.result()}", flush=True)  # re-raises the job's error


def comparisons(cfg: SweepConfig, proxies: list[Proxy], seeds: list[int]) -> list[tuple[CompareConfig, tuple]]:
    """Every comparison of the sweep at `seeds`, with the proxy folders it needs: best-of-n once for all rewards
    (the first at weight 1), then the other methods against each reward alone."""
    methods = [m for m in cfg.methods if m != BON]
    out = []
    if BON in cfg.methods:
        out.append((cfg.compare_config(BON, [p.spec for p in proxies], [BON], seeds),
                    tuple(f for p in proxies for f in p.folders)))
    if methods:
        out += [(cfg.compare_config(p.name, [p.spec], methods, seeds), p.folders) for p in proxies]
    return out


def sweep_jobs(cfg: SweepConfig) -> tuple[list[Job], set[int]]:
    """Every job of the sweep in priority order, and those an earlier call finished.

    Proxies first, the largest first (it takes longest); a comparison may start once the proxies it needs exist,
    so the other worker optimises against the small proxies while the large one trains. A reward's first seed
    evaluates the starting model into the comparison's folder before its other seeds start there."""
    rm_cfgs = sorted(cfg.proxy_configs().values(), key=lambda c: (-c.num_pairs, c.seed))
    jobs = [Job(_train_proxy, c) for c in rm_cfgs]
    trained_by = {c.output_dir: i for i, c in enumerate(rm_cfgs)}
    done = {i for i, c in enumerate(rm_cfgs) if _proxy_kept(c)}
    for i in sorted(done):
        print(f"[sweep] {Path(rm_cfgs[i].output_dir).name}: trained earlier, kept", flush=True)
    proxies = sweep_proxies(cfg)
    per_seed = [comparisons(cfg, proxies, [s]) for s in cfg.seeds]
    groups = [([seed[g][0] for seed in per_seed], frozenset(trained_by[f] for f in needs))
              for g, (_, needs) in enumerate(per_seed[0])]  # (one config per seed, the proxy jobs they need)
    firsts = {}
    for g, (configs, needs) in enumerate(groups):
        firsts[g] = len(jobs)
        jobs.append(Job(_compare, configs[0], needs))
    for g, (configs, needs) in enumerate(groups):
        jobs += [Job(_compare, c, needs | {firsts[g]}) for c in configs[1:]]
    done |= {i for i in range(len(rm_cfgs), len(jobs)) if _compare_done(jobs[i].arg)}
    return jobs, done


def run_sweep(cfg: SweepConfig) -> dict[str, Path]:
    """Train the proxies and run every comparison (one job graph, `workers` processes), write the report; returns
    the report's paths."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "sweep_config.yaml")
    t0 = time.perf_counter()
    jobs, done = sweep_jobs(cfg)
    _run_jobs(jobs, cfg.workers, done)
    work_s = time.perf_counter() - t0
    proxies = sweep_proxies(cfg)
    for compare_cfg, _ in comparisons(cfg, proxies, cfg.seeds):  # the full reports (every run exists: nothing trains)
        _compare(compare_cfg, report=True)
    return write_sweep_report(cfg, proxies, {"work": work_s, "reports": time.perf_counter() - t0 - work_s})


def main(cfg: SweepConfig) -> None:
    """`rlgen sweep`: run the sweep, print its table and where the report is."""
    paths = run_sweep(cfg)
    print(paths["md"].read_text())
    print(f"[rlgen] sweep report: {paths['md']}")


# ---- report -------------------------------------------------------------------------------------------------


def _samples(folder: Path) -> list[dict]:
    return read_jsonl(folder / "eval_samples.jsonl")


def _by_prompt(samples: list[dict], prompts: list[str], key: str) -> np.ndarray:
    """[P] the mean of `key` ("kl" or a `rewards` name) over each prompt's samples, in `prompts` order."""
    values: dict[str, list[float]] = {}
    for s in samples:
        values.setdefault(s["prompt"], []).append(s["kl"] if key == "kl" else s["rewards"][key])
    return np.array([np.mean(values[p]) for p in prompts])


def rl_curves(folder: Path, method: str, seeds: list[int], gold: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gold [S, T, P], kl [S, T, P], start gold [P]) of one comparison's `method` runs: every evaluation along
    training (eval_steps/step<n>) and the final one, per prompt, in the starting model's prompt order. The final
    evaluation is left out where it repeats the last one along training (the same policy evaluated again when
    eval_steps divides max_steps: equal to 1e-4, as `rlgen.report.trajectory` compares them), so that no point
    counts twice."""
    start = _samples(folder / "runs" / "start" / "eval")
    prompts = list(dict.fromkeys(s["prompt"] for s in start))
    golds, kls = [], []
    for seed in seeds:
        run = folder / "runs" / method / f"seed{seed}"
        steps = sorted((run / "eval_steps").glob("step*"), key=lambda p: int(p.name[4:]))
        evals = [_samples(p) for p in steps] + [_samples(run / "eval")]
        gold_rows = [_by_prompt(e, prompts, f"gold/{gold}") for e in evals]
        kl_rows = [_by_prompt(e, prompts, "kl") for e in evals]
        if len(evals) > 1 and np.allclose(gold_rows[-1], gold_rows[-2], rtol=1e-4, atol=1e-6) and np.allclose(
                kl_rows[-1], kl_rows[-2], rtol=1e-4, atol=1e-6):
            gold_rows, kl_rows = gold_rows[:-1], kl_rows[:-1]
        golds.append(gold_rows)
        kls.append(kl_rows)
    return np.array(golds), np.array(kls), _by_prompt(start, prompts, f"gold/{gold}")


def bon_curves(folder: Path, seeds: list[int], proxy: str, gold: str, n: int) -> tuple[np.ndarray, ...]:
    """(gold [S, T, P], kl [S, T, P], start gold [P], sizes [T]) of best-of-n' by `proxy` (a `rewards` name of
    the shared best-of-n samples) for n' in bon_sizes(n): the unbiased estimate from all n draws per prompt; the
    start is best-of-1 (every draw), its KL the analytic bon_kl(n')."""
    from rlgen.bon import bon_sizes, unbiased_best_of
    from rlgen.scaling import bon_kl

    sizes = bon_sizes(n)
    golds = []
    for seed in seeds:
        drawn = _samples(folder / "runs" / BON / f"seed{seed}" / "eval" / "all_samples")
        p = len(drawn) // n
        rows = [[drawn[j * p + i] for j in range(n)] for i in range(p)]
        proxy_values = [[s["rewards"][proxy] for s in row] for row in rows]
        gold_values = [[s["rewards"][f"gold/{gold}"] for s in row] for row in rows]
        golds.append([unbiased_best_of(proxy_values, gold_values, k) for k in sizes])
    gold_arr = np.array(golds)
    kl = np.broadcast_to(np.array([bon_kl(k) for k in sizes])[None, :, None], gold_arr.shape).copy()
    return gold_arr, kl, gold_arr[:, 0, :].mean(axis=0), np.array(sizes)


def _proxy_quality(folder: str) -> dict:
    from rlgen.reward_model import SUMMARY_FILE

    summary = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    acc, n = summary["metrics"]["eval/pairwise_accuracy"], summary["counts"]["eval_pairs"]
    return {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n),
            "spearman": summary["metrics"].get("eval/gold_spearman"), "train_s": summary["time_s"]["total"]}


def sweep_rows(cfg: SweepConfig, proxies: list[Proxy]) -> tuple[list[dict], dict]:
    """One row per (proxy, method) with quality, measured turn and fit; and the curves behind them for plots."""
    from rlgen.compare import _reward_names
    from rlgen.scaling import bootstrap_overoptimization, mean_curve

    compare = cfg.compare_config(BON, [proxies[0].spec], [BON], cfg.seeds)
    gold, seeds, methods = _reward_names(compare.gold_reward)[0], cfg.seeds, cfg.methods
    names = _reward_names([p.spec for p in proxies])
    rows, curves = [], {}
    for p, reward in zip(proxies, names):
        members = [_proxy_quality(f) for f in p.folders]
        quality = {k: float(np.mean([m[k] for m in members])) for k in ("accuracy", "accuracy_se")}
        for method in methods:
            if method == BON:
                g, k, start, _ = bon_curves(Path(cfg.output_dir) / "runs" / BON, seeds, reward, gold, compare.bon_n)
            else:
                g, k, start = rl_curves(Path(cfg.output_dir) / "runs" / p.name, method, seeds, gold)
            form = "bon" if method == BON else "rl"
            stats = bootstrap_overoptimization(g, k, start, form, samples=cfg.bootstrap, seed=0)
            d, r = mean_curve(g, k, start)
            curves[(p.name, method)] = {"d": d.reshape(g.shape[:2]), "r": r.reshape(g.shape[:2]), "stats": stats}
            rows.append({"proxy": p.name, "pairs": p.pairs, "members": p.members, **quality,
                         "spearman": members[0]["spearman"] if p.members == 1 else None, "method": method,
                         "form": form, "seeds": len(seeds), "prompts": g.shape[2], "start_gold": float(start.mean()),
                         "max_kl": float(k.mean(axis=(0, 2)).max()),
                         "peak_at_kl": float(k.mean(axis=(0, 2))[stats["peak_eval"]]), **stats})
    return rows, {"curves": curves, "gold": gold, "methods": methods}


def part_minutes(cfg: SweepConfig, proxies: list[Proxy]) -> dict[str, float]:
    """Process minutes of each part, from the records the jobs left: every proxy's training (its summary's total),
    and per method the runs' training and evaluation (result.json: train_s + eval_s + the evaluations along
    training), the starting-model evaluations included under "start"."""
    from rlgen.reward_model import SUMMARY_FILE

    minutes = {"proxies": sum(json.loads((Path(c.output_dir) / SUMMARY_FILE).read_text())["time_s"]["total"]
                              for c in cfg.proxy_configs().values()) / 60}
    for compare_cfg, _ in comparisons(cfg, proxies, cfg.seeds):
        for result in (Path(compare_cfg.output_dir) / "runs").glob("*/**/result.json"):
            r = json.loads(result.read_text())
            seconds = r["train_s"] + r["eval_s"] + sum(e.get("time/eval", 0.0) for e in r.get("evals") or []
                                                       if r["method"] != BON)
            minutes[r["method"]] = minutes.get(r["method"], 0.0) + seconds / 60
    return minutes


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


# A turn (fall > 2 bootstrap SE) from fewer seeds or prompts than these is marked: a bootstrap over one seed
# resamples prompts only (seed-to-seed variation unseen), and one over a few prompts understates the SE.
SMALL_SAMPLE_SEEDS, SMALL_SAMPLE_PROMPTS = 2, 16


def small_sample(row: dict) -> bool:
    """Whether a row's seeds or prompts are too few for its bootstrap SE (and so its `turned`) to be trusted."""
    return row["seeds"] < SMALL_SAMPLE_SEEDS or row["prompts"] < SMALL_SAMPLE_PROMPTS


def _turned_cell(row: dict) -> str:
    return ("yes" if row["turned"] else "no") + ("*" if row["turned"] and small_sample(row) else "")


def _plural(n: int, word: str) -> str:
    """`1 process`, `2 processes`."""
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def write_sweep_report(cfg: SweepConfig, proxies: list[Proxy], seconds: dict) -> dict[str, Path]:
    """sweep.md, sweep.csv, sweep.json, gold_vs_kl.png and peak_vs_quality.png in `cfg.output_dir`."""
    import csv

    out = Path(cfg.output_dir)
    rows, data = sweep_rows(cfg, proxies)
    header = ["proxy", "pairs", "members", "accuracy", "accuracy_se", "spearman", "method", "seeds", "prompts",
              "start_gold", "max_kl", "peak_at_kl", "peak_gold", "peak_gold_se", "fall", "fall_se", "turned", "alpha", "beta",
              "peak_kl", "peak_kl_lo", "peak_kl_hi"]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "sweep.json", {"rows": rows, "seconds": seconds}, indent=1)
    lines = [f"# Over-optimisation sweep: gold `{data['gold']}` against proxy quality", "",
             "| proxy | pairs | held-out accuracy | method | KL reached | gold: start → peak ± SE (at KL) | fall from peak "
             "by the end | turned (fall > 2 SE) | fit α, β | fitted peak KL [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["proxy"] + (f" ({r['members']} members)" if r["members"] > 1 else "")
        lines.append(
            f"| {name} | {r['pairs']} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | {r['method']} | "
            f"{r['max_kl']:.2f} | {r['start_gold']:.3f} → {r['peak_gold']:.3f} ± {r['peak_gold_se']:.3f} "
            f"({r['peak_at_kl']:.2f}) | "
            f"{r['fall']:.3f} ± {r['fall_se']:.3f} | {_turned_cell(r)} | "
            f"{_fmt(r['alpha'])}, {_fmt(r['beta'])} | {_fmt(r['peak_kl'])} [{_fmt(r['peak_kl_lo'])}, "
            f"{_fmt(r['peak_kl_hi'])}] |")
    caveat = (f" *: turned, but from fewer than {SMALL_SAMPLE_SEEDS} seeds or {SMALL_SAMPLE_PROMPTS} prompts, too "
              "few for the bootstrap SE to be trusted (one seed resamples prompts only): rerun with more seeds and "
              "evaluation prompts before reading it as a turn." if any(r["turned"] and small_sample(r) for r in rows)
              else "")
    lines += ["", f"{_plural(rows[0]['seeds'], 'seed')} x {_plural(rows[0]['prompts'], 'evaluation prompt')} per "
              "proxy and method." + caveat + " "
              "Standard errors and intervals: bootstrap over seeds and prompts "
              f"({cfg.bootstrap} replicates); an interval's upper end ∞ means the data do not bound a peak. "
              "Ensemble accuracy: the mean of its members'. Fit: Gao et al. 2022, RL R(d) = d(α − β log d), "
              "best-of-n R(d) = d(α − β d), d = √KL, R the gold gained over the start.", "",
              f"Wall time of the call that wrote this report (work kept from earlier calls not counted): "
              f"{seconds['work'] / 60:.1f} min for the proxies and optimisation ("
              + (f"{cfg.workers} processes side by side, proxies and comparisons overlapping" if cfg.workers > 1
                 else "1 process") + f"), {seconds['reports'] / 60:.1f} min for the reports. "
              "Process time by part (the jobs' own records, model loading left out): " + ", ".join(
                  f"{part} {m:.1f} min" for part, m in part_minutes(cfg, proxies).items()) + ".", "", "![gold against sqrt(KL)](gold_vs_kl.png)", "",
              "![peak against proxy quality](peak_vs_quality.png)", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    plot_gold_vs_kl(rows, data, out / "gold_vs_kl.png")
    plot_peak_vs_quality(rows, out / "peak_vs_quality.png")
    return {"md": out / "sweep.md", "csv": out / "sweep.csv", "json": out / "sweep.json",
            "gold_vs_kl": out / "gold_vs_kl.png", "peak_vs_quality": out / "peak_vs_quality.png"}


def plot_gold_vs_kl(rows: list[dict], data: dict, path: Path):
    """Gold gained over the start against d = √KL, one panel per method, one colour per proxy: the mean over seeds
    at each evaluation with SE bars over seeds, and the Gao fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlgen.scaling import gao_reward

    methods = data["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    colours = plt.get_cmap("viridis")
    singles = sorted({r["proxy"] for r in rows if r["members"] == 1}, key=lambda n: int(n[5:]))
    for ax, method in zip(axes[0], methods):
        for r in (r for r in rows if r["method"] == method):
            curve = data["curves"][(r["proxy"], method)]
            d, g = curve["d"], curve["r"]
            if r["members"] == 1:
                colour, style = colours(singles.index(r["proxy"]) / max(1, len(singles) - 1) * 0.9), "-"
            else:
                colour, style = {"ensemble_mean": "tab:red", "ensemble_min": "tab:orange"}.get(
                    r["proxy"], "tab:pink"), "--"
            se = g.std(axis=0, ddof=1) / math.sqrt(g.shape[0]) if g.shape[0] > 1 else None
            ax.errorbar(d.mean(axis=0), g.mean(axis=0), yerr=se, fmt="o", ms=4, color=colour, capsize=2,
                        label=f"{r['proxy']} (acc {r['accuracy']:.2f})" + (" turned" if r["turned"] else ""))
            grid = np.linspace(0, d.max() * 1.05, 100)
            if r["alpha"] is not None:
                ax.plot(grid, gao_reward(grid, r["alpha"], r["beta"], r["form"]), style, color=colour, lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("d = √KL to the start (nats$^{1/2}$)")
        ax.set_ylabel(f"gold gained ({data['gold']})")
        ax.set_title(method)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_peak_vs_quality(rows: list[dict], path: Path):
    """Per method: the measured peak's KL (and the fitted one where finite) and the gold at the measured peak (± its
    bootstrap SE) against the proxy's training pairs (single proxies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method and r["members"] == 1), key=lambda r: r["pairs"])
        pairs = [r["pairs"] for r in mine]
        left.plot(pairs, [r["peak_at_kl"] for r in mine], "o-", label=f"{method}: measured peak")
        finite = [(r["pairs"], r["peak_kl"]) for r in mine if r["peak_kl"] and math.isfinite(r["peak_kl"])]
        if finite:
            left.plot(*zip(*finite), "x--", label=f"{method}: fitted peak")
        right.errorbar(pairs, [r["peak_gold"] for r in mine], yerr=[r["peak_gold_se"] for r in mine], fmt="o-",
                       capsize=2, label=method)
    left.set_xscale("log")
    left.set_yscale("log")
    right.set_xscale("log")
    left.set_xlabel("proxy training pairs")
    right.set_xlabel("proxy training pairs")
    left.set_ylabel("KL at the gold peak (nats)")
    right.set_ylabel("gold at its peak")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
