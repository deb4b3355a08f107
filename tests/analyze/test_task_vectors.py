"""Task vectors: resumed, stacked patching equals one ``run_with_hooks`` per point and vector."""

import json

import pytest
import torch

from toylens.analyze.task_vectors import (
    TaskVectorError,
    patched_logits,
    resid_at,
    resid_points,
    task_vectors,
)
from toylens.data import TASKS
from toylens.model.build import hooked_config, make_model
from toylens.runs.config import ModelConfig


def icl_task(**kw):
    cfg = dict(n_symbols=8, group_size=3, n_demos=2, ks=[0, 1, 2])
    cfg.update(kw)
    return TASKS["icl"](TASKS["icl"].config_cls(**cfg))


def tiny_model(task, pos="standard", n_layers=2):
    mc = ModelConfig(n_layers=n_layers, d_model=32, n_heads=2, d_head=16, d_mlp=64, positional_embedding_type=pos,
                     init_range=0.4)
    return make_model(hooked_config(mc, d_vocab=task.d_vocab, n_ctx=task.seq_len, seed=0), pos).eval()


def naive_patch(model, tokens, pos, point, vector, mask=None):
    """Logits at ``pos`` with ``vector`` ([d_model] or [batch, d_model]) written at (point, pos), or at
    every position ``mask`` ([batch, pos] bool) marks."""
    def put(act, hook):
        act = act.clone()
        if mask is None:
            act[:, pos] = vector
        else:
            for row, at in mask.nonzero().tolist():
                act[row, at] = vector if vector.ndim == 1 else vector[row]
        return act
    return model.run_with_hooks(tokens, fwd_hooks=[(point, put)])[:, pos]


@pytest.mark.parametrize("pos", ["standard", "none", "rotary"])
@torch.no_grad()
def test_patched_logits_equal_naive_loop(pos):
    task = icl_task()
    model = tiny_model(task, pos, n_layers=3)
    tokens = task.sample_rule(10, torch.Generator().manual_seed(0), 1).tokens
    points = resid_points(model)
    arrow = task.arrow_position()
    vectors = torch.randn(len(points), 3, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    got = patched_logits(model, tokens, arrow, vectors, points, chunk_rows=7)  # chunks split the variants' rows
    for i, point in enumerate(points):
        for v in range(3):
            ref = naive_patch(model, tokens, arrow, point, vectors[i, v])
            torch.testing.assert_close(got[i, v], ref, atol=1e-5, rtol=0)
    per_row = torch.randn(len(points), 2, 10, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    got = patched_logits(model, tokens, arrow, per_row, points[1:3], chunk_rows=4)
    for i, point in enumerate(points[1:3]):
        ref = naive_patch(model, tokens, arrow, point, per_row[i, 1])
        torch.testing.assert_close(got[i, 1], ref, atol=1e-5, rtol=0)
    # several positions per row (every ';'), one vector per row
    where = task.separators(tokens)
    assert int(where.sum()) == 2 * 10
    got = patched_logits(model, tokens, arrow, per_row, points[1:3], where=where, chunk_rows=3)
    for i, point in enumerate(points[1:3]):
        for v in range(2):
            ref = naive_patch(model, tokens, arrow, point, per_row[i, v], where)
            torch.testing.assert_close(got[i, v], ref, atol=1e-5, rtol=0)


def naive_answer(task, group, k):
    """Rule ``k``'s answer to ``group`` ([batch, g] token ids), by hand: pick ``group[k]`` or shift ``x + k``."""
    if task.cfg.rule == "shift":
        return (group[:, 0] - 3 + k) % task.cfg.n_symbols + 3
    return group[:, k]


def naive_task_vectors(model, task, n, seed, site):
    """The whole analysis as plain loops: run_with_cache for the vectors, run_with_hooks per patch."""
    g, bos, semi, arrow_tok = task.cfg.group_size, task.BOS, task.SEMI, task.ARROW
    gen = torch.Generator().manual_seed(seed)
    arrow = task.arrow_position()
    demos = [task.sample_rule(n, gen, k).tokens for k in task.ks]
    zero = task.sample_rule(n, gen, task.ks[0], n_demos=0).tokens
    q_group = zero[:, -2 - g:-2]  # [BOS, fillers.., x_1..x_g, ->, y]
    queries = torch.tensor([[bos, semi, *row, arrow_tok] for row in q_group.tolist()])
    arrow0 = g + 2

    def sites(tokens):  # [batch, pos] bool: where the vector goes
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for row in range(len(tokens)):
            if tokens.shape[1] == queries.shape[1]:
                mask[row, arrow0 if site == "arrow" else 1] = True
            elif site == "arrow":
                mask[row, arrow] = True
            else:
                mask[row, [i for i in range(arrow) if tokens[row, i] == semi]] = True
        return mask

    points = resid_points(model)
    theta, demo_acc = {}, []
    for k, tokens in zip(task.ks, demos, strict=True):
        logits, cache = model.run_with_cache(tokens)
        demo_acc.append((logits[:, arrow].argmax(-1) == tokens[:, arrow + 1]).float().mean())
        src = [arrow if site == "arrow" else max(i for i in range(arrow) if row[i] == semi) for row in tokens]
        for p in points:
            theta[p, k] = torch.stack([cache[p][row, at] for row, at in enumerate(src)]).mean(0)
    plain = model(queries)[:, arrow0].argmax(-1)
    zero_shot = torch.stack([(plain == naive_answer(task, q_group, k)).float().mean() for k in task.ks])
    acc = torch.zeros(len(points), len(task.ks))
    follows = torch.full((2, len(points), len(task.ks), len(task.ks)), float("nan"))
    for i, p in enumerate(points):
        for j, k in enumerate(task.ks):
            pred = naive_patch(model, queries, arrow0, p, theta[p, k], sites(queries)).argmax(-1)
            acc[i, j] = (pred == naive_answer(task, q_group, k)).float().mean()
            for jj, kk in enumerate(task.ks):
                if kk == k:
                    continue
                pred = naive_patch(model, demos[j], arrow, p, theta[p, kk], sites(demos[j])).argmax(-1)
                group = demos[j][:, arrow - g:arrow]
                follows[0, i, j, jj] = (pred == naive_answer(task, group, kk)).float().mean()
                follows[1, i, j, jj] = (pred == naive_answer(task, group, k)).float().mean()
    return acc, zero_shot, torch.stack(demo_acc), follows


@pytest.mark.parametrize("pos,ks,rule,site,fillers", [
    ("standard", [0, 1, 2], "pick", "separator", 0), ("standard", [0, 2], "pick", "arrow", 2),
    ("rotary", [1, 4, 6], "shift", "arrow", 3), ("rotary", [1, 4, 6], "shift", "separator", 3)])
@torch.no_grad()
def test_task_vectors_equal_naive_loops(pos, ks, rule, site, fillers):
    kw = dict(ks=ks, fillers=fillers) if rule == "pick" else dict(ks=ks, rule=rule, group_size=1, fillers=fillers)
    task = icl_task(**kw)
    model = tiny_model(task, pos)
    res = task_vectors(model, task, site=site, n=24, seed=3, chunk_rows=16, progress=False)
    acc, zero_shot, demo, follows = naive_task_vectors(model, task, 24, 3, site)
    assert res.site == site and res.hooks == resid_points(model) and res.ks == ks
    torch.testing.assert_close(res.accuracy, acc)
    torch.testing.assert_close(res.accuracy_mean, acc.mean(1))
    torch.testing.assert_close(res.zero_shot_baseline, zero_shot)
    torch.testing.assert_close(res.demo_baseline, demo)
    torch.testing.assert_close(res.swap_follows_vector, follows[0], equal_nan=True)
    torch.testing.assert_close(res.swap_follows_demos, follows[1], equal_nan=True)
    scored = torch.cat([acc.flatten(), zero_shot, follows.nan_to_num().flatten()])
    assert scored.max() > 0  # some prediction is scored right: the comparison is not all zeros


@torch.no_grad()
def test_invariants():
    task = icl_task()
    model = tiny_model(task, "standard")
    queries = task.sample_rule(16, torch.Generator().manual_seed(5), 0, n_demos=0).tokens
    arrow0, points = task.arrow_position(0), resid_points(model)
    own, plain = resid_at(model, queries, arrow0, points)  # [point, batch, d_model]
    torch.testing.assert_close(plain, model(queries)[:, arrow0], atol=1e-5, rtol=0)
    # writing each query's own residual stream back changes nothing, at every point
    back = patched_logits(model, queries, arrow0, own[:, None], points)
    for i in range(len(points)):
        torch.testing.assert_close(back[i, 0], plain, atol=1e-5, rtol=0)
    res = task_vectors(model, task, n=16, seed=0, progress=False)
    # the vector at block 0's input is the arrow's embedding at the demos' arrow position, for every rule
    theta0 = model.W_E[task.ARROW] + model.W_pos[task.arrow_position()]
    torch.testing.assert_close(res.vectors[0], theta0.expand(3, -1), atol=1e-6, rtol=0)
    # at the separator site it is the last ';' embedding (at its position), and the zero-shot prompts
    # [BOS, ;, x.., ->] hold a ';' at position 1 where it goes
    sep = task_vectors(model, task, site="separator", n=16, seed=0, progress=False)
    theta0 = model.W_E[task.SEMI] + model.W_pos[task.arrow_position() - task.cfg.group_size - 1]
    torch.testing.assert_close(sep.vectors[0], theta0.expand(3, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(sep.demo_baseline, res.demo_baseline)  # the same demo prompts
    # at the last block's output every query predicts what the vector itself unembeds to
    last = patched_logits(model, queries, arrow0, res.vectors[-1:], points[-1:])[0]  # [k, batch, d_vocab]
    direct = model.unembed(model.ln_final(res.vectors[-1][:, None]))[:, 0]  # [k, d_vocab]
    torch.testing.assert_close(last, direct[:, None].expand_as(last), atol=1e-5, rtol=0)


@torch.no_grad()
def test_no_positional_embedding_vector_at_the_embeddings_is_the_arrow_itself():
    task = icl_task()
    model = tiny_model(task, "none")
    res = task_vectors(model, task, n=16, progress=False)
    # W_pos is zero: theta at blocks.0.hook_resid_pre is W_E[->], the zero-shot arrow's own embedding
    torch.testing.assert_close(res.accuracy[0], res.zero_shot_baseline)


@torch.no_grad()
def test_result_dict_and_figures():
    task = icl_task()
    model = tiny_model(task)
    res = task_vectors(model, task, n=8, layers=[0, "blocks.1.hook_resid_pre", 2], progress=False)
    assert res.hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    d = json.loads(json.dumps(res.to_dict()))
    best = d["best"]
    assert best["hook"] == res.hooks[int(res.accuracy_mean.argmax())]
    assert best["accuracy"] == pytest.approx(res.accuracy_mean.max().item())
    assert best["zero_shot_baseline"] == pytest.approx(res.zero_shot_baseline.mean().item())
    assert d["swap_follows_vector"][0][0][0] is None and len(d["swap_follows_vector_mean"]) == 3
    figs = res.figures()
    assert set(figs) == {"task_vectors/arrow/accuracy", "task_vectors/arrow/swap", "task_vectors/arrow/swap_best"}
    assert list(figs["task_vectors/arrow/accuracy"].data[0].y) == pytest.approx(res.accuracy_mean.tolist())
    assert list(figs["task_vectors/arrow/accuracy"].data[1].y) == pytest.approx(
        [res.zero_shot_baseline.mean().item()] * 3)


def test_bad_input_names_the_argument():
    task = icl_task()
    model = tiny_model(task)
    with pytest.raises(TaskVectorError, match="task"):
        task_vectors(model, TASKS["prev_token"](TASKS["prev_token"].config_cls(d_vocab=20, seq_len=12)))
    with pytest.raises(TaskVectorError, match="site='query'"):
        task_vectors(model, task, site="query")
    with pytest.raises(TaskVectorError, match="layers"):
        task_vectors(model, task, layers=[7])
    with pytest.raises(TaskVectorError, match="n_demos"):
        task_vectors(model, icl_task(n_demos=0))
    with pytest.raises(TaskVectorError, match="n_ctx"):
        task_vectors(model, icl_task(n_demos=5))


@pytest.mark.parametrize("name", ["bidirectional", "inverse-layer-scale", "logit-softcap", "grouped-query",
                                  "rms-silu"])
@torch.no_grad()
def test_patched_logits_equal_naive_loop_over_the_engine_matrix(name):
    # Bidirectional: positions after the '->' are run too (they change what the '->' sees).
    from toylens.model.zoo import random_model

    task = icl_task()
    model = random_model(name, d_vocab=task.d_vocab, n_ctx=task.seq_len).to(torch.float64, print_details=False)
    tokens = task.sample_rule(6, torch.Generator().manual_seed(0), 1).tokens
    points = resid_points(model)
    arrow = task.arrow_position() - 2  # not the last position
    vectors = torch.randn(len(points), 2, model.cfg.d_model, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    got = patched_logits(model, tokens, arrow, vectors, points, chunk_rows=5)
    for i, point in enumerate(points):
        for v in range(2):
            torch.testing.assert_close(got[i, v].double(), naive_patch(model, tokens, arrow, point, vectors[i, v]),
                                       atol=1e-5, rtol=1e-5)
    _, logits = resid_at(model, tokens, arrow, points)
    torch.testing.assert_close(logits.double(), model(tokens)[:, arrow], atol=1e-9, rtol=1e-9)
