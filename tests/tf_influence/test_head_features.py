"""The head's Hessian on features of the frozen part computed once (tf_influence.head_features): equal to
central finite differences of the full model's gradient (float64), used by case 1's finetuning solve, and
not used where the model cannot be cut or the features would not fit."""

import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h
from tf_influence.head_features import head_operator, split_at_group


def _setup(dict_inputs=False):
    pre, ft, emb = h.two_stage_transformers(dict_inputs=dict_inputs) if dict_inputs else h.two_stage_mlps()
    W = tfi.group_from_layers(ft, ["embedding"])
    T = tfi.complement_group(ft, W)
    return ft, T


def _fd_hessian(objective, x, y, group, eps=1e-5):
    """``∂²L/∂group²`` column by column: central differences of the full model's gradient of ``L = mean l + R``."""
    def grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(objective.per_example_losses(x, y)) + objective.regularization()
        return group.flatten(tape.gradient(loss, group.tf_variables)).numpy()
    theta = group.values().numpy()
    cols = []
    for j in range(group.size):
        e = np.zeros_like(theta)
        e[j] = eps
        group.assign(theta + e)
        gp = grad()
        group.assign(theta - e)
        gm = grad()
        cols.append((gp - gm) / (2 * eps))
    group.assign(theta)
    return np.stack(cols, axis=1)


def test_head_products_equal_finite_differences_of_the_whole_model():
    ft, T = _setup()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.integers(0, 2, 12)
    obj = tfi.Objective(ft, h.sce())
    op = head_operator(obj, h.dataset(x, y, 5), T, name="head block")
    assert op.objective.model is not ft and op.objective.model.name == "finetune_head"   # the cut is used
    assert op.num_examples == 12
    H = op.to_dense()
    ref = _fd_hessian(obj, x, y, T)
    # to 1e-8: the L2 regularisers on the head's kernel and bias (2·0.01 on the diagonal) are in it
    np.testing.assert_allclose(H, ref, rtol=1e-6, atol=1e-8)


def test_multi_stage_case1_solves_over_the_head_and_keeps_its_scores():
    pre_model, ft_model, _ = h.two_stage_mlps()
    rng = np.random.default_rng(2)
    xp, yp = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    xf, yf = rng.normal(size=(10, 5)), rng.integers(0, 2, 10)
    args = tfi.InfluenceArgs(pretrain_solver=tfi.SolverConfig("cg_squared", damping=0.1, tol=1e-12,
                                                              iterative=tfi.IterativeOptions(max_iter=500)),
                             finetune_solver=tfi.SolverConfig("cg_squared", damping=0.1, tol=1e-12,
                                                              iterative=tfi.IterativeOptions(max_iter=500)),
                             hessian_samples=None)
    def make():
        return tfi.MultiStageInfluence(tfi.Objective(pre_model, h.sce()), h.dataset(xp, yp, 8),
                                       tfi.Objective(ft_model, h.sce()), h.dataset(xf, yf, 4),
                                       embedding=["embedding"], args=args)
    ms = make()
    assert ms.H_TT.objective.model.name == "finetune_head"
    # the held features (10 examples × 3 float64 features, the dataset and the held batches) are in the plan
    item = next(i for i in ms.memory_plan().items if i.name.startswith("finetuning features"))
    assert item.nbytes == 2 * (10 * 3 * 8 + 10 * 8)
    cut = ms(h.dataset(xf[:3], yf[:3], 3))
    # the same call with the products over the whole model
    ms_full = make()
    ms_full.H_TT = tfi.HessianOperator(tfi.Objective(ft_model, h.sce()), h.dataset(xf, yf, 4), ms_full.Theta,
                                       name="finetuning Hessian ∂²F/∂Θ²")
    full = ms_full(h.dataset(xf[:3], yf[:3], 3))
    np.testing.assert_allclose(cut.scores, full.scores, rtol=1e-8, atol=1e-12)


def test_dict_inputs_and_a_sequence_backbone_are_cut_at_the_pooled_features():
    ft, T = _setup(dict_inputs=True)
    x, y = h.token_data(8, n_classes=2, with_mask=True)
    obj = tfi.Objective(ft, h.sce())
    op = head_operator(obj, h.dataset(x, y, 4), T)
    assert op.objective.model.name.endswith("_head")
    v = np.random.default_rng(3).normal(size=T.size)
    plain = tfi.HessianOperator(obj, h.dataset(x, y, 4), T)
    np.testing.assert_allclose(op.matvec(v).numpy(), plain.matvec(v).numpy(), rtol=1e-9, atol=1e-12)


def test_no_cut_for_a_subclassed_model_a_group_at_the_inputs_or_features_too_large():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(3, dtype="float64")
            self.b = keras.layers.Dense(2, dtype="float64")

        def call(self, x):
            return self.b(self.a(x))
    sub = Sub()
    x, y = np.ones((4, 5)), np.zeros(4, "int32")
    sub(x)
    G = tfi.ParameterGroup("b", [sub.b.kernel, sub.b.bias])
    assert split_at_group(sub, G) is None
    assert head_operator(tfi.Objective(sub, h.sce()), h.dataset(x, y), G).objective.model is sub

    ft, T = _setup()
    everything = tfi.ParameterGroup.from_model(ft)
    assert split_at_group(ft, everything) is None                 # the group starts at the inputs
    op = head_operator(tfi.Objective(ft, h.sce()), h.dataset(x, y), T, max_bytes=16)
    assert op.objective.model is ft                                # the features would pass max_bytes
