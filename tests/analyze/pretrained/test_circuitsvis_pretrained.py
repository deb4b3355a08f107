"""CircuitsVis views in the pretrained report: the clean prompts, labelled by the model's tokenizer, with
attention equal to run_with_cache's and the loss of each next token (then the answer). The page is
checked in a real browser in test_report_pretrained_browser.py."""

from __future__ import annotations

import torch

from toylens.report.config import AnalyzeConfig
from toylens.report.page import View
from toylens.report.pretrained import build_pretrained_report

CLEAN = ["When Mary and John went to store John gave", "When John and Mary went to store Mary gave"]
CORRUPTED = ["When Mary and John went to store Mary gave", "When John and Mary went to store John gave"]


def config(out, path) -> AnalyzeConfig:
    cfg = AnalyzeConfig(device="cpu", progress=False, out=str(out), analyses=["attention"])
    cfg.model.source, cfg.model.name, cfg.model.path = "pretrained", "gpt2", str(path)
    cfg.pairs.clean, cfg.pairs.corrupted = list(CLEAN), list(CORRUPTED)
    cfg.pairs.answers, cfg.pairs.wrong_answers = [" Mary", " John"], [" John", " Mary"]
    return cfg


def test_pretrained_views_show_the_clean_prompts(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    hf_model, model = tiny_gpt2
    report = build_pretrained_report(config(tmp_path / "r", tiny_gpt2_dir), model=model, hf_model=hf_model)
    views = {v.name: v for v in report.views()}
    rec = report.data["attention"]["circuitsvis"]
    tokens = model.to_tokens(CLEAN)
    assert rec["source"] == "the clean prompts" and rec["tokens"] == tokens.tolist() and rec["rows"] == [0, 1]
    _, cache = model.run_with_cache(tokens)
    for i in range(2):
        v: View = views[f"circuitsvis/attention_heads/row{i}"]
        assert v.props["tokens"] == model.to_str_tokens(CLEAN[i]) == rec["labels"][i]
        want = torch.cat([cache["pattern", layer][i] for layer in range(model.cfg.n_layers)]).double()
        assert (torch.tensor(v.props["attention"], dtype=torch.float64) - want).abs().max() < 1e-6
    # loss: each next token of the prompt, and at the last position the answer (" Mary" for the first prompt)
    logp = model(tokens[:1])[0].log_softmax(-1).double()
    targets = torch.cat([tokens[0, 1:], model.to_tokens(" Mary", prepend_bos=False)[0, :1]])
    want = -logp.gather(-1, targets[:, None])[:, 0]
    assert (torch.tensor(views["circuitsvis/loss/row0"].props["values"]) - want).abs().max() < 1e-6
    assert rec["neurons"]["hook"] == f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    assert len([n for n in views if n.startswith("circuitsvis/neuron/")]) == 2
