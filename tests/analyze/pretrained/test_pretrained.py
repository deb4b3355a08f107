"""Pretrained models from a directory and from the HF cache, offline; the HF-vs-TL check; clear errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from toylens.analyze.pretrained import (
    AnalyzeModelConfig,
    EquivalenceError,
    PretrainedError,
    check_model_config,
    hf_equivalence,
    load_pretrained,
    register_model_configs,
)

PROMPTS = ["The cat sat on the mat", "1 2 x 3 4 =", "When Mary and John went to the store John gave"]


def test_load_from_a_directory(tiny_gpt2, tiny_gpt2_dir):
    hf_model, tl = tiny_gpt2
    c = tl.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.d_vocab, c.n_ctx) == (2, 64, 4, 100, 64)
    assert c.normalization_type == "LNPre"  # processed: LayerNorm folded
    assert tl.to_str_tokens("The cat") == ["<|endoftext|>", "The", "cat"]  # its own tokenizer, BOS first
    raw = load_pretrained("gpt2", path=tiny_gpt2_dir, processing=False)
    assert raw.cfg.normalization_type == "LN"
    assert torch.equal(raw.W_E, hf_model.transformer.wte.weight)  # the weights as HF has them
    for model in (tl, raw):
        res = hf_equivalence(hf_model, model, PROMPTS, atol=1e-5)
        assert res.passed and res.max_abs_prob_diff < 1e-5 and res.max_abs_logprob_diff < 1e-4
        assert res.n_tokens == [7, 7, 11] and res.check() is res


def test_equivalence_fails_when_a_weight_is_perturbed(tiny_gpt2):
    hf_model, tl = tiny_gpt2
    bad = copy.deepcopy(tl)
    with torch.no_grad():
        # random, not constant: a constant added to W_V meets centred (LayerNorm-folded) inputs and cancels
        bad.blocks[1].attn.W_V[2] += 0.05 * torch.randn(bad.blocks[1].attn.W_V[2].shape,
                                                        generator=torch.Generator().manual_seed(0))
    res = hf_equivalence(hf_model, bad, PROMPTS, atol=1e-5)
    assert not res.passed and res.max_abs_prob_diff > 1e-3
    with pytest.raises(EquivalenceError, match=r"differ by .* > atol=1e-05 on prompt \[\d\]"):
        res.check()
    assert set(res.figures()) == {"hf_equivalence/prob_diff"}
    assert res.to_dict()["passed"] is False


def test_load_from_the_hf_cache(tiny_gpt2, tiny_gpt2_hf_home, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, from_dir = tiny_gpt2
    hf_home = tiny_gpt2_hf_home
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # what HF_HOME=<hf_home> sets
    model = load_pretrained("gpt2")
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), from_dir(tokens), atol=1e-5, rtol=0)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PretrainedError) as e:
        load_pretrained("gpt2")
    assert "model.name='gpt2' is not in the Hugging Face cache" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # ~10 s (a fresh interpreter imports TransformerLens); test_load_from_the_hf_cache covers the code
def test_load_from_the_hf_cache_with_hf_home_and_offline_env(tiny_gpt2, tiny_gpt2_hf_home):
    _, from_dir = tiny_gpt2
    hf_home = tiny_gpt2_hf_home
    code = ("import json, torch; from toylens.analyze.pretrained import load_pretrained; "
            f"m = load_pretrained('gpt2'); print(json.dumps(m(m.to_tokens({PROMPTS[0]!r}))[0, -1].tolist()))")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        expected = from_dir(from_dir.to_tokens(PROMPTS[0]))[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), expected,
                               atol=1e-5, rtol=0)


def test_bad_names_and_paths_are_one_line_errors(tmp_path):
    with pytest.raises(PretrainedError, match="model.name='no-such-model' is not a TransformerLens model name"):
        load_pretrained("no-such-model")
    with pytest.raises(PretrainedError, match=r"model.path='.*nowhere': no config.json there"):
        load_pretrained("gpt2", path=tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(PretrainedError, match=r"model.path='.*half': cannot load 'gpt2' from it") as e:
        load_pretrained("gpt2", path=tmp_path / "half")  # a config but no weights
    assert "\n" not in str(e.value)


def test_model_config_checks():
    check_model_config(AnalyzeModelConfig())
    check_model_config(AnalyzeModelConfig(source="pretrained", name="gpt2", path="/x"))
    with pytest.raises(PretrainedError, match="model.name is required with model=pretrained"):
        check_model_config(AnalyzeModelConfig(source="pretrained"))
    with pytest.raises(PretrainedError, match="model.source='hub'"):
        check_model_config(AnalyzeModelConfig(source="hub"))
    with pytest.raises(PretrainedError, match="model.dtype='int8'"):
        check_model_config(AnalyzeModelConfig(source="pretrained", name="gpt2", dtype="int8"))


def test_model_group_composes_beside_the_training_models(tmp_path):
    """``model=run|pretrained`` from ConfigStore, next to configs/model/*.yaml (the training models), which an
    analyze schema rejects; the training config is unaffected."""
    import shutil
    from dataclasses import dataclass, field

    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from toylens._paths import config_dir

    @dataclass
    class Probe:
        model: AnalyzeModelConfig = field(default_factory=AnalyzeModelConfig)

    register_model_configs()
    ConfigStore.instance().store(name="probe_schema", node=Probe)
    shutil.copytree(config_dir() / "model", tmp_path / "model")
    (tmp_path / "probe.yaml").write_text("defaults:\n  - probe_schema\n  - model: run\n  - _self_\n")

    def probe(*overrides):
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
            return OmegaConf.to_object(compose(config_name="probe", overrides=list(overrides)))

    assert probe().model == AnalyzeModelConfig(source="run")
    m = probe("model=pretrained", "model.name=gpt2", "model.path=/x", "model.processing=false").model
    assert m == AnalyzeModelConfig(source="pretrained", name="gpt2", path="/x", processing=False)
    with pytest.raises(ConfigCompositionException):
        probe("model=no_pos_2l")  # a training model is not an analyze model
    from toylens.runs.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        assert compose(config_name="train", overrides=["model=no_pos_2l"]).model.n_layers == 2
        with pytest.raises(ConfigCompositionException):  # and an analyze option is no training model
            compose(config_name="train", overrides=["model=pretrained"])


def test_analyze_yaml_takes_model_pretrained():
    """configs/analyze.yaml's ``- model: run`` default takes ``model=pretrained`` with name and path."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from toylens._paths import config_dir
    from toylens.report.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="analyze", overrides=["model=pretrained", "model.name=gpt2", "model.path=/x"])
    m = OmegaConf.to_object(cfg).model
    assert (m.source, m.name, m.path) == ("pretrained", "gpt2", "/x")
