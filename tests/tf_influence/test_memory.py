"""The memory plan's peak under the two allocator behaviours, and the premise itself: TensorFlow's default CPU
allocator (oneDNN) keeps freed tensor memory resident, numpy's does not."""

import os
import subprocess
import sys

import pytest

from tf_influence.memory import MemoryPlan, retaining_allocator

MB = 2 ** 20


def _plan(retaining):
    # phases in the order they run: a pass of TensorFlow temporaries, then numpy work, then a smaller TF pass
    return (MemoryPlan("p", retaining=retaining)
            .add("model copy", 100 * MB)                                         # held throughout
            .add("batch products", 400 * MB, phase="pass 1")
            .add("eigendecomposition", 300 * MB, phase="decompose", host=True)
            .add("correction products", 250 * MB, phase="pass 2")
            .add("bases as tensors", 50 * MB, phase="pass 2")
            .add("columns", 120 * MB, phase="pass 2", host=True))


def test_a_releasing_allocator_peaks_at_the_largest_phase():
    plan = _plan(False)
    assert plan.total == 100 * MB + 420 * MB                                     # pass 2: 250 + 50 + 120
    assert {i.name for i in plan.peak_items()} == {"model copy", "correction products", "bases as tensors", "columns"}


def test_a_retaining_allocator_adds_the_high_water_mark_to_later_host_memory():
    plan = _plan(True)
    # decompose: 300 host + the 400 TF high-water of pass 1; pass 2: 120 host + max(400, 300) = 520 → 700 wins
    assert plan.total == 100 * MB + 700 * MB
    assert {i.name for i in plan.peak_items()} == {"model copy", "eigendecomposition", "batch products"}
    assert plan.largest(1)[0].name == "batch products"
    assert not plan.fits(750 * MB) and _plan(False).fits(750 * MB)


def test_a_solve_that_ends_first_leaves_only_its_tensorflow_memory_behind():
    """Case 2's finetuning solve: its factors (host memory, held while it runs) are freed before the pretraining
    fit; its passes' TensorFlow memory stays in the allocator's high-water mark."""
    first = (MemoryPlan("finetuning")
             .add("factors", 500 * MB, host=True)                                 # held while the solve runs
             .add("products", 300 * MB, phase="covariance pass")
             .add("decomposition", 200 * MB, phase="eigendecomposition", host=True))
    plan = MemoryPlan("call", retaining=True).add("right-hand side", 10 * MB)
    plan.add_phases(first, "finetuning solve")
    plan.add("pretraining products", 100 * MB, phase="pretraining pass").add(
        "pretraining factors", 400 * MB, phase="pretraining pass", host=True)
    assert list(plan.phases()) == ["finetuning solve covariance pass", "finetuning solve eigendecomposition",
                                   "pretraining pass"]
    # finetuning decomposition: 500 + 200 host + 300 TF high-water = 1000; pretraining: 400 host + 300 = 700
    assert plan.total == 10 * MB + 1000 * MB
    plan.items[-1].nbytes = 800 * MB                  # now the pretraining pass wins: 800 + max(300, 100)
    assert plan.total == 10 * MB + 1100 * MB
    assert {i.name for i in plan.peak_items()} == {"right-hand side", "pretraining factors",
                                                   "finetuning solve: products"}
    # a plan without phases becomes one phase holding its items
    one = MemoryPlan("call", retaining=True).add_phases(MemoryPlan("cg").add("vectors", 64 * MB), "finetuning solve")
    assert one.phases() == {"finetuning solve": 64 * MB} and one.total == 64 * MB
    # a later solve's factors exist from its own phases on, and through the phases given (its scoring) only
    later = MemoryPlan("pretraining").add("factors", 700 * MB, host=True).add("products", 50 * MB, phase="pass")
    plan.add_phases(later, "pretraining solve", held_into=("scoring",))
    assert plan.phases()["pretraining solve pass"] == 750 * MB and plan.phases()["scoring"] == 700 * MB
    assert plan.phases()["finetuning solve covariance pass"] == 800 * MB          # not in the earlier solve
    assert plan.total == 10 * MB + 1100 * MB       # the pretraining pass (800 + 300 high-water) still wins


def test_a_factor_fits_batch_products_do_not_grow_with_an_embeddings_vocabulary():
    """An ``Embedding``'s captured input is its token ids and its correction sums the rows of the tokens present:
    the per-batch products of a fit are the same at 50 and at 50,000 tokens (they were counted as one-hot rows)."""
    import keras
    import tf_influence as tfi
    from tf_influence import kfac
    from tf_influence.memory import _factor_batch_bytes

    def stats(vocab):
        inp = keras.Input((6,), dtype="int32")
        z = keras.layers.Embedding(vocab, 8, name="emb")(inp)
        model = keras.Model(inp, keras.layers.Dense(3, name="out")(z))
        obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return kfac.FactorStatistics(obj, tfi.ParameterGroup.from_model(model))
    small, large = _factor_batch_bytes(stats(50), 16, 6), _factor_batch_bytes(stats(50_000), 16, 6)
    assert small == large
    # what it does count: the token ids, the lookups' output gradients and the head's activations and gradients
    assert small[0] == 16 * 6 * ((1 + 8) + (9 + 3)) * 4 * 2


def _tiny_lm(vocab=40, n=12, batch=4):
    import keras
    import numpy as np
    import tensorflow as tf
    import tf_influence as tfi
    inp = keras.Input((6,), dtype="int32")
    z = keras.layers.Embedding(vocab, 8, name="emb")(inp)
    z = keras.layers.LayerNormalization(name="ln")(z)
    model = keras.Model(inp, keras.layers.Dense(vocab, name="head")(keras.layers.Dense(16, name="mid")(z)))
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (n, 6)).astype("int32")
    return obj, tfi.ParameterGroup.from_model(model), tf.data.Dataset.from_tensor_slices((ids, ids)).batch(batch)


def test_an_index_plan_buffers_the_examples_there_are_and_counts_the_captured_layers():
    """A dataset of 12 examples fills 12 rows of the shard buffer, not ``shard_size`` (50,000 rows had hidden the
    missing captured activations at the 100 M Llama); a dataset of unknown size is planned at ``shard_size``. The
    per-batch products hold every block's captured input and output gradient (``[B, P, rows + d_out]``, twice),
    the normalisation's, and the logits: they grow with the head's width."""
    from tf_influence.memory import dataset_examples, index_plan
    from tf_influence.projection import GradientProjector, ProjectionArgs
    obj, group, ds = _tiny_lm()
    proj = GradientProjector(obj, group, ProjectionArgs(k=4))
    assert dataset_examples(ds) == 12 and dataset_examples(ds.filter(lambda x, y: True)) is None
    item = {i.name: i for i in index_plan(proj, ds, shard_size=1000).items}
    assert item["index shard buffer"].nbytes == 12 * proj.dim * (1 + 4)             # int8 and its float32 copy
    unknown = {i.name: i for i in index_plan(proj, ds.filter(lambda x, y: True), shard_size=1000).items}
    assert unknown["index shard buffer"].nbytes == 1000 * proj.dim * 5
    B, P = 4, 6
    captured = B * P * ((1 + 8) + (9 + 16) + (17 + 40)) * 4 * 2    # emb (ids), mid, head (rows: inputs and bias)
    projected = sum(B * P * (s.get("k_in", 0) + s.get("k_out", 0)) * 4 * 2 for s in proj.layout)
    norm = B * P * 8 * 4 * 4
    logits = B * P * 40 * 4
    assert item["per-batch products"].nbytes == captured + projected + norm + logits


def test_ghost_norm_passes_are_planned_and_refused_before_the_first_batch():
    """Ghost-norm self-influence and the index's calibration pass plan one batch — every block's captured input
    and output gradient (twice), the normalisation's, the logits, and the largest block's two ``[B, P, P]`` Gram
    matrices — and a budget below it is refused naming the plan, its
    largest item and the options, before any batch runs (the pass is never traced).
    (Every block here has ``P² = 36 ≤ rows · d_out``: Grams, the first block's named.)"""
    import pytest
    import tf_influence as tfi
    from tf_influence.ghost_norms import GhostNorms
    from tf_influence.memory import MemoryBudgetError, ghost_plan
    from tf_influence.projection import calibrate
    obj, group, ds = _tiny_lm()
    norms = GhostNorms(obj, group)
    item = {i.name: i.nbytes for i in ghost_plan(norms, ds).items}
    B, P = 4, 6
    captured = B * P * ((1 + 8) + (9 + 16) + (17 + 40)) * 4 * 2
    assert item["per-batch products"] == captured + B * P * 8 * 4 * 4 + B * P * 40 * 4
    assert item["ghost-norm temporaries of 'emb'"] == 2 * B * P * P * 4
    traced = []
    real = GhostNorms.get

    def spy(objective, grp):
        g = real(objective, grp)
        traced.append(g)
        return g
    import unittest.mock
    with unittest.mock.patch.object(GhostNorms, "get", staticmethod(spy)):
        with pytest.raises(MemoryBudgetError, match=r"ghost-norm self-influence need .*per-batch products .*"
                                                    r"Options: a smaller batch"):
            tfi.tracin.self_influence(obj, ds, memory_budget=10_000)
    assert traced and traced[0].fn.experimental_get_tracing_count() == 0       # refused before the first batch
    assert tfi.tracin.self_influence(obj, ds, memory_budget="1GB").shape == (12,)
    assert traced[0].fn.experimental_get_tracing_count() > 0                  # the same (cached) pass, now run
    with pytest.raises(MemoryBudgetError, match=r"the projection budget's calibration pass need .*"
                                                r"ProjectionArgs\(k=\.\.\.\)"):
        calibrate(obj, ds, group, memory_budget=10_000)


def test_forward_mode_scoring_is_planned_and_refused_before_the_first_batch():
    """``per_example_dot(method="jvp")`` (the Beam scoring job's influence scores) plans the columns' copies (with
    several), the tangent split per variable and one batch's forward pass with tangents — every block's input and output (twice), the
    normalisation's, the logits three times — and refuses a budget below it before any batch, naming it."""
    import numpy as np
    import pytest
    from tf_influence import gradients
    from tf_influence.memory import MemoryBudgetError, jvp_plan
    obj, group, ds = _tiny_lm()
    item = {i.name: i.nbytes for i in jvp_plan(obj, group, ds).items}
    B, P = 4, 6
    assert item == {"tangent per variable": group.size * 4,
                    "forward pass with tangents": B * P * ((1 + 8) + (9 + 16) + (17 + 40)) * 4 * 2
                    + 3 * B * P * 40 * 4 + B * P * 8 * 4 * 4}
    several = {i.name: i.nbytes for i in jvp_plan(obj, group, batch_shape=(B, P), columns=3).items}
    assert several == {**item, "columns": 3 * group.size * 4}      # unstacked once, each column its own copy
    v = np.ones(group.size, "float32")
    with pytest.raises(MemoryBudgetError, match=r"scoring by forward-mode products need .*forward pass with tangents"):
        gradients.per_example_dot(obj, ds, group, v, method="jvp", memory_budget=10_000)
    assert gradients.GradientKernels.get(obj, group).jvp.experimental_get_tracing_count() == 0     # nothing ran
    assert gradients.per_example_dot(obj, ds, group, v, method="jvp", memory_budget="1GB").shape == (12,)
    assert gradients.GradientKernels.get(obj, group).jvp.experimental_get_tracing_count() > 0


def test_a_per_example_chunk_is_planned_at_most_one_batch():
    """Blocks are never wider than a batch: with batches of 4 and ``chunk_size=512`` the checked plan holds 4
    examples' blocks (it had held the 512 the budget allowed — gpt2-mid's per-example self-influence planned at
    1.64× its peak)."""
    import numpy as np
    import tf_influence as tfi
    from tf_influence import memory
    obj, group, ds = _tiny_lm()
    seen, check = [], memory.MemoryPlan.check

    def recording(self, *a, **k):
        seen.append(self)
        return check(self, *a, **k)
    memory.MemoryPlan.check = recording
    try:
        blocks = list(tfi.per_example_gradients(obj, ds, group, chunk_size=512, memory_budget=10 ** 12))
    finally:
        memory.MemoryPlan.check = check
    assert [b.shape[0] for b in blocks] == [4, 4, 4]
    assert seen[-1].total == 4 * group.size * 4 * memory.PER_EXAMPLE_COPIES
    assert np.isfinite(np.concatenate([b.numpy() for b in blocks])).all()


_PROBE = """
import gc, tensorflow as tf
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
base = rss()
t = [tf.random.normal([64, 1024, 1024]) for _ in range(2)]        # 512 MB of tensors
held = rss()
del t
gc.collect()
print(round(held - base), round(rss() - base))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_premise_tensorflow_keeps_freed_memory_under_onednn_only():
    def run(onednn: str):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
        held, after = map(float, out.stdout.split()[-2:])
        return held, after
    held, after = run("1")
    assert held > 400 and after > 0.8 * held, (held, after)                 # kept resident after the free
    held, after = run("0")
    assert held > 400 and after < 0.3 * held, (held, after)                 # given back
    assert retaining_allocator() == (os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") not in ("0", "false", "False")
                                     and os.uname().machine in ("x86_64", "amd64"))


def test_release_memory_collects_only_after_a_large_free(monkeypatch):
    """A full collection costs 0.1–0.3 s in a process holding traced graphs: a small model's fit (three releases)
    skips it; a fit that freed its gigabytes, or a caller that does not say how much, still collects and trims."""
    import gc

    import numpy as np

    from tf_influence import memory
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    memory.release_memory(memory.nbytes({"blocks": {"a": (np.zeros((64, 64)), np.zeros(8))}, "n": 3.0}))
    assert calls == []
    memory.release_memory(memory.RELEASE_MIN_BYTES)
    memory.release_memory()
    assert calls == ["collect", "collect"]
    assert memory.nbytes({"blocks": {"a": (np.zeros((64, 64)), np.zeros(8, np.float32))}, "n": 3.0}) == 64 * 64 * 8 + 32
