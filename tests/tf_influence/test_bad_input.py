"""Bad input gets a clear error naming the problem."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h


@pytest.fixture(scope="module")
def m():
    rng = np.random.default_rng(0)
    pre, ft, emb = h.two_stage_mlps()
    return dict(pre=pre, ft=ft, xp=rng.normal(size=(12, 5)), yp=rng.integers(0, 3, 12),
                xf=rng.normal(size=(10, 5)), yf=rng.integers(0, 2, 10))


def ms(m, xp=None, xf=None, **kw):
    """MultiStageInfluence on ``m``; keywords that are InfluenceArgs fields go into ``args``."""
    xp = m["xp"] if xp is None else xp
    xf = m["xf"] if xf is None else xf
    names = {f.name for f in dataclasses.fields(tfi.InfluenceArgs)}
    options = {k: kw.pop(k) for k in list(kw) if k in names}
    return tfi.MultiStageInfluence(tfi.Objective(m["pre"], h.sce()), h.dataset(xp, m["yp"][:len(xp)]),
                                   tfi.Objective(m["ft"], h.sce()), h.dataset(xf, m["yf"][:len(xf)]),
                                   **{"embedding": ["embedding"],
                                      "args": tfi.InfluenceArgs(**{"hessian_samples": None, **options}), **kw})


def test_missing_layer_is_named(m):
    with pytest.raises(tfi.ParameterGroupError, match="no layer named 'encoder'.*embedding"):
        tfi.group_from_layers(m["pre"], ["encoder"])
    with pytest.raises(tfi.ParameterGroupError, match="no layer named 'encoder'"):
        ms(m, embedding=["encoder"])
    with pytest.raises(tfi.ParameterGroupError, match="no layer named 'head'"):
        ms(m, finetune_head=["head"])


def test_nested_layers_are_found(m):
    g = tfi.group_from_layers(m["pre"], ["emb_dense"])  # inside the `embedding` sub-model
    assert g.size == 5 * 3 + 3


def test_mismatched_groups(m):
    W = tfi.group_from_layers(m["pre"], ["embedding"])
    T = tfi.group_from_layers(m["ft"], ["theta"])
    with pytest.raises(tfi.ParameterGroupError, match="do not match"):
        ms(m, embedding=(W, T))
    with pytest.raises(tfi.ParameterGroupError, match="share"):
        ms(m, pretrain_head=["embedding", "U"])
    with pytest.raises(tfi.ParameterGroupError, match="empty"):
        tfi.ParameterGroup("nothing", ())
    with pytest.raises(tfi.ParameterGroupError, match="not in group"):
        W.slices(T)


def test_nan_losses(m):
    bad = m["xp"].copy()
    bad[3, 1] = np.nan
    obj = tfi.Objective(m["pre"], h.sce())
    g = tfi.ParameterGroup.from_model(m["pre"], "all")
    ds = h.dataset(bad, m["yp"])
    with pytest.raises(tfi.NonFiniteError, match="NaN or Inf"):
        tfi.HessianOperator(obj, ds, g).matvec(np.ones(g.size))
    with pytest.raises(tfi.NonFiniteError):
        list(tfi.per_example_gradients(obj, ds, g))
    with pytest.raises(tfi.NonFiniteError):
        tfi.mean_gradient(obj, ds, g)
    with pytest.raises(tfi.NonFiniteError):
        tfi.per_example_dot(obj, ds, g, np.ones(g.size))
    with pytest.raises(tfi.NonFiniteError):
        ms(m, xp=bad)(h.dataset(m["xf"], m["yf"]))


def test_empty_datasets(m):
    obj = tfi.Objective(m["pre"], h.sce())
    g = tfi.ParameterGroup.from_model(m["pre"], "all")
    empty = h.dataset(m["xp"][:0], m["yp"][:0])
    with pytest.raises(tfi.EmptyDatasetError, match="empty"):
        tfi.HessianOperator(obj, empty, g)
    with pytest.raises(tfi.EmptyDatasetError, match="pretraining data is empty"):
        ms(m, xp=m["xp"][:0])
    with pytest.raises(tfi.EmptyDatasetError, match="finetuning data is empty"):
        ms(m, xf=m["xf"][:0])
    with pytest.raises(tfi.EmptyDatasetError, match="test data is empty"):
        ms(m)(h.dataset(m["xf"][:0], m["yf"][:0]))
    with pytest.raises(tfi.EmptyDatasetError):
        list(tfi.per_example_gradients(obj, empty, g))


def test_wrong_dataset_layout(m):
    obj = tfi.Objective(m["pre"], h.sce())
    g = tfi.ParameterGroup.from_model(m["pre"], "all")
    with pytest.raises(ValueError, match=r"\(features, labels\) pairs"):
        tfi.mean_gradient(obj, tf.data.Dataset.from_tensor_slices(m["xp"]).batch(4), g)


def test_labels_outside_the_models_classes_are_named(m):
    yp = m["yp"].copy()
    yp[4] = 7  # the pretraining model has 3 classes
    bad = tfi.MultiStageInfluence(tfi.Objective(m["pre"], h.sce()), h.dataset(m["xp"], yp),
                                  tfi.Objective(m["ft"], h.sce()), h.dataset(m["xf"], m["yf"]),
                                  embedding=["embedding"], args=tfi.InfluenceArgs(hessian_samples=None))
    with pytest.raises(tfi.DatasetError, match=r"pretraining Hessian.*label value 7 is outside the model's "
                                               r"classes \[0, 3\)"):
        bad(h.dataset(m["xf"], m["yf"]))
    yt = m["yf"].copy()
    yt[0] = 5
    with pytest.raises(tfi.DatasetError, match=r"test data.*label value 5 is outside the model's classes \[0, 2\)"):
        ms(m)(h.dataset(m["xf"], yt))
    with pytest.raises(tfi.DatasetError, match=r"pretraining data.*label value 7"):
        tfi.pretraining_loss_scores(tfi.Objective(m["pre"], h.sce()), h.dataset(m["xp"], yp))


def test_unbatched_datasets_are_named(m):
    unbatched = tf.data.Dataset.from_tensor_slices((m["xf"], m["yf"]))
    with pytest.raises(tfi.DatasetError, match=r"finetuning data.* is not batched: its features have shape \[5\] "
                                               r"but model 'finetune' takes a batch of rank 2; call dataset.batch"):
        tfi.MultiStageInfluence(tfi.Objective(m["pre"], h.sce()), h.dataset(m["xp"], m["yp"]),
                                tfi.Objective(m["ft"], h.sce()), unbatched, embedding=["embedding"])
    with pytest.raises(tfi.DatasetError, match="test data is not batched"):
        ms(m)(unbatched)
    with pytest.raises(tfi.DatasetError, match="must be a tf.data.Dataset"):
        ms(m)((m["xf"], m["yf"]))
    with pytest.raises(tfi.DatasetError, match="rank 3"):
        ms(m)(h.dataset(m["xf"][:, :, None], m["yf"]))


def test_bad_arguments(m):
    with pytest.raises(ValueError, match="case must be"):
        ms(m, case="frozen")
    with pytest.raises(ValueError, match="alpha > 0"):
        ms(m, case="updated", alpha=0.0)
    with pytest.raises(ValueError, match="test_target"):
        ms(m)(h.dataset(m["xf"], m["yf"]), test_target="max")
    with pytest.raises(ValueError, match="unknown HVP mode"):
        tfi.HessianOperator(tfi.Objective(m["pre"], h.sce()), h.dataset(m["xp"], m["yp"]),
                            tfi.ParameterGroup.from_model(m["pre"], "all"), mode="fd")


def test_nonconverging_solver_raises_with_residual(m):
    cfg = tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-14, on_nonconvergence="raise",
                           iterative=tfi.IterativeOptions(max_iter=2))
    with pytest.raises(tfi.SolverNotConvergedError, match="relative residual"):
        ms(m, pretrain_solver=cfg)(h.dataset(m["xf"], m["yf"]))
    with pytest.warns(tfi.SolverNotConvergedWarning):
        ms(m, pretrain_solver=tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-14,
                                               iterative=tfi.IterativeOptions(max_iter=2)))(
            h.dataset(m["xf"], m["yf"]))


def test_the_library_iterates_without_tf_data_autotuning():
    """The library's passes turn tf.data's model-based autotuning off (an iterator's destructor waits for its
    autotuning thread: a 100 M Llama's factor fit stood still 30–48 s at its covariance pass's end), keep the
    elements and their order, and override a user's own autotune setting without an error."""
    from tf_influence.objective import batches, without_autotune
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(10))).map(lambda a, b: (a * 2, b),
                                                                     num_parallel_calls=tf.data.AUTOTUNE).batch(4)
    opts = tf.data.Options()
    opts.autotune.enabled = True
    ds = ds.with_options(opts)
    assert ds.options().autotune.enabled is True and without_autotune(ds).options().autotune.enabled is False
    got = np.concatenate([b[0].numpy() for b in batches(ds, "d")])
    np.testing.assert_array_equal(got, 2 * x)
    assert without_autotune([1, 2]) == [1, 2]
