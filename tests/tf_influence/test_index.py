"""The gradient index: projections equal P applied to exact per-example gradients (numpy reference
with the same P), approach the unprojected products as k grows, and the index's queries / top-k /
self-influence equal the exact computations; the Beam job equals the in-process build; a query with
another model is refused."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import gradients, tracin
from tf_influence.index import GradientIndex, IndexMismatchError, build_index
from tf_influence.projection import GradientProjector, ProjectionArgs, _gaussian


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="embedding")(x)
    h = keras.layers.LayerNormalization(name="norm")(h)
    model = keras.Model(x, keras.layers.Dense(3, name="head")(h))
    return model, tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def data(n=40, seed=0, batch=16):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def one_at_a_time(model, loss, x, y):
    """Per-example gradients by one GradientTape per example (the reference), flattened per variable."""
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            l = loss(y[i:i + 1], model(x[i:i + 1]))
        out.append([g.numpy() for g in tape.gradient(l, [v.value for v in model.trainable_variables])])
    return out


def test_projection_is_p_applied_to_exact_per_example_gradients():
    """numpy: Dense blocks [kernel; bias] → P_inᵀ G P_out with the projector's own P, LayerNorm's γ / β
    through their own P (k_other); in the projector's layout order."""
    model, obj = mlp()
    x, y, ds = data()
    args = ProjectionArgs(k=3, k_other=2, seed=5)
    proj = GradientProjector(obj, args=args)
    got = proj.project(ds)
    names = [v.path for v in model.trainable_variables]
    ref = []
    for grads in one_at_a_time(model, obj.loss_fn, x, y):
        g = dict(zip(names, grads))
        row = []
        for layer in ("embedding", "head"):
            G = np.concatenate([g[f"{layer}/kernel"], g[f"{layer}/bias"][None]], 0)      # [rows, d_out]
            p_in = _gaussian(5, f"{layer}/in", G.shape[0], 3)
            p_out = _gaussian(5, f"{layer}/out", G.shape[1], 3)
            row.append((p_in.T @ G @ (p_out if p_out is not None else np.eye(G.shape[1]))).ravel())
        for var in ("norm/gamma", "norm/beta"):
            row.append(g[var] @ _gaussian(5, var, g[var].size, 2))
        ref.append(np.concatenate(row))
    assert [s["key"] for s in proj.layout] == ["embedding", "head", "norm/gamma", "norm/beta"]
    np.testing.assert_allclose(got, np.asarray(ref), rtol=2e-4, atol=1e-6)
    # project_vector: the same P on a vector over the group (one column per example here)
    G = np.concatenate([g.numpy() for g in gradients.per_example_gradients(obj, ds, proj.group)])
    np.testing.assert_allclose(proj.project_vector(G.T), got, rtol=2e-4, atol=1e-6)
    # a vector over another group (another order, norm/beta left out): each variable read where it lies, the missing
    # one as 0 — the same as the vector laid out over the projector's group by hand
    variables = [v for v in reversed(proj.group.variables) if v.path != "norm/beta"]
    sub = tfi.ParameterGroup("sub", variables)
    by_path = dict(zip([v.path for v in proj.group.variables], np.split(G.T, np.cumsum(proj.group.sizes)[:-1])))
    in_sub = np.concatenate([by_path[v.path] for v in variables])
    laid = np.concatenate([np.zeros_like(by_path[v.path]) if v.path == "norm/beta" else by_path[v.path]
                           for v in proj.group.variables])
    np.testing.assert_allclose(proj.project_vector(in_sub, sub), proj.project_vector(laid), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(proj.project_vector(in_sub[:, 0], sub), proj.project_vector(laid[:, 0]), rtol=1e-6,
                               atol=1e-7)
    assert not np.allclose(proj.project_vector(laid), got, rtol=1e-2)    # norm/beta's zeros show
    with pytest.raises(ValueError, match="vector has 3 entries, the group 'sub'"):
        proj.project_vector(np.zeros(3), sub)


def test_cnn_and_keras_hub_blocks_project_like_their_exact_gradients():
    """Convolutions and a tied ReversibleEmbedding (GPT-2) through the captured path vs ``project_vector``
    of one-example gradients (``per_example_gradients``: a different path through autodiff)."""
    from model_zoo import cnn
    from tests import hub_models as hm
    pre, _, _ = cnn.build_two_stage_models((8, 8, 1), 4, 6, seed=0)
    obj = tfi.Objective(pre, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xs = np.random.default_rng(0).random((10, 8, 8, 1)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((xs, np.arange(10) % 4)).batch(4)
    case = hm.build("gpt2", n_pre=6, batch=3)
    hub = tfi.Objective(case.pretrain, case.pretrain_loss)
    for objective, dataset in ((obj, ds), (hub, case.pretrain_data)):
        proj = GradientProjector(objective, args=ProjectionArgs(k=8, k_other=16))
        G = np.concatenate([g.numpy() for g in gradients.per_example_gradients(objective, dataset, proj.group)])
        np.testing.assert_allclose(proj.project(dataset), proj.project_vector(G.T), rtol=1e-3,
                                   atol=1e-5 * np.abs(G).max())
    assert "tied" in [s["kind"] for s in proj.layout]


def test_projected_products_approach_the_exact_ones_as_k_grows():
    """Johnson–Lindenstrauss: the error of ⟨Pg, Pg'⟩ against g·g' shrinks with k (about 1/√k),
    and a projection as wide as the block is the identity (exact)."""
    model, obj = mlp()
    x, y, ds = data(60)
    G = np.concatenate([g.numpy() for g in gradients.per_example_gradients(obj, ds, tfi.ParameterGroup.from_model(model))])
    exact = G @ G.T
    errs = []
    for k in (2, 4, 8):
        e = []
        for seed in range(5):
            P = GradientProjector(obj, args=ProjectionArgs(k=k, k_other=k, seed=seed)).project(ds)
            e.append(np.abs(P @ P.T - exact).mean() / np.abs(exact).mean())
        errs.append(np.mean(e))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.75 * errs[0]
    P = GradientProjector(obj, args=ProjectionArgs(k=100, k_other=100)).project(ds)
    np.testing.assert_allclose(P @ P.T, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    model, obj = mlp()
    x, y, ds = data(50)
    root = tmp_path_factory.mktemp("index")
    index = build_index(obj, ds, str(root / "exact"), args=ProjectionArgs(k=100, k_other=100, dtype="float32"),
                        shard_size=15)
    return model, obj, x, y, ds, index, root


def test_queries_equal_exact_influence_scores_and_their_top_k(indexed):
    """With the identity projection a multi-stage-style query ``∇g(z)·s`` from the index equals
    ``per_example_dot``; top-k harmful / helpful are the largest / most negative of those scores."""
    model, obj, x, y, ds, index, _ = indexed
    assert index.count == 50 and len(index.shards) == 4
    group = tfi.ParameterGroup.from_model(model)
    S = np.random.default_rng(1).normal(size=(group.size, 3))
    exact = gradients.per_example_dot(obj, ds, group, S, method="jacobian")        # [N, 3]
    res = index.query(obj, S, tfi.QueryArgs(top_k=7, all_scores=True))
    order = np.argsort([int(k) for k in res.keys])
    np.testing.assert_allclose(res.scores[:, order].T, exact, rtol=1e-4, atol=1e-6)
    for q in range(3):
        want_hi = np.argsort(-exact[:, q])[:7]
        want_lo = np.argsort(exact[:, q])[:7]
        assert [int(k) for k in res.harmful_keys[q]] == list(want_hi)
        assert [int(k) for k in res.helpful_keys[q]] == list(want_lo)
        np.testing.assert_allclose(res.harmful_scores[q], exact[want_hi, q], rtol=1e-4, atol=1e-6)
    # a measurement to raise (a log-probability): harmful are the most negative scores, most harmful first
    up = index.query(obj, S, tfi.QueryArgs(top_k=7, higher_is_better=True))
    for q in range(3):
        assert [int(k) for k in up.harmful_keys[q]] == list(np.argsort(exact[:, q])[:7])
        assert [int(k) for k in up.helpful_keys[q]] == list(np.argsort(-exact[:, q])[:7])
        assert up.harmful_scores[q][0] == res.helpful_scores[q][0] < 0


def test_self_influence_from_the_index_is_the_ghost_norm_scorer(indexed):
    model, obj, x, y, ds, index, _ = indexed
    keys, sq = index.self_influence()
    ref = tracin.self_influence(obj, ds)                     # ghost norms over every layer
    np.testing.assert_allclose(sq[np.argsort([int(k) for k in keys])], ref, rtol=1e-4)


def test_another_model_or_a_missing_index_is_refused(indexed, tmp_path):
    model, obj, x, y, ds, index, root = indexed
    other, other_obj = mlp(seed=1)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        index.query(other_obj, np.zeros(tfi.ParameterGroup.from_model(other).size))
    # the same model object: hashed in full once, then only a sample of every variable — until its weights
    # change (as training or loading other weights changes them), when the full fingerprint refuses them
    from tf_influence import index as index_module
    calls = []
    full = index_module.fingerprint
    fresh = GradientIndex(index.directory)
    saved = [w.numpy() for w in model.weights]
    try:
        index_module.fingerprint = lambda *a: calls.append(1) or full(*a)
        p = tfi.ParameterGroup.from_model(model).size
        fresh.query(obj, np.zeros(p))
        fresh.query(obj, np.zeros(p))
        assert len(calls) == 1
        model.weights[0].assign(saved[0] * 1.01)
        with pytest.raises(IndexMismatchError, match="fingerprint"):
            fresh.query(obj, np.zeros(p))
        assert len(calls) == 2
    finally:
        index_module.fingerprint = full
        for w, v in zip(model.weights, saved):
            w.assign(v)
    with pytest.raises(FileNotFoundError, match="no gradient index"):
        GradientIndex(str(tmp_path))
    with pytest.raises(ValueError, match="unknown field"):
        ProjectionArgs.from_dict({"kk": 3})


def test_int8_storage_scores_within_its_rounding_of_float32(indexed, tmp_path):
    """The default int8 storage (per-example scale max|v|/127) against float32, the same projection:
    every score within the rounding bound Σ_d |q_d|·scale/2."""
    model, obj, x, y, ds, _, _ = indexed
    args = ProjectionArgs(k=3, k_other=2)
    i8 = build_index(obj, ds, str(tmp_path / "i8"), args=args)
    f32 = build_index(obj, ds, str(tmp_path / "f32"), args=ProjectionArgs(k=3, k_other=2, dtype="float32"))
    assert i8.meta["dtype"] == "int8" and i8.dim == f32.dim
    q = np.random.default_rng(2).normal(size=(4, i8.dim)).astype(np.float32)
    a = i8.query_projected(q, tfi.QueryArgs(all_scores=True)).scores
    b = f32.query_projected(q, tfi.QueryArgs(all_scores=True)).scores
    vecs = np.concatenate([v for _, v in f32.iter_shards()])
    bound = np.abs(q).sum(1)[:, None] * (np.abs(vecs).max(1) / 127 / 2)[None, :]
    assert np.all(np.abs(a - b) <= bound * 1.001 + 1e-7)
    assert np.abs(a - b).max() > 0                             # it is quantised
    assert i8.bytes_per_example() < f32.bytes_per_example() / 1.8         # (keys and zip headers count too)


def test_stored_vectors_equal_numpy_quantisation_and_the_diagonal_preconditioner(indexed, tmp_path):
    """The encoding runs inside the projection's graph: the stored int8 (and float16) vectors equal a
    numpy quantisation of the float32 projection (per-example scale max|v|/127, half to even), also
    where a batch crosses a shard boundary (batches of 16, shards of 15); ``mean_square`` is the mean of
    the stored vectors' squares and a ``precondition="diagonal"`` query divides by it plus damping.
    NaN gradients are refused naming the examples."""
    model, obj, x, y, ds, _, _ = indexed
    args = ProjectionArgs(k=3, k_other=2, dtype="float32")
    v = GradientProjector(obj, args=args).project(ds)                          # [50, dim] float32
    scales = np.abs(v).max(1) / 127.0
    want = {"int8": np.rint(v / scales[:, None]).astype(np.int8).astype(np.float32) * scales[:, None].astype(
        np.float32), "float16": v.astype(np.float16).astype(np.float32)}
    for dtype, ref in want.items():
        index = build_index(obj, ds, str(tmp_path / dtype), args=ProjectionArgs(k=3, k_other=2, dtype=dtype),
                            shard_size=15)
        assert [s["count"] for s in index.meta["shards"]] == [15, 15, 15, 5]
        got = np.concatenate([vs for _, vs in index.iter_shards()])
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(index.mean_square(), (ref.astype(np.float64) ** 2).mean(0), rtol=1e-5)
    q = np.random.default_rng(3).normal(size=(2, index.dim)).astype(np.float32)
    ms = (ref.astype(np.float64) ** 2).mean(0)
    res = index.query_projected(q, tfi.QueryArgs(all_scores=True, precondition="diagonal", damping=0.1))
    np.testing.assert_allclose(res.scores, (q / (ms + 0.1 * ms.mean())) @ ref.T, rtol=1e-4)
    bad = tf.data.Dataset.from_tensor_slices((np.where(np.arange(50)[:, None] == 20, np.nan, x).astype(np.float32),
                                              y)).batch(16)
    with pytest.raises(ValueError, match=r"examples 16\.\.31 contain NaN"):
        build_index(obj, bad, str(tmp_path / "nan"), args=args)


def test_ekfac_preconditioned_queries_and_query_args(indexed):
    """``precondition="ekfac"``: each query is multiplied by the factors' damped inverse over the
    index's parameters before projection, so (identity projection) the scores are exactly
    ``∇g(z)·(F̂ + λ)⁻¹q`` from per-example gradients; the options are one ``QueryArgs`` (keywords
    override it; an unknown one, ekfac without factors, all_scores with faiss are refused)."""
    from tf_influence import kfac
    from tf_influence.index import QueryArgs
    model, obj, x, y, ds, index, _ = indexed
    group = tfi.ParameterGroup.from_model(model)
    factors = kfac.fit_factors(obj, ds, group)
    S = np.random.default_rng(5).normal(size=(group.size, 2))
    inv = kfac.KFACInverse(factors, model, group, relative_damping=0.1)
    exact = gradients.per_example_dot(obj, ds, group, inv(tf.constant(S, group.dtype)).numpy(), method="jacobian")
    res = index.query(obj, S, QueryArgs(top_k=4, all_scores=True, damping=0.1), factors=factors)
    order = np.argsort([int(k) for k in res.keys])
    np.testing.assert_allclose(res.scores[:, order].T, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    assert not np.allclose(exact, gradients.per_example_dot(obj, ds, group, S, method="jacobian"), rtol=0.1)
    assert QueryArgs.from_json(QueryArgs(top_k=7, precondition="diagonal").to_json()) == QueryArgs(
        top_k=7, precondition="diagonal")
    want = [int(k) for k in index.query(obj, S[:, 0], QueryArgs(top_k=3)).harmful_keys[0]]
    with pytest.warns(DeprecationWarning, match=r"top_k in the place of args is deprecated: use "
                                                r"GradientIndex\.query\(objective, vectors, QueryArgs\(top_k=3\)\)"):
        assert [int(k) for k in index.query(obj, S[:, 0], 3).harmful_keys[0]] == want    # old positional top_k
    with pytest.warns(DeprecationWarning, match=r"GradientIndex\.query\(top_k=\.\.\.\) is deprecated: use "
                                                r"GradientIndex\.query\(args=QueryArgs\(top_k=\.\.\.\)\)"):
        assert [int(k) for k in index.query(obj, S[:, 0], top_k=3).harmful_keys[0]] == want  # keyword form
    with pytest.raises(TypeError, match=r"unexpected keyword argument .top_kk. \(the options are the fields of QueryArgs"):
        index.query(obj, S, top_kk=3)
    with pytest.raises(ValueError, match="needs factors"):
        index.query(obj, S, tfi.QueryArgs(precondition="ekfac"))              # neither a directory nor fitted factors
    with pytest.raises(ValueError, match="only used by precondition='ekfac'"):
        QueryArgs(factors="some/dir")
    assert QueryArgs(precondition="ekfac").factors is None     # fitted factors come with the call
    with pytest.raises(ValueError, match="all_scores needs the exact backend"):
        QueryArgs(all_scores=True, backend="faiss")
    with pytest.raises(ValueError, match="over the parameters"):
        index.query_projected(np.zeros((1, index.dim)), tfi.QueryArgs(precondition="ekfac"))


def test_rerank_rescored_candidates_exactly(indexed, tmp_path):
    """``rerank``: the candidates of a lossy index (k = 2) are re-scored with exact per-example
    gradients — with every example a candidate the top-k and its scores are the exact ones; with
    fewer, the kept keys carry their exact scores in order and recall does not drop."""
    model, obj, x, y, ds, _, _ = indexed
    group = tfi.ParameterGroup.from_model(model)
    lossy = build_index(obj, ds, str(tmp_path / "lossy"), args=ProjectionArgs(k=2, k_other=2, dtype="float32"),
                        keys=[f"ex{i}" for i in range(50)])
    keys = [f"ex{i}" for i in range(50)]
    S = np.random.default_rng(7).normal(size=(group.size, 3))
    exact = gradients.per_example_dot(obj, ds, group, S, method="jacobian")
    full = lossy.query(obj, S, tfi.QueryArgs(top_k=5, rerank=50), dataset=ds, keys=keys)
    assert full.backend == "exact+rerank"
    plain = lossy.query(obj, S, tfi.QueryArgs(top_k=5))
    some = lossy.query(obj, S, tfi.QueryArgs(top_k=5, rerank=12), dataset=ds, keys=keys)
    for q in range(3):
        want = np.argsort(-exact[:, q])[:5]
        assert [int(k[2:]) for k in full.harmful_keys[q]] == list(want)
        np.testing.assert_allclose(full.harmful_scores[q], exact[want, q], rtol=1e-5, atol=1e-8)
        assert [int(k[2:]) for k in full.helpful_keys[q]] == list(np.argsort(exact[:, q])[:5])
        got = [int(k[2:]) for k in some.harmful_keys[q]]
        np.testing.assert_allclose(some.harmful_scores[q], exact[got, q], rtol=1e-5, atol=1e-8)
        assert list(some.harmful_scores[q]) == sorted(some.harmful_scores[q], reverse=True)
        recall = lambda ks: len(set(int(k[2:]) for k in ks) & set(want)) / 5  # noqa: E731
        assert recall(some.harmful_keys[q]) >= recall(plain.harmful_keys[q])
    with pytest.raises(ValueError, match="pass the indexed corpus"):
        lossy.query(obj, S, tfi.QueryArgs(rerank=10))
    with pytest.raises(ValueError, match="not in the dataset's keys"):
        lossy.query(obj, S, tfi.QueryArgs(rerank=10), dataset=ds)                 # built with keys: positions do not match
    with pytest.raises(ValueError, match="diagonal preconditioner"):
        lossy.query(obj, S, tfi.QueryArgs(rerank=10, precondition="diagonal"), dataset=ds, keys=keys)


def test_the_budget_is_shared_by_gradient_norm():
    """``allocate``: within the budget, equal shares get equal sizes, a larger share never fewer, a
    block's small side is made exact (a 10-class head keeps its 10 outputs) while a square block
    grows both sides alike; ``calibrate`` on a keras-hub GPT-2 gives the tied token embedding —
    most of the gradient — the largest block, sizes every segment (the index rebuilds it without
    data) and fits the budget; by default a projection is at most half the gradient."""
    from tf_influence.projection import allocate, budget, calibrate
    segs = {"a": ("block", 50, 50), "b": ("block", 50, 50), "c": ("block", 50, 50), "v": ("variable", 40),
            "head": ("block", 200, 10)}
    level = allocate({"a": 1.0, "b": 1.0, "c": 4.0, "v": 0.5, "head": 1.0}, segs, 900)
    dims = {k: level[k][0] * level[k][1] for k in ("a", "b", "c", "head")}
    assert level["a"] == level["b"] and dims["c"] > dims["a"]
    assert abs(level["c"][0] - level["c"][1]) <= 1 and level["head"][1] == 10 and level["head"][0] < 200
    assert sum(dims.values()) + level["v"] <= 900 and sum(dims.values()) + level["v"] > 900 - 50
    small = GradientProjector(mlp()[1])
    assert small.dim <= budget(ProjectionArgs(), small.group.size) == small.group.size // 2
    from tests import hub_models as hm
    case = hm.build("gpt2", n_pre=12, batch=4)
    obj = tfi.Objective(case.pretrain, case.pretrain_loss)
    args = calibrate(obj, case.pretrain_data, args=ProjectionArgs(max_dim=400))
    proj = GradientProjector(obj, args=args)
    sizes = {s["key"]: s["dim"] for s in proj.layout}
    assert set(args.layer_k) == set(sizes) and proj.dim <= 400
    emb = [k for k in sizes if "token_embedding" in k][0]
    assert sizes[emb] == max(v for k, v in sizes.items() if k in {b.name for b in proj.blocks})
    again = GradientProjector(obj, args=ProjectionArgs.from_json(args.to_json()))
    np.testing.assert_array_equal(again.project(case.pretrain_data), proj.project(case.pretrain_data))


def test_the_beam_job_equals_the_in_process_index_and_the_query_cli(indexed, tmp_path):
    from tests.tfx_components.test_example_io import write_records
    from tfx_components import beam_index, example_io
    model, obj, x, y, ds, index, root = indexed
    rows = [{"x": x[i], "label": [int(y[i])]} for i in range(50)]
    files = write_records(str(tmp_path / "ex"), rows, shards=2)
    path = str(tmp_path / "model.keras")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(path)
    beam_index.main(["build", "--examples", str(tmp_path / "ex" / "*"), "--model", path, "--output",
                     str(tmp_path / "idx"), "--k", "100", "--k-other", "100", "--dtype", "float32",
                     "--batch-size", "8", "--direct_running_mode=in_memory"])
    job = GradientIndex(str(tmp_path / "idx"))
    assert job.count == 50 and job.meta["model_fingerprint"] == index.meta["model_fingerprint"]
    where = {example_io.record_key(f, p): s + 2 * p for s, f in enumerate(files) for p in range(25)}
    got = {k: v for ks, vs in job.iter_shards() for k, v in zip(ks, vs)}
    ref = {int(k): v for ks, vs in index.iter_shards() for k, v in zip(ks, vs)}
    for k, i in where.items():
        np.testing.assert_allclose(got[k], ref[i], rtol=1e-4, atol=1e-7)
    s = np.random.default_rng(3).normal(size=tfi.ParameterGroup.from_model(model).size).astype(np.float32)
    np.save(tmp_path / "s.npy", s)
    beam_index.main(["query", "--index", str(tmp_path / "idx"), "--model", path, "--vector", str(tmp_path / "s.npy"),
                     "--top-k", "5", "--out", str(tmp_path / "top.json")])
    top = json.load(open(tmp_path / "top.json"))["queries"][0]
    lib = job.query(obj, s, tfi.QueryArgs(top_k=5))
    assert [k for k, _ in top["harmful"]] == [k.decode() for k in lib.harmful_keys[0]]
    assert [k for k, _ in top["helpful"]] == [k.decode() for k in lib.helpful_keys[0]]
    # EK-FAC-preconditioned queries from saved factors: the command equals the library
    from tf_influence import kfac
    kfac.fit_factors(obj, ds, tfi.ParameterGroup.from_model(model)).save(str(tmp_path / "factors"))
    beam_index.main(["query", "--index", str(tmp_path / "idx"), "--model", path, "--vector", str(tmp_path / "s.npy"),
                     "--top-k", "5", "--precondition", "ekfac", "--factors", str(tmp_path / "factors"),
                     "--damping", "0.1", "--out", str(tmp_path / "top_ekfac.json")])
    top = json.load(open(tmp_path / "top_ekfac.json"))["queries"][0]
    lib = job.query(obj, s, tfi.QueryArgs(top_k=5, damping=0.1), factors=str(tmp_path / "factors"))
    assert [k for k, _ in top["harmful"]] == [k.decode() for k in lib.harmful_keys[0]]
    with pytest.raises(SystemExit):          # ekfac without factors: a usage error naming the rule
        beam_index.main(["query", "--index", str(tmp_path / "idx"), "--model", path, "--vector",
                         str(tmp_path / "s.npy"), "--precondition", "ekfac"])
    assert not [p for p in os.listdir(tmp_path / "idx") if p.startswith(".tmp-")]
    # the defaults: the driver shares the budget by gradient norm on the first file's examples and the
    # workers project with the resolved sizes — the in-process projection with the index's own arguments
    beam_index.main(["build", "--examples", str(tmp_path / "ex" / "*"), "--model", path, "--output",
                     str(tmp_path / "idx_default"), "--max-dim", "40", "--direct_running_mode=in_memory"])
    default = GradientIndex(str(tmp_path / "idx_default"))
    resolved = default.projection_args
    assert resolved.k is None and default.dim <= 40 and set(resolved.layer_k) == {s["key"] for s in default.meta["layout"]}
    want = GradientProjector(obj, args=resolved).project(ds)
    got = {k: v for ks, vs in default.iter_shards() for k, v in zip(ks, vs)}
    for k, i in where.items():
        np.testing.assert_allclose(got[k], want[i], rtol=0.02, atol=0.01 * np.abs(want[i]).max())   # int8


def test_the_default_k_is_the_largest_within_the_budget():
    from model_zoo import cnn
    pre, _, _ = cnn.build_two_stage_models((8, 8, 1), 4, 6, seed=0)
    obj = tfi.Objective(pre, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    size = tfi.ParameterGroup.from_model(pre).size
    for budget, fraction in ((300, 1.0), (900, 1.0), (2000, 1.0), (2000, 0.5)):
        proj = GradientProjector(obj, args=ProjectionArgs(max_dim=budget, max_fraction=fraction))
        budget = min(budget, int(fraction * size))                  # at most half the gradient by default
        bigger = GradientProjector(obj, args=ProjectionArgs(k=proj.k + 1))
        assert proj.dim <= budget < bigger.dim, (budget, proj.k, proj.dim, bigger.dim)
        assert proj.dim == GradientProjector(obj, args=ProjectionArgs(k=proj.k)).dim


def test_the_faiss_backend_searching_every_list_is_the_exact_top_k(indexed):
    """FAISS's inverted-file index with every list probed is exhaustive: the same top-k both sides as the
    exact backend (the wiring: inner products, the negated query for the helpful side, keys)."""
    pytest.importorskip("faiss")
    model, obj, x, y, ds, index, _ = indexed
    q = np.random.default_rng(4).normal(size=(3, index.dim)).astype(np.float32)
    exact = index.query_projected(q, tfi.QueryArgs(top_k=5, backend="exact"))
    approx = index.query_projected(q, tfi.QueryArgs(top_k=5, backend="faiss", nprobe=10_000))
    assert approx.backend == "faiss"
    np.testing.assert_array_equal(approx.harmful_keys, exact.harmful_keys)
    np.testing.assert_array_equal(approx.helpful_keys, exact.helpful_keys)
    np.testing.assert_allclose(approx.helpful_scores, exact.helpful_scores, rtol=1e-4, atol=1e-6)


def test_calibration_reads_until_the_shares_are_known():
    """``gradient_norm_shares`` (what ``calibrate`` allocates by): its per-segment means are the mean
    squared norms of one-tape-per-example gradients over exactly the examples it read; it reads at
    least ``min_examples`` and stops at the first batch where the share-weighted relative standard
    error ``Σ SE / Σ mean`` (recomputed here from those gradients) is within ``tolerance`` —
    ``tolerance=0`` reads ``examples``; a NaN gradient is named, not allocated."""
    from tf_influence.projection import gradient_norm_shares
    model, obj = mlp()
    x, y, ds = data(n=96, batch=8)
    names = [v.path for v in model.trainable_variables]
    parts = {"embedding": ("embedding/kernel", "embedding/bias"), "head": ("head/kernel", "head/bias"),
             "norm/gamma": ("norm/gamma",), "norm/beta": ("norm/beta",)}
    sq = {k: [] for k in parts}
    for grads in one_at_a_time(model, obj.loss_fn, x, y):
        g = dict(zip(names, grads))
        for k, vs in parts.items():
            sq[k].append(sum(float(np.sum(np.square(g[v].astype(np.float64)))) for v in vs))
    sq = {k: np.array(v) for k, v in sq.items()}

    def rse(n):
        return sum(v[:n].std(ddof=1) / np.sqrt(n) for v in sq.values()) / sum(v[:n].mean() for v in sq.values())

    group = GradientProjector(obj).group
    segments = dict.fromkeys(parts)
    stops = []
    for tol in (rse(32) * 1.001, rse(56) * 1.0001, rse(32) * 0.5, 0.0):
        means, n, got_rse = gradient_norm_shares(obj, ds, group, segments, examples=80, min_examples=32,
                                                 tolerance=tol)
        first = next((m for m in range(32, 81, 8) if rse(m) <= tol), 80)   # the first batch boundary that meets it
        assert n == first, (tol, n, first)
        stops.append(n)
        assert np.isclose(got_rse, rse(n), rtol=1e-4)
        for k in parts:
            np.testing.assert_allclose(means[k], sq[k][:n].mean(), rtol=1e-4)
    assert stops[0] == 32 and 32 < stops[1] < 80 and stops[2:] == [80, 80]       # every branch of the rule ran
    assert gradient_norm_shares(obj, ds, group, segments, tolerance=0.0)[1] == 96      # fewer than `examples`
    # an index says what its calibration read (the default rule here: the first batch boundary within 10 %)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        meta = build_index(obj, ds, tmp).meta["calibration"]
    default = next((m for m in range(32, 97, 8) if rse(m) <= 0.1), 96)
    assert meta["examples"] == default and np.isclose(meta["relative_standard_error"], rse(default), rtol=1e-4)
    assert (meta["min_examples"], meta["max_examples"], meta["tolerance"]) == (32, 256, 0.1)
    bad = x.copy()
    bad[3, 0] = np.nan
    nan_ds = tf.data.Dataset.from_tensor_slices((bad, y)).batch(8)
    with pytest.raises(ValueError, match=r"calibration: the per-example gradients of \['embedding'.*NaN"):
        gradient_norm_shares(obj, nan_ds, group, segments)


def test_small_token_tables_keep_their_token_side_exact():
    """With room for it (rows · 8 ≤ max_dim) a tied token embedding is projected on its feature side
    only ([rows, k_out]); the captured projection still equals P applied to one-example gradients."""
    from tf_influence.projection import calibrate
    from tests import hub_models as hm
    case = hm.build("gpt2", n_pre=12, batch=4)
    obj = tfi.Objective(case.pretrain, case.pretrain_loss)
    args = calibrate(obj, case.pretrain_data, args=ProjectionArgs(max_dim=1500))
    proj = GradientProjector(obj, args=args)
    (emb,) = [s for s in proj.layout if s["kind"] == "tied"]
    assert args.layer_k[emb["key"]][0] == emb["rows"] == emb["k_in"] and emb["k_out"] < emb["d_out"]
    assert proj.dim <= 1500
    G = np.concatenate([g.numpy() for g in gradients.per_example_gradients(obj, case.pretrain_data, proj.group)])
    np.testing.assert_allclose(proj.project(case.pretrain_data), proj.project_vector(G.T), rtol=1e-3,
                               atol=1e-5 * np.abs(G).max())


def test_bad_projection_args_are_named():
    for bad in ({"fc": 0}, {"fc": [4, 0]}, {"fc": [4]}, {"fc": [4, 4, 4]}):
        with pytest.raises(ValueError, match=r"layer_k values must be a number ≥ 1 or \[k_in, k_out\].*'fc'"):
            ProjectionArgs(layer_k=bad)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_fraction must be in"):
            ProjectionArgs(max_fraction=fraction)
    assert ProjectionArgs(layer_k={"fc": [4, 2], "head": 3}).layer_k == {"fc": [4, 2], "head": 3}
