"""Vocabulary-sized Kronecker factor sides and the memory plan, on the keras-hub test models (whose
vocabulary is larger than eight times their width, the shape of real language models).

* a side kept diagonal (``dense_factor_max`` below the vocabulary) holds exactly the diagonal of the
  dense covariance, and its EK-FAC eigenvalues are the exact Fisher diagonal in the basis ``I ⊗ Q_S``
  (``Q_A ⊗ I``) — checked against per-example gradients computed one example at a time;
* where the vocabulary fits (the default ``dense_factor_max``), the factors are the dense ones, bit for bit;
* the damped inverse with diagonal sides equals the explicit inverse of the block it represents;
* a request that cannot fit is refused before any work, naming the block and its size; ``auto`` passes
  over EK-FAC for ``cg_squared`` when the factors do not fit and says why.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import hub_models as hm
from tf_influence import kfac, memory

pytest.importorskip("keras_hub")

#: the vocabulary-sized blocks of each kind and the side that is vocabulary-sized
VOCAB_BLOCKS = {"gpt2": {"token_embedding": "in"}, "llama": {"token_embedding/reverse": "out"},
                "bert": {"lm_head": "out"}}


def test_test_models_have_a_real_vocabulary_shape():
    assert hm.VOCAB > 8 * hm.WIDTH
    assert hm.TINY["vocab"] > 8 * hm.TINY["width"]


@pytest.fixture(scope="module", params=[pytest.param(k, marks=pytest.mark.slow) if k == "llama" else k
                                        for k in sorted(VOCAB_BLOCKS)])   # untied heads: BERT's runs in make test
def case(request):
    return hm.build(request.param, n_pre=12)


def _per_example_G(g, b, x, y):
    from tests.tf_influence.test_kfac import per_example_block_matrices
    return per_example_block_matrices(g, b, x, y)


def test_diagonal_vocabulary_side_is_the_dense_diagonal_and_exact_in_its_basis(case):
    g, _ = hm.objectives(case)
    group = tfi.ParameterGroup.from_model(case.pretrain)
    limit = hm.VOCAB - 1                                    # the vocabulary side only goes diagonal
    small = kfac.FactorStatistics(g, group, fisher="empirical", dense_factor_max=limit)
    dense = kfac.FactorStatistics(g, group, fisher="empirical", dense_factor_max=None)
    sides = small.sides()
    for name, side in VOCAB_BLOCKS[case.name].items():
        assert sides[name][side] == "diagonal", sides[name]
        assert sides[name]["out" if side == "in" else "in"] == ("diagonal" if name == "token_embedding" and
                                                                 case.name == "llama" else "dense")
    kinds = {b.name: b.kind for b in dense.blocks}
    assert all(s["out"] == "dense" and (s["in"] == "dense") == (kinds[k] != "embedding")
               for k, s in dense.sides().items()), dense.sides()

    # pass 1: the diagonal side is exactly the diagonal of the dense covariance, the other side unchanged
    x, y = next(iter(case.pretrain_data))
    s_small, s_dense = small.covariances(x, y, 0), dense.covariances(x, y, 0)
    for name, side in VOCAB_BLOCKS[case.name].items():
        i = 0 if side == "in" else 1
        A_s, A_d = s_small["blocks"][name][i], s_dense["blocks"][name][i]
        assert A_s.ndim == 1 and A_d.ndim == 2
        np.testing.assert_allclose(A_s, np.diag(A_d), rtol=1e-5, atol=1e-7 * np.abs(A_d).max())
        np.testing.assert_allclose(s_small["blocks"][name][1 - i], s_dense["blocks"][name][1 - i], rtol=1e-6)

    # pass 2: EK-FAC's eigenvalues in the basis with the identity on the vocabulary side are the exact
    # mean squared per-example gradient in that basis (one example at a time, no shared code)
    factors = kfac.fit_factors(g, case.pretrain_data, group, fisher="empirical", dense_factor_max=limit)
    xp, yp = case.arrays["pre"]
    blocks = {b.name: b for b in small.blocks}
    for name in VOCAB_BLOCKS[case.name]:
        f = factors.blocks[name]
        QA = f["QA"] if f["QA"].size else np.eye(blocks[name].rows)
        QS = f["QS"] if f["QS"].size else np.eye(blocks[name].d_out)
        Gs = _per_example_G(g, blocks[name], xp, yp)
        ref = np.mean([(QA.T @ G @ QS) ** 2 for G in Gs], axis=0)
        np.testing.assert_allclose(f["eig"], ref, rtol=2e-3, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_default_keeps_small_vocabularies_dense_bit_for_bit(case):
    # one kind is enough: the same branch (side ≤ dense_factor_max) for every layer kind; GPT-2's tied table
    # has both a lookup and an output projection (the other kinds' vocabulary sides: the test above)
    if case.name != "gpt2":
        pytest.skip("checked on the tied GPT-2 table, which has both kinds of call")
    g, _ = hm.objectives(case)
    group = tfi.ParameterGroup.from_model(case.pretrain)
    default = kfac.fit_factors(g, case.pretrain_data, group, fisher="empirical")
    all_dense = kfac.fit_factors(g, case.pretrain_data, group, fisher="empirical", dense_factor_max=None)
    for name, f in default.blocks.items():
        for key in ("QA", "QS", "eig"):
            np.testing.assert_array_equal(f[key], all_dense.blocks[name][key], err_msg=f"{name}/{key}")


def test_inverse_with_diagonal_sides_is_the_explicit_inverse():
    """(E)K-FAC's damped inverse of a block with an identity side equals ``(C + λ)⁻¹`` for the explicit
    ``C = (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ`` it represents (numpy, built from the stored factors)."""
    c = hm.build("gpt2", dtype="float64", **hm.TINY)
    g, _ = hm.objectives(c)
    group = tfi.ParameterGroup.from_model(c.pretrain)
    factors = kfac.fit_factors(g, c.pretrain_data, group, fisher="empirical", dense_factor_max=hm.TINY["vocab"] - 1)
    blocks, _ = kfac.kronecker_blocks(c.pretrain, group)
    b = next(x for x in blocks if x.name == "token_embedding")
    f = factors.blocks["token_embedding"]
    assert f["QA"].size == 0 and f["QS"].size > 0
    lam = 0.1
    inv = kfac.KFACInverse(factors, c.pretrain, group, damping=lam)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(group.size)
    got = inv(tf.constant(v)).numpy()
    # the block's slice of the result, against the explicit matrix on vec(M) of the [rows, d_out] layout
    idx = {id(tfi.params.tf_variable(w)): i for i, w in enumerate(group.variables)}
    i = idx[id(tfi.params.tf_variable(b.kernel))]
    start = int(sum(group.sizes[:i]))
    V = v[start:start + group.sizes[i]].reshape(b.rows, b.d_out)
    Q = np.kron(np.eye(b.rows), f["QS"])                    # vec row-major: (I ⊗ Q_S)
    C = Q @ np.diag(f["eig"].ravel()) @ Q.T
    ref = np.linalg.solve(C + lam * np.eye(C.shape[0]), V.ravel())
    np.testing.assert_allclose(got[start:start + group.sizes[i]], ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(VOCAB_BLOCKS))
def test_memory_plan_refuses_before_work_naming_the_block_and_size(kind):
    n = 600                                  # the vocabulary block is then the largest item, as at real sizes
    case = hm.build(kind, n_pre=8, vocab=n)
    g, _ = hm.objectives(case)
    group = tfi.ParameterGroup.from_model(case.pretrain)
    name, side = next(iter(VOCAB_BLOCKS[case.name].items()))
    stats = kfac.FactorStatistics(g, group, dense_factor_max=None)
    plan = memory.factor_plan(stats, case.pretrain_data)
    side_name = f"{'A' if side == 'in' else 'S'} of '{name}'"
    item = next(i for i in plan.items if i.name == f"dense {side_name}")
    # a float32 model's covariances are summed and decomposed in float32 (FactorStatistics.add)
    c, dname = (4, "float32") if stats.compute == tf.float32 else (8, "float64")
    assert item.nbytes == n * n * c * 2 and item.what.startswith(f"[{n}, {n}] {dname}")
    peak = plan.largest(1)[0]                    # a vocabulary-sized dense side's eigendecomposition
    # (BERT's lookup-only token table is as large as its head: either is named)
    assert peak.name.startswith("eigendecomposition of ") and peak.nbytes == n * n * c * 3, peak
    assert peak.name == f"eigendecomposition of {side_name}" or case.name == "bert"
    budget = plan.total - 1
    with pytest.raises(memory.MemoryBudgetError) as err:
        kfac.fit_factors(g, case.pretrain_data, group, dense_factor_max=None, memory_budget=budget)
    msg = str(err.value)
    assert peak.name in msg and memory.human(peak.nbytes) in msg and "dense_factor_max" in msg
    assert memory.human(budget) in msg
    # nothing was fitted: the refusal comes from the plan, not from an allocation failure
    assert err.value.plan.total == plan.total


def test_auto_passes_over_ekfac_when_the_factors_do_not_fit():
    c = hm.build("gpt2", n_pre=8)
    g, _ = hm.objectives(c)
    group = tfi.ParameterGroup.from_model(c.pretrain)
    H = tfi.HessianOperator(g, c.pretrain_data, group)
    method, why = tfi.solvers.auto_choice(H)
    assert method == "ekfac", why
    stats = kfac.FactorStatistics(g, group)
    need = memory.factor_plan(stats, c.pretrain_data).total
    method, why = tfi.solvers.auto_choice(H, memory_budget=need - 1)
    assert method == "cg_squared" and "EK-FAC factors need" in why and memory.human(need) in why
    with pytest.raises(memory.MemoryBudgetError, match="working vectors"):
        tfi.solvers.auto_choice(H, memory_budget=1000)
    # the same budget through the typed configuration, refused before the multi-stage work starts
    _, f = hm.objectives(c)
    ms = tfi.MultiStageInfluence(g, c.pretrain_data, f, c.finetune_data, embedding=c.backbone,
                                 args=tfi.InfluenceArgs(memory_budget=1000))
    with pytest.raises(memory.MemoryBudgetError):
        ms(c.test_data)


def test_budget_values():
    assert memory.parse_bytes("8GB") == 8 * 10 ** 9 and memory.parse_bytes("1.5GiB") == int(1.5 * 2 ** 30)
    assert memory.resolve_budget(123) == 123
    assert 0 < memory.resolve_budget(0.5) <= memory.available_bytes()
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_bytes("eight gigabytes")
    with pytest.raises(ValueError, match="memory_budget"):
        tfi.SolverConfig("auto", memory_budget=-1)
    with pytest.raises(ValueError, match="does not apply"):
        tfi.SolverConfig("identity", memory_budget="1GB")


def test_per_example_gradients_are_chunked_to_fit_and_equal_unchunked():
    """The chunk shrinks to fit half the budget; the blocks are the same gradients, in order; a budget
    that cannot hold one example's blocks is refused before any gradient, naming the size."""
    from tf_influence.gradients import fit_chunk, stack_per_example_gradients
    c = hm.build("gpt2", n_pre=8)
    g, _ = hm.objectives(c)
    group = tfi.ParameterGroup.from_model(c.pretrain)
    per = group.size * 4 * memory.PER_EXAMPLE_COPIES
    assert fit_chunk(512, group.size, 4, 2 * per * 3) == 3
    # whatever the budget, a chunk's blocks stay under PER_EXAMPLE_BLOCK_BYTES (at least one example)
    from tf_influence import gradients
    p = 10**9 // (4 * memory.PER_EXAMPLE_COPIES)                     # one example's blocks: 1e9 bytes
    assert fit_chunk(512, p, 4, 10**12) == gradients.PER_EXAMPLE_BLOCK_BYTES // 10**9
    assert fit_chunk(512, 10 * p, 4, 10**12) == 1
    full = stack_per_example_gradients(g, c.pretrain_data, group).numpy()
    small = np.concatenate([b.numpy() for b in tfi.per_example_gradients(
        g, c.pretrain_data, group, memory_budget=2 * per * 3)])
    assert small.shape == full.shape == (8, group.size)
    np.testing.assert_allclose(small, full, rtol=1e-6, atol=1e-9)
    with pytest.raises(memory.MemoryBudgetError, match=memory.human(per)):
        next(tfi.per_example_gradients(g, c.pretrain_data, group, memory_budget=per))
