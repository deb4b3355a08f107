"""A tiny GPT-2 on disk, for every test that needs a pretrained model (no download, random weights).

``build_tiny_gpt2(dir)`` writes a ``GPT2LMHeadModel.save_pretrained`` (2 layers, d_model 64, 4 heads,
n_ctx 64, 100 tokens) and a word-level ``PreTrainedTokenizerFast`` with GPT-2's special token;
``add_to_hub_cache(hf_home, dir)`` files it as ``hub/models--gpt2`` in a Hugging Face cache, which
is what ``from_pretrained("gpt2")`` reads with ``HF_HUB_OFFLINE=1``. Fixtures are session-wide.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

EOT = "<|endoftext|>"
WORDS = ([EOT, "<unk>"] + [str(i) for i in range(10)] + ["x", "=", "+", "->", ";"]
         + [chr(ord("a") + i) for i in range(26)]
         + "The cat sat on the mat Why did elephant cross road tree When Mary and John went to store gave".split())
WORDS += [f"w{i}" for i in range(100 - len(WORDS))]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def build_tiny_gpt2(out_dir: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token="<unk>")
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, n_ctx=64, vocab_size=len(WORDS),
                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)  # peaked, not near-uniform, outputs
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(cfg).eval()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def add_to_hub_cache(hf_home: Path, model_dir: Path, repo: str = "gpt2") -> Path:
    """``hf_home/hub/models--<repo>/{refs/main, snapshots/<rev>/}``, the layout huggingface_hub reads."""
    entry = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(REVISION)
    shutil.copytree(model_dir, entry / "snapshots" / REVISION, dirs_exist_ok=True)
    return Path(hf_home)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    """``(hf_model, tl_model)``: the HF model and the processed HookedTransformer, both from the directory."""
    from toylens.analyze.pretrained import load_hf, load_pretrained

    hf_model, _ = load_hf("gpt2", path=tiny_gpt2_dir)
    return hf_model, load_pretrained("gpt2", path=tiny_gpt2_dir)


@pytest.fixture
def tiny_gpt2_hf_home(tiny_gpt2_dir, tmp_path) -> Path:
    """An ``HF_HOME`` whose hub cache holds the tiny model as ``gpt2``."""
    return add_to_hub_cache(tmp_path / "hf_home", tiny_gpt2_dir)
