"""auto-circuit 1.0.1 beside toylens (benchmarks only): the one-module shim it needs on TransformerLens 3.9, and
its EAP, integrated gradients and ACDC on a copy of our model with the same prompt pairs, edges named as ours.

auto-circuit is not a toylens dependency (it pins kaleido 0.2.1 and pulls vscode-tqdm, which installs a module
named ``tqdm``); install it beside the project, then point the benchmark at it:

    pip install --no-deps --target /tmp/acpkgs auto-circuit==1.0.1 blobfile ordered-set word2word lxml pycryptodomex
    python benchmarks/circuit_speed.py --auto-circuit /tmp/acpkgs
"""

from __future__ import annotations

import copy
import sys
import types

import torch

from toylens.analyze.pairs import PromptPairs


def install_shim() -> None:
    """auto-circuit imports ``transformer_lens.past_key_value_caching.HookedTransformerKeyValueCache``; 3.9 moved
    the class to ``transformer_lens.cache.key_value_cache`` (renamed). Only type hints and ``None`` defaults use it
    in the paths run here (no key-value caching: diverge index 0)."""
    import transformer_lens
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    shim = types.ModuleType("transformer_lens.past_key_value_caching")
    shim.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    sys.modules[shim.__name__] = shim
    transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache


def load(path: str | None) -> str | None:
    """Import auto-circuit (``path`` appended to sys.path, after the project's own packages, so its vscode-tqdm
    never shadows tqdm). Returns None when it imports, else the reason."""
    if path:
        sys.path.append(path)
    install_shim()
    try:
        import auto_circuit.prune_algos.ACDC  # noqa: F401
        import auto_circuit.prune_algos.mask_gradient  # noqa: F401
    except ImportError as e:
        return f"{e} (install: see benchmarks/auto_circuit_side.py)"
    return None


def _our_name(name: str) -> str:
    """auto-circuit's node names -> ours: 'Resid Start' embed, 'A1.0' L1H0, 'A1.0.Q' L1H0.q, 'MLP 0' MLP0,
    'Resid End' logits."""
    if name == "Resid Start":
        return "embed"
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return "MLP" + name[4:]
    parts = name[1:].split(".")
    head = f"L{parts[0]}H{parts[1]}"
    return head + (f".{parts[2].lower()}" if len(parts) == 3 else "")


class AutoCircuit:
    """A patchable copy of ``model`` (TransformerLens flags auto-circuit asserts: attention results, split q/k/v
    inputs, MLP inputs) and one batch of ``pairs``; every answer must sit at the last position (its output slice
    is "last_seq")."""

    def __init__(self, model, pairs: PromptPairs, order: list[tuple[str, str]]):
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.utils.graph_utils import patchable_model

        if not bool((pairs.answer_pos == pairs.n_pos - 1).all()):
            raise ValueError("auto-circuit reads the last position only: give pairs answered there")
        m = copy.deepcopy(model)
        m.set_use_attn_result(True)
        m.set_use_split_qkv_input(True)
        if not m.cfg.attn_only:
            m.set_use_hook_mlp_in(True)
        n = pairs.batch_size
        ds = PromptDataset(pairs.clean, pairs.corrupted, [pairs.answers[i, 0, :1] for i in range(n)],
                           [pairs.answers[i, 1, :1] for i in range(n)])
        self.loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=n, shuffle=False)
        self.model = patchable_model(m, factorized=True, slice_output="last_seq", separate_qkv=True,
                                     device=torch.device("cpu"))
        by_name = {(_our_name(e.src.name), _our_name(e.dest.name)): e for e in self.model.edges}
        if set(by_name) != set(order):
            raise ValueError(f"edge sets differ: {len(by_name)} auto-circuit edges, {len(order)} ours")
        # ACDC visits model.edges sorted (stably) by destination layer; hand it our visiting order, so a tie can
        # only break the same way (its own order is a Python set's)
        self.model.edges = [by_name[k] for k in order]
        self.edges = by_name

    def scores(self, prune_scores) -> dict[tuple[str, str], float]:
        return {k: float(e.prune_score(prune_scores)) for k, e in self.edges.items()}

    def eap(self):
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

        return mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                          answer_function="avg_diff", mask_val=0.0)

    def integrated_gradients(self, steps: int):
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

        return mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                          answer_function="avg_diff", integrated_grad_samples=steps)

    def acdc_kept(self, base: int, exp: int) -> set[tuple[str, str]]:
        """ACDC at the one threshold ``base * 10**exp`` on KL to the clean output; the edges it keeps."""
        from auto_circuit.prune_algos.ACDC import acdc_prune_scores

        ps = acdc_prune_scores(self.model, self.loader, None, tao_exps=[exp], tao_bases=[base],
                               faithfulness_target="kl_div")
        return {k for k, e in self.edges.items() if torch.isinf(e.prune_score(ps))}
