"""Loading edge cases: a transformers 5 GPT2Config without ``n_ctx``, and a folder named like the model
in the working directory (which must not be read instead of the Hugging Face cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from toylens.analyze.pretrained import load_hf, load_pretrained


def _without_n_ctx(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("n_ctx", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gpt2_config_without_n_ctx_loads(tiny_gpt2_dir, tiny_gpt2, tmp_path):
    from transformers import AutoConfig

    d = _without_n_ctx(tiny_gpt2_dir, tmp_path / "no_n_ctx")
    assert not hasattr(AutoConfig.from_pretrained(d), "n_ctx")  # what transformers 5 gives TransformerLens
    model = load_pretrained("gpt2", path=d)
    assert model.cfg.n_ctx == 64
    tokens = torch.tensor([[0, 5, 9, 12]])
    torch.testing.assert_close(model(tokens), tiny_gpt2[1](tokens))


def test_a_gpt2_folder_in_the_cwd_does_not_shadow_the_cache(tiny_gpt2_hf_home, tiny_gpt2, tmp_path):
    cwd = tmp_path / "work"
    (cwd / "gpt2").mkdir(parents=True)
    (cwd / "gpt2" / "config.json").write_text("{}")  # what made AutoConfig say "Unrecognized model in gpt2"
    code = ("import torch; from toylens.analyze.pretrained import load_pretrained, load_hf; "
            "m = load_pretrained('gpt2'); h, _ = load_hf('gpt2'); t = torch.tensor([[0, 5, 9, 12]]); "
            "print(m.cfg.d_model, float((m(t).log_softmax(-1) - h(t).logits.log_softmax(-1)).abs().max()))")
    env = {**os.environ, "HF_HOME": str(tiny_gpt2_hf_home), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    d_model, diff = p.stdout.split()
    assert d_model == "64" and float(diff) < 1e-4
    assert os.getcwd() != str(cwd)


def test_a_model_missing_from_the_cache_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from toylens.analyze.pretrained import PretrainedError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for load in (load_pretrained, load_hf):
        try:
            load("gpt2")
        except PretrainedError as e:
            assert "is not in the Hugging Face cache" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError("loaded a model that is not there")
