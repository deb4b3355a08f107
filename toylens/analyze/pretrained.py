"""Pretrained models from disk, never from the network, and the HF-vs-TransformerLens check of seed 003.

    model = load_pretrained("gpt2")                          # the Hugging Face cache (HF_HOME)
    model = load_pretrained("gpt2", path="/models/gpt2")     # a save_pretrained directory
    hf_model, tokenizer = load_hf("gpt2", path="/models/gpt2")
    hf_equivalence(hf_model, model, ["12 x 34 ="]).check()  # softmax of both within atol

Loading goes through TransformerLens's own ``HookedTransformer.from_pretrained`` (or
``from_pretrained_no_processing``) with the Hub offline for the duration of the call
(``HF_HUB_OFFLINE=1`` semantics). ``name`` is a TransformerLens model name (it picks the weight
conversion); the weights, tokenizer and config come from ``path`` or the cache's snapshot folder of
``name``, by absolute path (a folder called ``gpt2`` in the working directory is never read instead).
TransformerLens reads configs by hub name only, so that ``config.json`` is shown to it as a one-file
cache entry in a temporary directory (with GPT-2's ``n_ctx``, which transformers 5 no longer saves).
A model that is not on this machine is a one-line ``PretrainedError`` naming it and the fix.

``AnalyzeModelConfig`` is the schema of ``toylens-analyze model=run|pretrained`` (ConfigStore
group ``model``; see ``register_model_configs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from toylens.analyze import plots
from toylens.result import Result

if TYPE_CHECKING:
    from toylens._compat import HookedTransformer

MODEL_SOURCES = ("run", "pretrained")
DTYPES = ("float32", "float64", "bfloat16", "float16")


class PretrainedError(ValueError):
    """A pretrained model that cannot be loaded from this machine; one line naming it and the fix."""


class EquivalenceError(AssertionError):
    """The HookedTransformer's next-token distribution differs from the Hugging Face model's."""


# --- config (toylens-analyze model=...) -----------------------------------------------------------
@dataclass
class AnalyzeModelConfig:
    source: str = "run"  # run: the model of run=<dir>; pretrained: load name/path below
    name: str | None = None  # a TransformerLens model name, e.g. gpt2 or Qwen/Qwen2.5-0.5B
    path: str | None = None  # a save_pretrained directory; null: the Hugging Face cache (HF_HOME)
    processing: bool = True  # fold LayerNorm and centre weights (from_pretrained); false: no_processing
    dtype: str = "float32"


def register_model_configs() -> None:
    """ConfigStore group ``model`` for toylens-analyze: options ``run`` (default) and ``pretrained``.

    Registered by the analyze CLI only: ``configs/model/`` is the training model group, and
    ConfigStore options join it for toylens-analyze without training ever seeing them.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="run", node=AnalyzeModelConfig(source="run"))
    cs.store(group="model", name="pretrained", node=AnalyzeModelConfig(source="pretrained"))


def check_model_config(m: AnalyzeModelConfig) -> None:
    """Raise PretrainedError (one line: field and fix) for a model config that cannot work."""
    if m.source not in MODEL_SOURCES:
        raise PretrainedError(f"model.source={m.source!r}: choose model=run or model=pretrained")
    if m.dtype not in DTYPES:
        raise PretrainedError(f"model.dtype={m.dtype!r}: choose one of {', '.join(DTYPES)}")
    if m.source == "pretrained" and not m.name:
        raise PretrainedError("model.name is required with model=pretrained: a TransformerLens model name, e.g. "
                              "model.name=gpt2 (add model.path=<dir> for a save_pretrained directory)")


# --- loading ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No network for Hugging Face downloads inside the block, as with ``HF_HUB_OFFLINE=1``.

    huggingface_hub reads that variable once, at import, into ``constants.HF_HUB_OFFLINE``, which
    every download checks at call time; setting the variable now would do nothing.
    """
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def official_name(name: str) -> str:
    """TransformerLens's official name for ``name`` (an alias such as ``gpt2-small`` is fine)."""
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(name)
    except ValueError:
        raise PretrainedError(f"model.name={name!r} is not a TransformerLens model name; use one of "
                              f"transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES (e.g. gpt2), "
                              f"with model.path=<dir> for weights saved on disk") from None


def _check_path(path: str | Path) -> Path:
    p = Path(path).expanduser().resolve()
    if not (p / "config.json").is_file():
        raise PretrainedError(f"model.path={str(path)!r}: no config.json there; pass a directory written by "
                              f"save_pretrained (model and tokenizer)")
    return p


def _missing(name: str, path: Path | None, e: BaseException) -> PretrainedError:
    if path is not None:
        return PretrainedError(f"model.path={str(path)!r}: cannot load {name!r} from it ({_one_line(e, 120)}); "
                               f"save the model and its tokenizer there with save_pretrained")
    from huggingface_hub import constants

    return PretrainedError(f"model.name={name!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                           f"nothing is downloaded; copy a cache holding it there (or set HF_HOME) or pass "
                           f"model.path=<a save_pretrained directory>")


def load_hf(name: str, path: str | Path | None = None, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The Hugging Face model (eval mode) and tokenizer, from ``path`` or the cache, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    official_name(name)  # an unknown name fails here, in one line
    p = _check_path(path if path is not None else cached_snapshot(name))
    src = str(p)
    try:
        with hub_offline():
            hf_model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=getattr(torch, dtype))
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except OSError as e:  # missing files (huggingface_hub's not-found errors are OSErrors too)
        raise _missing(name, p, e) from None
    return hf_model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _config_as_cache(official: str, path: Path) -> Iterator[str]:
    """A temporary hub cache whose only entry is ``official`` -> ``path/config.json``."""
    with tempfile.TemporaryDirectory(prefix="toylens-hf-") as cache:
        entry = Path(cache) / f"models--{official.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("local")
        (entry / "snapshots" / "local").mkdir(parents=True)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
            config["n_ctx"] = config["n_positions"]  # transformers 5 no longer writes it; TransformerLens reads it
        (entry / "snapshots" / "local" / "config.json").write_text(json.dumps(config))
        with _cwd(cache):  # a folder named like the model in the cwd must not be read instead of this entry
            yield cache


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def cached_snapshot(name: str) -> Path:
    """The Hugging Face cache's folder of ``name`` (absolute, so a folder of that name in the cwd is not
    read instead), or PretrainedError when the cache does not hold it."""
    from huggingface_hub import snapshot_download

    official = official_name(name)
    try:
        with hub_offline():
            return Path(snapshot_download(official, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends: nothing in the cache
        raise _missing(name, None, e) from None


def load_pretrained(name: str, path: str | Path | None = None, device: str = "cpu", *, processing: bool = True,
                    dtype: str = "float32") -> HookedTransformer:
    """A pretrained HookedTransformer, in eval mode, from the Hugging Face cache or ``path``.

    ``processing=True``: ``from_pretrained`` (LayerNorm folded, writing weights and unembedding
    centred; the same next-token distribution). ``processing=False``: ``from_pretrained_no_processing``,
    the weights as the Hugging Face model has them. Nothing is downloaded.
    """
    from transformer_lens import HookedTransformer

    from toylens.model.build import quiet_transformer_lens

    official = official_name(name)
    p = _check_path(path if path is not None else cached_snapshot(name))
    loader = HookedTransformer.from_pretrained if processing else HookedTransformer.from_pretrained_no_processing
    kwargs: dict[str, Any] = dict(device=device, dtype=dtype, local_files_only=True)
    with contextlib.ExitStack() as stack:
        kwargs["hf_model"], kwargs["tokenizer"] = load_hf(name, p, "cpu", dtype)
        kwargs["cache_dir"] = stack.enter_context(_config_as_cache(official, p))
        stack.enter_context(hub_offline())
        stack.enter_context(quiet_transformer_lens())
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # TL prints "Loaded pretrained model ..."
        try:
            model = loader(official, **kwargs)
        except OSError as e:
            raise _missing(name, p, e) from None
    return model.eval()


# --- HF vs TransformerLens ------------------------------------------------------------------------
@dataclass
class EquivalenceResult(Result):
    """Seed 003's check: the softmax of the HF and the TransformerLens logits, prompt by prompt.

    ``prob_diff[i]``/``logprob_diff[i]``: max |delta probability| / |delta log-probability| over the
    positions and vocabulary of prompt ``i`` (in float64 from each model's logits).
    """

    prompts: list[str]
    n_tokens: list[int]
    atol: float
    prob_diff: Float[Tensor, " prompt"]
    logprob_diff: Float[Tensor, " prompt"]
    max_abs_prob_diff: float
    max_abs_logprob_diff: float
    passed: bool

    def check(self) -> EquivalenceResult:
        """``self`` when the probabilities agree within ``atol``, else EquivalenceError."""
        if not self.passed:
            i = int(self.prob_diff.argmax())
            raise EquivalenceError(f"HF and TransformerLens probabilities differ by {self.max_abs_prob_diff:.3g} > "
                                   f"atol={self.atol:g} on prompt [{i}] {self.prompts[i]!r}; the conversion or "
                                   f"the weights differ (compare with processing=False)")
        return self

    def figures(self) -> dict:
        labels = [f"[{i}] {p[:30]}" for i, p in enumerate(self.prompts)]
        return {"hf_equivalence/prob_diff": plots.bar(
            self.prob_diff, labels=labels, xaxis="prompt", yaxis="max |delta prob|",
            title=f"HF vs TransformerLens: max |delta prob| {self.max_abs_prob_diff:.2g} (atol {self.atol:g})")}


@torch.no_grad()
def hf_equivalence(hf_model: Any, tl_model: HookedTransformer, prompts: str | Sequence[str], atol: float = 1e-5,
                   prepend_bos: bool | None = None) -> EquivalenceResult:
    """Run both models on the same tokens (``tl_model.to_tokens``, one prompt at a time) and compare
    their next-token distributions. ``passed``: max |delta prob| <= ``atol`` (seed 003's assert)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: give at least one prompt to compare the models on")
    hf_device = next(hf_model.parameters()).device
    prob_diff, logprob_diff, n_tokens = [], [], []
    for prompt in prompts:
        tokens = tl_model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
        hf_lp = hf_model(tokens.to(hf_device)).logits.double().log_softmax(-1).cpu()
        tl_lp = tl_model(tokens, return_type="logits").double().log_softmax(-1).cpu()
        prob_diff.append((hf_lp.exp() - tl_lp.exp()).abs().max())
        logprob_diff.append((hf_lp - tl_lp).abs().max())
        n_tokens.append(tokens.shape[1])
    p, lp = torch.stack(prob_diff), torch.stack(logprob_diff)
    return EquivalenceResult(prompts=prompts, n_tokens=n_tokens, atol=atol, prob_diff=p, logprob_diff=lp,
                             max_abs_prob_diff=float(p.max()), max_abs_logprob_diff=float(lp.max()),
                             passed=bool(p.max() <= atol))
