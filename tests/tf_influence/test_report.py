"""The evidence report: per-token scores (against per_example_dot and central finite differences in
float64), what the page shows (the library's own top-k, examples, highlights, thresholds) and the page
opened in headless Chromium."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import hub_models
from tf_influence.lm import CausalLMLoss, completion_log_probability, token_scores
from tf_influence.report import ImageRenderer, Report, TableRenderer, TextRenderer, examples_at


@pytest.fixture(scope="module")
def gpt2():
    case = hub_models.build("gpt2", "float64", n_pre=6, n_ft=6, n_test=2, batch=3, layers=1)
    pre_obj, _ = hub_models.objectives(case)
    group = tfi.ParameterGroup.from_model(case.pretrain)
    rng = np.random.default_rng(0)
    v = rng.normal(size=group.size)
    return case, pre_obj, group, v


def test_token_scores_sum_to_the_score_and_match_finite_differences(gpt2):
    case, obj, group, v = gpt2
    per_token = token_scores(obj, case.pretrain_data, group, v)
    scores = tfi.per_example_dot(obj, case.pretrain_data, group, v)
    assert len(per_token) == len(scores) == 6
    np.testing.assert_allclose([t.sum() for t in per_token], scores, rtol=1e-5)
    # ignored positions (the last one, padding) carry exactly nothing
    labels = case.arrays["pre"][1]
    for t, lab in zip(per_token, labels):
        assert np.all(t[lab < 0] == 0.0)
    # independent reference: central finite differences of each token's term along v (float64)
    x, y = case.arrays["pre"]
    eps = 1e-5
    base = [w.numpy() for w in group.tf_variables]
    step = group.unflatten(tf.constant(v))

    def terms(sign):
        for w, b, s in zip(group.tf_variables, base, step):
            w.assign(b + sign * eps * s.numpy())
        out = CausalLMLoss().token_terms(y, case.pretrain(x, training=False)).numpy()
        for w, b in zip(group.tf_variables, base):
            w.assign(b)
        return out
    fd = (terms(1) - terms(-1)) / (2 * eps)
    np.testing.assert_allclose(np.stack(per_token), fd, rtol=1e-4, atol=1e-8)


def test_completion_measurement_has_per_token_terms(gpt2):
    case, obj, group, v = gpt2
    m = completion_log_probability()
    x, y = case.arrays["pre"]
    logits = case.pretrain(x, training=False)
    np.testing.assert_allclose(m.token_terms(y, logits).numpy().sum(axis=1), m(y, logits).numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="no per-token decomposition"):
        token_scores(tfi.Objective(case.pretrain, lambda yt, yp: tf.reduce_mean(yp, axis=[1, 2])),
                     case.pretrain_data, group, v)


def _digits_case():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (d.images / 16.0).astype("float32")
    y = d.target.astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X[:120], y[:120], epochs=3, verbose=0)
    train = tf.data.Dataset.from_tensor_slices((X[:120], y[:120])).batch(32)
    test = tf.data.Dataset.from_tensor_slices((X[500:503], y[500:503])).batch(2)
    return model, train, test


def test_report_shows_the_library_top_k_for_each_test_point(tmp_path):
    model, train, test = _digits_case()
    res = tfi.single_stage_influence(tfi.Objective(model), train, test, test_target="each")
    rep = Report("digits", renderer=ImageRenderer(class_names=[str(i) for i in range(10)]))
    shown = rep.add_influence(res, train, test=test, model=model, top_k=4)
    for j, col in enumerate(shown["columns"]):
        np.testing.assert_array_equal(col["harmful"], np.argsort(-res.scores[:, j], kind="stable")[:4])
        np.testing.assert_array_equal(col["helpful"], np.argsort(res.scores[:, j], kind="stable")[:4])
    page = rep.html()
    assert page.count('class="test-point"') == 3
    assert page.count('class="example harmful ') == page.count('class="example helpful ') == 12
    assert page.count('<img class="thumb"') == 24 + 3            # the examples and the test points
    # each shown score is the result's
    first = shown["columns"][0]["harmful"][0]
    assert f"score {res.scores[first, 0]:+.4g}" in page
    # the measurement: each test point's loss
    losses = tfi.Objective(model, include_model_losses=False).per_example_losses(
        *next(iter(test.unbatch().batch(3)))).numpy()
    for value in losses:
        assert f"test loss <b>{value:.4g}</b>" in page
    path = rep.write(str(tmp_path / "digits"))
    assert path.endswith("index.html") and os.path.exists(path)
    assert json.load(open(tmp_path / "digits" / "summary.json"))["test_points"] == 3


def test_report_highlights_tokens_and_lists_diagnostics(gpt2, tmp_path):
    case, obj, group, v = gpt2
    res = tfi.single_stage_influence(obj, case.pretrain_data, case.pretrain_data.take(1), test_target="each",
                                     measurement=completion_log_probability())
    rep = Report("lm", renderer=TextRenderer(vocabulary=[f"t{i} " for i in range(hub_models.VOCAB)]))
    shown = rep.add_influence(res, case.pretrain_data, top_k=2, token_objective=obj)
    page = rep.html()
    # the per-token shares shown sum to each example's score
    for j, col in enumerate(shown["columns"]):
        for i, total in col["token_sums"].items():
            np.testing.assert_allclose(total, res.scores[i, j], rtol=1e-5)
    weights = [float(w) for w in re.findall(r'data-weight="([^"]+)"', page)]
    assert weights and any(w != 0 for w in weights)
    assert 'class="diagnostics"' in page and res.solves["hessian"]["method"] in page


def test_self_influence_section_counts_what_the_threshold_drops():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(20, "int32"))).batch(6)
    s = np.linspace(0.1, 2.0, 20)
    rep = Report("t", renderer=TableRenderer(["bill", "flipper", "mass"], class_names=["Adelie"]))
    rep.add_self_influence(s, ds, threshold=1.5, top_k=3, keys=[f"k{i}".encode() for i in range(20)])
    page = rep.html()
    assert f"dropped {int((s > 1.5).sum())} of 20" in page
    assert page.count('class="features"') == 3 and "k19" in page and "<th>flipper</th>" in page


def test_examples_at_and_bad_indices():
    ds = tf.data.Dataset.from_tensor_slices((np.arange(10.0)[:, None], np.arange(10))).batch(4)
    got = examples_at(ds, [9, 0, 5])
    assert {k: float(v[0][0]) for k, v in got.items()} == {0: 0.0, 5: 5.0, 9: 9.0}
    with pytest.raises(IndexError, match="has 10 examples"):
        examples_at(ds, [10])


def test_text_renderer_sources():
    assert TextRenderer().text({"token_ids": np.array([41, 70, 0, 0])}) == "He"
    with pytest.raises(ValueError, match="one of tokenizer"):
        TextRenderer(vocabulary=["a"], decode=lambda ids: "a")

    class Tok:
        def id_to_token(self, i):
            return ["Ġthe", "Ċ", "cat"][i]
    assert TextRenderer(tokenizer=Tok(), padding_id=None).tokens([0, 2, 1]) == [" the", "cat", "\n"]
    from model_zoo import text
    assert [""] + text.VOCAB == TextRenderer().vocabulary     # the embedded corpus' vocabulary by default


def test_a_measurement_to_raise_reads_supporting_and_opposing(gpt2):
    """For log p(completion) the highest scores support the completion (removing them lowers it): the page
    says so, draws them as helpful, and the token colours follow (sign flipped for display only)."""
    case, obj, group, v = gpt2
    m = completion_log_probability()
    res = tfi.single_stage_influence(obj, case.pretrain_data, case.pretrain_data.take(1), test_target="each",
                                     measurement=m)
    rep = Report("lm", renderer=TextRenderer(vocabulary=[f"t{i} " for i in range(hub_models.VOCAB)]))
    shown = rep.add_influence(res, case.pretrain_data, top_k=2, measurement=m, token_objective=obj)
    page = rep.html()
    assert "top 2 supporting" in page and "top 2 opposing" in page and "harmful</h3>" not in page
    first = shown["columns"][0]["harmful"][0]                 # the highest score …
    assert first == int(np.argmax(res.scores[:, 0]))
    card = page[page.index(f"#{first} · score"):]
    assert card.startswith(f"#{first} · score {res.scores[first, 0]:+.4g}")
    before = page[:page.index(f"#{first} · score")]
    assert before.rfind('class="example helpful') > before.rfind('class="example harmful')   # … drawn as helpful
