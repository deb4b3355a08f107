"""CircuitsVis views in the report: attention heads and patterns, per-position loss and MLP neurons as
coloured tokens, on a few example sequences (a run's own evaluation sequences, or a pretrained
model's clean prompts), labelled with token names. Works offline: see ``View`` and ``html.py``.

Each view's props are what ``circuitsvis.attention.attention_heads`` (etc.) would render; the page draws
them with the bundle ``circuitsvis/dist/cdn/iife.js`` that ``write_report`` copies once into the
report folder as ``circuitsvis.js`` (CircuitsVis's own HTML inlines 1.3 MB per view, or loads unpkg).
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from toylens.report.page import Note, View

if TYPE_CHECKING:
    import torch

BUNDLE = "circuitsvis.js"  # the copy of circuitsvis/dist/cdn/iife.js in the report folder
N_EXAMPLES = 3  # example sequences shown
N_NEURONS = 2  # neurons of the last MLP shown as coloured tokens
MAX_VALUES = 200_000  # attention weights per view at most: longer sequences show their first positions only
DECIMALS = 6  # props are rounded to this many decimals (|error| <= 5e-7): a smaller page


def bundle_path() -> Path:
    """The installed circuitsvis package's browser bundle (it defines the global ``CircuitsVis``)."""
    import circuitsvis

    return Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"


_RENDER_CALL = re.compile(r'render\(\s*"circuits-vis-[^"]*",\s*(\w+),\s*(\{.*\})\s*\)\s*</script>\s*$', re.S)


def view_props(fn, **kwargs) -> tuple[str, dict]:
    """(component, props) of a CircuitsVis view: ``fn`` (e.g. ``circuitsvis.tokens.colored_tokens``) is called
    and its rendered call is read back, so the props are exactly those circuitsvis would pass."""
    rendered = fn(**kwargs)
    m = _RENDER_CALL.search(rendered.cdn_src)
    if m is None:  # a circuitsvis whose HTML changed shape: say so instead of drawing nothing
        raise RuntimeError(f"cannot read the props of circuitsvis's {fn.__name__} view (circuitsvis changed?)")
    return m.group(1), json.loads(m.group(2))


def _round(t: torch.Tensor) -> list:
    import torch

    return torch.round(t.detach().double().cpu(), decimals=DECIMALS).tolist()


def _examples(ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[str]], str]:
    """(tokens, targets, scored mask, token labels per row, where they come from) for the examples. A toy
    run's labels are its token names with a leading space (CircuitsVis joins tokens as text, like GPT-2's)."""
    import torch

    b = ctx.batch[:N_EXAMPLES]
    tokens = b.tokens
    if ctx.run is not None:  # a toy run: the task's own evaluation sequences, scored as in training
        names = list(ctx.run.task.token_names)
        labels = [[" " + (names[t] if t < len(names) else str(t)) for t in row.tolist()] for row in tokens]
        return tokens, b.targets, b.loss_mask, labels, "the first sequences of the evaluation batch"
    # a pretrained model's clean prompts: each next token of the prompt, then the answer at its position
    targets, mask = torch.zeros_like(tokens), torch.zeros_like(b.loss_mask)
    targets[:, :-1], mask[:, :-1] = tokens[:, 1:], True
    targets, mask = torch.where(b.loss_mask, b.targets, targets), mask | b.loss_mask
    labels = [list(ctx.model.to_str_tokens(row)) for row in tokens]
    return tokens, targets, mask, labels, "the clean prompts"


def example_activations(model, tokens: torch.Tensor) -> dict:
    """Attention patterns ``[row, layer*head, query_pos, key_pos]``, logits and the last MLP's hook_post."""
    import torch

    c = model.cfg
    last_mlp = None if c.attn_only else f"blocks.{c.n_layers - 1}.mlp.hook_post"
    want = {f"blocks.{layer}.attn.hook_pattern" for layer in range(c.n_layers)} | {last_mlp}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in want)
    pattern = torch.cat([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(c.n_layers)], dim=1)
    return {"logits": logits, "pattern": pattern, "mlp_hook": last_mlp,
            "mlp_post": cache[last_mlp] if last_mlp else None}


def _token_loss(logits, targets, mask) -> torch.Tensor:
    import torch

    loss = -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return torch.where(mask, loss, torch.zeros_like(loss))


def _span(mask_row: torch.Tensor) -> str:
    pos = mask_row.nonzero().flatten().tolist()
    if not pos:
        return "no position is scored"
    runs, start = [], pos[0]
    for a, b in zip(pos, pos[1:] + [None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}–{a}")
            start = b
    return "scored positions " + ", ".join(runs[:6]) + (" …" if len(runs) > 6 else "")


def attention_views(ctx) -> list:
    """The blocks (views, a paragraph, notes) for the attention section; records them in
    ``ctx.data["attention"]["circuitsvis"]`` (which rows, their tokens and labels, which neurons). If the views
    fail, the section keeps its other results and says why (also in report.json's ``errors``)."""
    try:
        return _attention_views(ctx)
    except Exception as e:  # the static attention results above stay valid
        line = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ctx.data.setdefault("attention", {})["circuitsvis"] = {"error": line}
        ctx.data.setdefault("errors", []).append({"analysis": "attention (CircuitsVis views)", "error": line})
        return [Note(f"FAILED: the CircuitsVis views: {line}", "fail")]


def _attention_views(ctx) -> list:
    import circuitsvis.attention as cva
    import circuitsvis.tokens as cvt

    model, c = ctx.model, ctx.model.cfg
    tokens, targets, mask, labels, source = _examples(ctx)
    acts = example_activations(model, tokens)
    heads = [f"L{layer}H{h}" for layer in range(c.n_layers) for h in range(c.n_heads)]
    causal = getattr(c, "attention_dir", "causal") == "causal"
    n = len(tokens)
    blocks: list = [(
        f"Interactive views (CircuitsVis) of {n} example sequence{'s' if n > 1 else ''}, {source}, labelled "
        f"with their tokens (and positions): hover or click a head to enlarge it and read each attention weight; "
        f"hover a token to see its value.")]
    record: dict = {"source": source, "rows": list(range(len(tokens))), "tokens": tokens.tolist(),
                    "labels": labels, "heads": heads, "views": []}

    def add(fn, name, title, caption, **kwargs) -> None:
        component, props = view_props(fn, **kwargs)
        blocks.append(View(name, component, props, title, caption))
        record["views"].append({"name": name, "component": component, "title": title})

    k = min(tokens.shape[1], math.isqrt(MAX_VALUES // len(heads)))  # positions shown in the attention views
    record["attention_positions_shown"] = k
    cut = f" Only the first {k} of {tokens.shape[1]} positions are shown (a smaller page)." \
        if k < tokens.shape[1] else ""
    for i in range(len(tokens)):
        add(cva.attention_heads, f"circuitsvis/attention_heads/row{i}",
            f"Sequence {i}: every head's attention ({_span(mask[i])})",
            "Row = the query position doing the looking, column = the key position it reads; "
            "each row sums to 1. Click a head to pin it." + cut,
            attention=_round(acts["pattern"][i, :, :k, :k]), tokens=labels[i][:k], attention_head_names=heads,
            mask_upper_tri=causal)
        blocks[-1].collapsed = i > 0  # the first example open, the others one click away
    add(cva.attention_patterns, "circuitsvis/attention_patterns/row0", "Sequence 0: heads side by side",
        "The same attention as above, one small pattern per head (CircuitsVis attention_patterns): hover a token "
        "to see where it looks (and what looks at it) in every head at once. Head 0, Head 1, … are "
        f"{', '.join(heads[:3])}{', …' if len(heads) > 3 else ''} in that order." + cut,
        tokens=labels[0][:k], attention=_round(acts["pattern"][0, :, :k, :k]))
    loss = _token_loss(acts["logits"][0], targets[0], mask[0])
    record["loss_row0"] = _round(loss)
    scored = loss[mask[0]]
    mean = f"mean {float(scored.mean()):.3g}, max {float(scored.max()):.3g}" if len(scored) else "nothing scored"
    top_loss = math.log(c.d_vocab)  # a uniform guess: the colour scale is absolute, not relative to this row
    add(cvt.colored_tokens, "circuitsvis/loss/row0", f"Sequence 0: loss at each position ({mean})",
        f"Cross-entropy of the correct next token at each position; white = 0, darkest = {top_loss:.3g} (the loss "
        f"of a uniform guess over {c.d_vocab} tokens) or more. Positions the task does not score show 0.",
        tokens=labels[0], values=record["loss_row0"], min_value=0.0, max_value=top_loss)
    if acts["mlp_post"] is None:
        blocks.append(Note("Attention-only model: there are no MLP neurons to show.", "info"))
    else:
        post = acts["mlp_post"][0]  # [pos, d_mlp]
        # position 0 (BOS) is left out of the choice: neurons that only fire there say little about the task
        first = 1 if len(post) > 1 else 0
        top = post[first:].max(dim=0).values.topk(min(N_NEURONS, post.shape[1])).indices.tolist()
        record["neurons"] = {"hook": acts["mlp_hook"], "row": 0, "top": top,
                             "rule": "largest activation at positions >= 1 of sequence 0"}
        for n in top:
            values = post[:, n]
            peak = first + int(values[first:].argmax())
            add(cvt.colored_tokens, f"circuitsvis/neuron/{acts['mlp_hook']}/{n}",
                f"Sequence 0: neuron {n} of {acts['mlp_hook']} (peak {float(values[peak]):.3g} at position {peak}"
                f"{f'; {float(values[0]):.3g} at position 0' if first else ''})",
                f"One of the {len(top)} neurons of the last MLP with the largest activation on this sequence "
                f"(after position 0); each token is coloured by the neuron's activation (hook_post) there.",
                tokens=labels[0], values=_round(values))
    ctx.data.setdefault("attention", {})["circuitsvis"] = record
    return blocks


# --- on the page ---------------------------------------------------------------------------------
_CSS = (".tl-cv{margin:12px 0;border:1px solid #dde2ea;border-radius:6px;padding:4px 8px 8px;overflow-x:auto}"
        ".tl-cv figcaption,.tl-cv summary{font-size:14px;font-weight:600;padding:4px 0 0}"
        ".tl-cv summary{cursor:pointer} .tl-cv summary span{font-weight:400;color:#5b6575}"
        ".tl-cv p.cv-caption{color:#5b6575;font-size:13px;margin:2px 0 6px}")

# Once the page is parsed, each view is drawn into its own container by the bundle's global ``CircuitsVis``;
# a view that cannot be drawn is marked data-rendered="error" and logged to the console (the browser test
# reads both).
_JS = r"""
document.addEventListener("DOMContentLoaded", function () {
  "use strict";
  Array.prototype.forEach.call(document.querySelectorAll("div.tl-cvis"), function (div) {
    try {
      var view = JSON.parse(document.getElementById("data-" + div.id).textContent);
      if (typeof CircuitsVis === "undefined" || !CircuitsVis[view.component]) {
        throw new Error("CircuitsVis." + view.component + " is not loaded (circuitsvis.js missing?)");
      }
      CircuitsVis.render(div.id, CircuitsVis[view.component], view.props);
      div.setAttribute("data-rendered", "1");
    } catch (err) {
      div.setAttribute("data-rendered", "error");
      console.error("toylens: view " + div.id + " failed to render: " + err);
    }
  });
});
"""


def bundle_tags(inline: bool = False) -> str:
    """The page's head tags for CircuitsVis: the style, and the bundle (``<script src>`` of the report folder's
    copy, or the bundle itself with ``inline``, for a self-contained page such as wandb's copy)."""
    if inline:
        src = bundle_path().read_text(encoding="utf-8").replace("</script", "<\\/script")  # only inside strings
        return f"<style>{_CSS}</style><script>{src}</script><script>{_JS}</script>"
    return f'<style>{_CSS}</style><script src="{BUNDLE}"></script><script>{_JS}</script>'


def view_html(view: View, data_scripts: list[str]) -> str:
    """A view's own container (never self-closing, so views side by side do not nest) with its title and
    caption; its component and props go to ``data_scripts`` as JSON (``bundle_tags`` draws them)."""
    spec = json.dumps({"component": view.component, "props": view.props}, separators=(",", ":"), allow_nan=False)
    spec = spec.replace("</", "<\\/")  # "</" inside <script> would end it early
    data_scripts.append(f'<script type="application/json" id="data-{view.id}">{spec}</script>')
    body = (f'<p class="cv-caption">{html.escape(view.caption)}</p><div class="tl-cvis" id="{view.id}" '
            f'data-name="{html.escape(view.name)}" data-component="{html.escape(view.component)}"></div>')
    if view.collapsed:
        return (f'<details class="tl-cv"><summary>{html.escape(view.title)} <span>(click to open)</span></summary>'
                f"{body}</details>")
    return f'<figure class="tl-cv"><figcaption>{html.escape(view.title)}</figcaption>{body}</figure>'

