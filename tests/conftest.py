"""Shared fixtures: tiny models and a local tokenizer, one thread, offline, isolated cache."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

# A reward module for the interruption tests: `vowels` (the vowel share) sends its own process SIGINT at its call
# $RLGEN_TEST_STOP_AT (one call per update), only on rank $RLGEN_TEST_STOP_RANK when that is set.
STOP_REWARD = '''
import os
import signal

_calls = 0


def vowels(completions, **kwargs):
    """Vowel share; SIGINT to this process at call $RLGEN_TEST_STOP_AT (on rank $RLGEN_TEST_STOP_RANK if set)."""
    global _calls
    _calls += 1
    rank = os.environ.get("RLGEN_TEST_STOP_RANK")
    if os.environ.get("RLGEN_TEST_STOP_AT") == str(_calls) and rank in (None, os.environ.get("RANK")):
        os.kill(os.getpid(), signal.SIGINT)
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests share one cache folder of their own (demo data is built there once), never the user's.

    Session-scoped so that module-scoped fixtures (which start before function-scoped ones) use it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLGEN_CACHE", str(tmp_path_factory.getbasetemp() / "rlgen-cache"))
        yield


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny model (`Policy.from_pretrained("tiny")`, seed 0) saved once: loading it takes well under a
    second, building it (tokenizer training) several seconds."""
    from rlgen.policy import Policy

    folder = tmp_path_factory.mktemp("tiny")
    Policy.from_pretrained("tiny", reference=False).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlgen.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_policy(tiny_tokenizer):
    from rlgen.models import build_tiny_model
    from rlgen.policy import Policy

    return Policy(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A tiny random BERT sequence classifier over the tiny tokenizer, saved as a folder (a text D)."""
    from transformers import BertConfig, BertForSequenceClassification

    from rlgen.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.model_max_length = 64
    folder = tmp_path_factory.mktemp("tiny_d")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_tiny_reward_model(folder, seed=0):
    """A tiny random one-logit Llama reward model (word-level tokenizer, [PAD] and [EOS]) saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = "the a cat dog sat ran on in mat tree happy sad big small good bad very not and is was it".split()
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]",
                                        pad_token="[PAD]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, max_position_embeddings=256,
                         pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory):
    """Two tiny random reward-model folders, `rm_a` and `rm_b` (seeds 1 and 2: they disagree)."""
    root = tmp_path_factory.mktemp("tiny_rms")
    return [save_tiny_reward_model(root / name, seed) for name, seed in (("rm_a", 1), ("rm_b", 2))]


def load_shipped_yaml(path, tmp_path) -> dict:
    """An experiment/recipe YAML's values, as a clone has them (every file they name is in the repository)."""
    from rlgen.config import load_yaml

    return load_yaml(str(path))


def opinionated_copy(folder, tmp_path):
    """A copy of the model folder with a generation_config.json whose every field would change sampling."""
    import shutil

    from transformers import GenerationConfig

    from rlgen.policy import Policy

    tok = Policy.from_pretrained(str(folder), reference=False).tokenizer
    banned = tok(" you", add_special_tokens=False)["input_ids"]
    copy = tmp_path / "opinionated"
    shutil.copytree(folder, copy)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.3, top_k=5,
                     top_p=0.5, min_p=0.2, typical_p=0.5, epsilon_cutoff=0.01, eta_cutoff=0.01, min_length=40,
                     no_repeat_ngram_size=1, repetition_penalty=5.0, suppress_tokens=banned[:1],
                     bad_words_ids=[banned], begin_suppress_tokens=[2], sequence_bias=[[[3], 5.0]],
                     renormalize_logits=True, forced_eos_token_id=2,
                     exponential_decay_length_penalty=(2, 1.5)).save_pretrained(copy)
    return copy
