"""SFT, evaluation and the pipeline end to end on the tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlgen.cli import main
from rlgen.config import SFTConfig
from rlgen.files import read_jsonl

PAIRS = [{"prompt": f"say something nice about {w}", "completion": f"{w} is great and i love it"}
         for w in ["dogs", "cats", "music", "pizza", "rain", "books", "movies", "friends"]]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_lowers_the_loss_and_changes_parameters(tmp_path):
    from rlgen.models import build_tiny_model, build_tiny_tokenizer
    from rlgen.sft import train_sft

    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 8)
    cfg = SFTConfig(model="tiny", output_dir=str(tmp_path / "sft"), dataset=str(data), max_steps=25,
                    batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler_type="constant")
    train_sft(cfg)
    rows = [r for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss/sft" in r]
    assert len(rows) == 25
    first, last = rows[0]["loss/sft"], sum(r["loss/sft"] for r in rows[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    before = build_tiny_model(build_tiny_tokenizer(), seed=0).state_dict()
    after = load_file(str(tmp_path / "sft" / "model.safetensors"))
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) > len(after) // 2
    assert (tmp_path / "sft" / "config.yaml").is_file()
    assert not (tmp_path / "sft" / "value_head.safetensors").exists()  # SFT trains no value head


def test_sft_with_lora_trains_only_the_adapter(tmp_path):
    from rlgen.sft import train_sft

    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    cfg = SFTConfig(model="tiny", output_dir=str(tmp_path / "lora"), dataset=str(data), max_steps=3, lora_r=4,
                    learning_rate=1e-2, batch_size=4)
    policy = train_sft(cfg)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()


def test_a_copy_of_the_sft_model_runs_its_own_weights(tmp_path):
    """TRL's SFTTrainer patches the model's forward with a closure over the original model; before train_sft
    dropped it, a deepcopy (SeqGAN's KL reference, its rollout policy) computed the original's logits."""
    import copy

    from rlgen.sft import train_sft

    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    policy = train_sft(SFTConfig(model="tiny", output_dir=str(tmp_path / "sft"), dataset=str(data), max_steps=1,
                                 batch_size=4))
    twin = copy.deepcopy(policy.model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.add_(1.0)
        ids = torch.tensor([[5, 6, 7]])
        assert not torch.equal(twin(ids).logits, policy.model(ids).logits)


def test_evaluate_writes_samples_summary_and_metrics(tmp_path, capsys):
    (tmp_path / "prompts").mkdir()
    data = _write_jsonl(tmp_path / "prompts" / "test.jsonl", [{"prompt": p["prompt"]} for p in PAIRS]).parent
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "tiny", "--dataset", str(data), "--num_prompts", "6", "--max_new_tokens",
                 "8", "--batch_size", "4", "--reward", "sentiment_positive", "--reward", "target_length(target=5)",
                 "--gold_reward", "repetition_penalty", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    for key in ("eval/rewards/sentiment_positive/mean", "eval/rewards/target_length/mean", "eval/reward/mean",
                "eval/kl", "eval/perplexity_ref", "eval/mean_length", "eval/distinct_1", "eval/distinct_2",
                "eval/self_bleu", "eval/eos_fraction"):
        assert key in summary, key
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and summary["eval/num_samples"] == 6
    # the gold reward is reported on its own and left out of the optimised sum
    gold = [s["rewards"]["gold/repetition_penalty"] for s in samples]
    assert summary["eval/gold/repetition_penalty/mean"] == pytest.approx(sum(gold) / 6)
    assert all(s["reward"] == pytest.approx(s["rewards"]["sentiment_positive"] + s["rewards"]["target_length"])
               for s in samples)
    assert abs(summary["eval/kl"]) < 1e-3  # the policy is its own reference
    assert summary["eval/reward/mean"] == sum(s["reward"] for s in samples) / 6
    assert read_jsonl(out / "metrics.jsonl")[0]["eval/kl"] == summary["eval/kl"]
    assert "eval/distinct_2" in capsys.readouterr().out


def test_evaluate_takes_the_reference_a_run_folder_started_from(tmp_path, tiny_folder, tiny_tokenizer, capsys):
    """Before, `rlgen evaluate --model <run folder>` compared the model with itself (eval/kl ~ 0): the reference is
    now `--reference`, else the `model` its config.yaml names, and the evaluation prints which it is."""
    import yaml

    from rlgen.models import build_tiny_model
    from rlgen.policy import Policy

    (tmp_path / "prompts").mkdir()
    data = _write_jsonl(tmp_path / "prompts" / "test.jsonl", [{"prompt": p["prompt"]} for p in PAIRS]).parent
    run = tmp_path / "run"  # a "trained" model whose run started from tiny_folder
    Policy(build_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer).save(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_folder), "max_steps": 2}))
    common = ["evaluate", "--model", str(run), "--dataset", str(data), "--num_prompts", "4", "--max_new_tokens", "6"]
    kl = {}
    for name, flags in [("default", []), ("given", ["--reference", str(tiny_folder)]),
                        ("itself", ["--reference", str(run)])]:
        assert main([*common, *flags, "--output_dir", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        reference = str(run) if name == "itself" else str(tiny_folder)
        assert f"reference model (eval/kl, eval/perplexity_ref): {reference} (" in out
        assert (f"the model {run / 'config.yaml'} started from" in out) == (name == "default")
        kl[name] = json.loads((tmp_path / name / "eval_summary.json").read_text())["eval/kl"]
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["reference"] == reference
    assert kl["default"] == kl["given"] and kl["default"] > 0.1 and abs(kl["itself"]) < 1e-4


def test_evaluate_takes_a_run_folders_rewards_data_and_sampling(tmp_path, tiny_folder, tiny_tokenizer, capsys):
    """Before, `rlgen evaluate --model <run folder>` took only the reference from its config.yaml and scored other
    rewards on other data with other sampling: now the options left at their defaults come from the run, and the
    evaluation prints what it used. Options given keep their values."""
    import yaml

    from rlgen.models import build_tiny_model
    from rlgen.policy import Policy

    (tmp_path / "prompts").mkdir()
    data = _write_jsonl(tmp_path / "prompts" / "test.jsonl", [{"prompt": p["prompt"]} for p in PAIRS]).parent
    run = tmp_path / "run"
    Policy(build_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer).save(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_folder), "reward": ["target_length(target=3)"],
                                                     "dataset": str(data), "max_new_tokens": 5}))
    assert main(["evaluate", "--model", str(run), "--num_prompts", "2", "--output_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    used = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert (used["reward"], used["dataset"], used["max_new_tokens"]) == (["target_length(target=3)"], str(data), 5)
    assert f"as the run {run / 'config.yaml'} had them" in out and "max_new_tokens 5" in out
    assert "[rlgen] reward: target_length(target=3); max_new_tokens 5" in out
    assert "eval/rewards/target_length/mean" in json.loads((tmp_path / "a" / "eval_summary.json").read_text())
    assert main(["evaluate", "--model", str(run), "--num_prompts", "2", "--max_new_tokens", "4", "--reward",
                 "sentiment_positive", "--output_dir", str(tmp_path / "b")]) == 0
    used = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert (used["reward"], used["dataset"], used["max_new_tokens"]) == (["sentiment_positive"], str(data), 4)


def test_evaluate_help_lists_only_what_applies(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--num_prompts" in out and "--reference" in out and "--dataset" in out
    assert not any(f"--{k} " in out for k in ("max_steps", "save_steps", "resume_from_checkpoint", "report_to"))


def test_a_small_file_warns_and_can_be_evaluated_on_every_row(tmp_path, capsys):
    """16 prompts leave one test prompt (its SE nan): the evaluation warns and says how to use more, and
    `--split all` scores every row."""
    data = _write_jsonl(tmp_path / "mine.jsonl", [{"prompt": f"tell me about thing {i}"} for i in range(16)])
    common = ["evaluate", "--model", "tiny", "--dataset", str(data), "--max_new_tokens", "3"]
    assert main([*common, "--output_dir", str(tmp_path / "test")]) == 0
    out = capsys.readouterr().out
    assert "warning: only 1 evaluation prompt in the test split: standard errors are undefined (nan)" in out
    assert "--split all" in out
    assert main([*common, "--split", "all", "--output_dir", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "every row of" in out
    assert json.loads((tmp_path / "all" / "eval_summary.json").read_text())["eval/num_samples"] == 16


def test_run_pipeline_end_to_end(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny\ndataset: {data}\nstages: [sft]\nsft:\n  max_steps: 4\n  learning_rate: 1.0e-3\n"
                   "evaluate:\n  num_prompts: 4\n  max_new_tokens: 6\n  split: train\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--output_dir", str(out), "--sft.batch_size", "4"]) == 0
    report = (out / "report.md").read_text()
    assert "| start |" in report and "| sft |" in report and "sentiment_positive" in report
    assert (out / "sft" / "model.safetensors").is_file()
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert "batch_size: 4" in sft_cfg and "max_steps: 4" in sft_cfg
    # KL is measured against the starting model: zero for the start itself, not for the SFT model.
    start = json.loads((out / "eval_start" / "eval_summary.json").read_text())
    after = json.loads((out / "eval_sft" / "eval_summary.json").read_text())
    assert abs(start["eval/kl"]) < 1e-4 and abs(after["eval/kl"]) > 1e-2
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    assert " ± " in report and "bleu" in report and "the first 4 prompts of the train split" in report
    # SFT on these very replies lowers their NLL; the report states the change with its standard error.
    assert after["eval/reference_nll"] < start["eval/reference_nll"]
    assert "- sft (from start): reward " in report and "NLL of the reference replies" in report
    # ... paired over the prompts: each prompt's NLL before and after
    from rlgen.metrics import paired_difference

    before, after_samples = (read_jsonl(out / f"eval_{m}" / "eval_samples.jsonl") for m in ("start", "sft"))
    delta, se = paired_difference([s["reference_nll"] for s in before], [s["reference_nll"] for s in after_samples])
    assert delta == pytest.approx(after["eval/reference_nll"] - start["eval/reference_nll"])
    assert f"change {delta:+.3f} ± {se:.3f}" in report


def test_evaluation_scores_references_and_gives_standard_errors(tmp_path):
    from rlgen import metrics

    (tmp_path / "d").mkdir()
    _write_jsonl(tmp_path / "d" / "test.jsonl", PAIRS)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "tiny", "--dataset", str(tmp_path / "d"), "--num_prompts", "6",
                 "--max_new_tokens", "8", "--reward", "target_length(target=5)", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    samples = read_jsonl(out / "eval_samples.jsonl")
    completions, references = [s["completion"] for s in samples], [p["completion"] for p in PAIRS[:6]]
    assert summary["eval/bleu"] == metrics.bleu(completions, references)
    assert summary["eval/rouge_l"] == metrics.rouge_l(completions, references)
    rewards = [s["reward"] for s in samples]
    mean = sum(rewards) / 6
    assert summary["eval/reward/se"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 5 / 6) ** 0.5)
    assert summary["eval/kl_se"] == pytest.approx(metrics.standard_error([s["kl"] for s in samples]))


def test_reference_nll_matches_one_unpadded_forward_per_reply(tiny_policy):
    from rlgen.evaluation import reference_nll
    from rlgen.text import render_prompt

    prompts = [p["prompt"] for p in PAIRS[:3]]
    references = ["dogs are great", "a much longer reply about cats and music", "ok"]  # different lengths pad
    tok = tiny_policy.tokenizer
    naive = []
    for prompt, reply in zip(prompts, references):
        p_ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        r_ids = tok(reply, add_special_tokens=False)["input_ids"]
        logits = tiny_policy.model(torch.tensor([p_ids + r_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        naive.append(-sum(logp[len(p_ids) + t - 1, r].item() for t, r in enumerate(r_ids)) / len(r_ids))
    assert reference_nll(tiny_policy, prompts, references, batch_size=2) == pytest.approx(naive, abs=1e-5)


def test_sft_trains_on_conversational_rows(tmp_path, tiny_tokenizer):
    from rlgen.sft import _dataset, train_sft

    chats = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]
             for p in PAIRS]
    pairs = _dataset([{"prompt": c[:1], "completion": c[1:]} for c in chats], tiny_tokenizer, 8, 0)
    assert pairs[0] == {"prompt": f"user: {PAIRS[0]['prompt']}\nassistant:", "completion": f" {PAIRS[0]['completion']}\n"}
    texts = _dataset([{"messages": c} for c in chats], tiny_tokenizer, 8, 0)["text"]
    assert texts[0] == pairs[0]["prompt"] + pairs[0]["completion"]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    train_sft(SFTConfig(model="tiny", output_dir=str(tmp_path / "sft"), dataset=str(data), max_steps=2, batch_size=4))
    assert [r["loss/sft"] > 0 for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss/sft" in r] == [True] * 2


def test_an_evaluation_against_the_model_itself_holds_no_second_copy(tiny_folder, tmp_path):
    """Before, the starting model's evaluation deep-copied it as its own reference: two copies in memory."""
    from rlgen.config import EvalConfig
    from rlgen.evaluation import Evaluator

    evaluator = Evaluator(EvalConfig(model=str(tiny_folder), output_dir=str(tmp_path / "e"), num_prompts=2))
    assert evaluator.load_policy().ref_model is not None
    itself = evaluator.load_policy(str(tiny_folder))
    assert itself.ref_model is itself.model
    other = evaluator.load_policy("tiny")
    assert other.ref_model is not other.model


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_rss_sees_a_blocks_allocation():
    from rlgen.pipeline import PeakRSS, _status_gb

    before = _status_gb("VmRSS")
    with PeakRSS() as peak:
        block = b"x" * 300_000_000  # written: resident
        del block
    assert peak.gb >= before + 0.25
