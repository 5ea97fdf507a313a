"""TFX's penguin tutorial pipeline with SelfInfluenceScorer → ScoreFilter → Trainer and the two-stage
InfluenceScorer variant, under LocalDagRunner on the penguin data shipped inside ``tfx``: the
components take the stock artifacts (no key column, no feature spec, no layer set, the tutorial's
4-input model, a frozen embedding), kept + dropped = input per split, the dropped examples are
exactly the top-scored ones, and the scores equal the library's on the same examples."""

import collections
import json
import os

import numpy as np
import pytest

pytest.importorskip("tfx")

from pipelines import penguin_pipeline  # noqa: E402
from tests.tfx_helpers import BEAM_IN_PROCESS  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("penguin")
    report = root / "summary.json"
    penguin_pipeline.main(["--root", str(root), "--report", str(report), "--two-stage", "--train-steps", "60",
                           *[f"--beam-arg={a}" for a in BEAM_IN_PROCESS]])
    return root, json.load(open(report))


def _artifacts(root, type_name):
    from tfx.orchestration import metadata
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(str(root / "metadata.sqlite"))) as m:
        return list(m.store.get_artifacts_by_type(type_name))


def _records_by_key(split_dir):
    """``{file-and-position key: serialized example}`` of a split folder, as the components identify them."""
    from tfx_components import common, example_io
    out = {}
    for f in common.glob_files([split_dir]):
        for i, r in enumerate(common.read_records([f], f)):
            out[example_io.record_key(f, i)] = r
    return out


def test_every_component_accepts_the_stock_artifacts(run):
    _, s = run
    assert s["components"]["Transform"] == ["COMPLETE"]
    assert s["components"]["Trainer"] == ["COMPLETE"] * 3
    for name in ("SelfInfluenceScorer", "ScoreFilter", "InfluenceScorer"):
        assert s["components"][name] == ["COMPLETE"], name


def test_kept_plus_dropped_is_the_input_and_the_dropped_are_the_top_scored(run):
    from tf_influence import scores_io
    from tf_influence.selection import select_kept
    root, s = run
    (flt,) = s["filters"]
    (si_uri,) = [a["uri"] for a in s["scores"] if a["score_kind"] == "self_influence"]
    (transformed,) = [a.uri for a in _artifacts(root, "Examples") if "/Transform/" in a.uri]
    total = 0
    for split in ("train", "eval"):
        c = flt["counts"][split]
        records = _records_by_key(os.path.join(transformed, f"Split-{split}"))
        assert c["in"] == len(records) == c["kept"] + c["dropped"]
        assert c["dropped"] == round(0.1 * c["in"])
        scores = scores_io.read_scores(os.path.join(si_uri, f"Split-{split}"))
        assert set(scores) == set(records)                     # every example scored once, by file and position
        keys = sorted(scores)
        mask = select_kept([scores[k] for k in keys], "drop_top_fraction", 0.1, keys=keys)
        want = collections.Counter(records[k] for k, m in zip(keys, mask) if m)
        got = collections.Counter(_records_by_key(os.path.join(flt["uri"], f"Split-{split}")).values())
        assert got == want                                     # exactly the kept examples, byte for byte
        dropped = [scores[k] for k, m in zip(keys, mask) if not m]
        assert min(dropped) >= max(scores[k] for k, m in zip(keys, mask) if m)
        total += c["in"]
    assert total == 334                                        # the tutorial's penguins, none lost


def test_scores_equal_the_library_on_the_transformed_features(run):
    """The SelfInfluenceScorer's scores are TracIn SI over every layer of the tutorial model, on the
    transformed features the Transform graph gives — the library called directly on them."""
    import tensorflow as tf

    import tf_influence as tfi
    from tf_influence import scores_io, tracin
    from tfx_components import example_io
    root, s = run
    (si_uri,) = [a["uri"] for a in s["scores"] if a["score_kind"] == "self_influence"]
    (transformed,) = [a.uri for a in _artifacts(root, "Examples") if "/Transform/" in a.uri]
    (model_uri,) = [a.uri for a in _artifacts(root, "Model") if "/trainer/" in a.uri]
    model = example_io.load_keras_model(os.path.join(model_uri, "Format-Serving"))
    records = _records_by_key(os.path.join(transformed, "Split-train"))
    keys = list(records)
    # independent decoding: the Transform output's own feature spec and the tutorial's names
    feats = tf.io.parse_example([records[k] for k in keys], {
        **{f"{n}_xf": tf.io.FixedLenFeature([1], tf.float32) for n in penguin_pipeline_module().FEATURE_KEYS},
        "species_xf": tf.io.FixedLenFeature([1], tf.int64)})
    y = feats.pop("species_xf")
    ref = tracin.self_influence(tfi.Objective(model, model.loss),
                                tf.data.Dataset.from_tensor_slices((dict(feats), y)).batch(64))
    got = scores_io.read_scores(os.path.join(si_uri, "Split-train"))
    np.testing.assert_allclose([got[k] for k in keys], ref, rtol=1e-5)
    spec = json.loads([a for a in _artifacts(root, "tf_influence.InfluenceScores") if a.uri == si_uri][0]
                      .custom_properties["feature_spec"].string_value)
    assert sorted(spec["inputs"]) == sorted(f"{n}_xf" for n in penguin_pipeline_module().FEATURE_KEYS)
    assert spec["y"]["name"] == "species_xf" and spec["key"] is None


def test_raw_examples_through_the_transform_graph_score_the_same(run, tmp_path):
    """Given ExampleGen's raw examples and the Transform graph, the scorer sends them through the
    graph: the same multiset of scores as on Transform's own output."""
    from tfx.types import artifact_utils, standard_artifacts

    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor

    from tf_influence import scores_io
    from tfx_components.artifacts import InfluenceScores
    from tfx_components.self_influence_scorer.executor import Executor
    root, s = run
    (si_uri,) = [a["uri"] for a in s["scores"] if a["score_kind"] == "self_influence"]
    (raw,) = [a for a in _artifacts(root, "Examples") if "/ImportExampleGen/" in a.uri]
    (graph,) = _artifacts(root, "TransformGraph")
    (model,) = [a for a in _artifacts(root, "Model") if "/trainer/" in a.uri]

    def art(cls, a, splits=None):
        out = cls()
        out.uri = a.uri
        if splits:
            out.split_names = artifact_utils.encode_split_names(splits)
        return out
    out = InfluenceScores()
    out.uri = str(tmp_path / "scores")
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=BEAM_IN_PROCESS, tmp_dir=str(tmp_path / "tmp"), unique_id="1")
    Executor(ctx).Do({"examples": [art(standard_artifacts.Examples, raw, ["train"])],
                      "model": [art(standard_artifacts.Model, model)],
                      "transform_graph": [art(standard_artifacts.TransformGraph, graph)]},
                     {"scores": [out]}, {"splits": json.dumps(["train"])})
    spec = json.loads(out.get_string_custom_property("feature_spec"))
    assert spec["transform_graph"] == graph.uri                 # raw examples: through the graph
    got = sorted(scores_io.read_scores(os.path.join(out.uri, "Split-train")).values())
    want = sorted(scores_io.read_scores(os.path.join(si_uri, "Split-train")).values())
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_two_stage_variant_scores_with_the_frozen_shared_layers_as_embedding(run):
    root, s = run
    (inf,) = [a for a in _artifacts(root, "tf_influence.InfluenceScores")
              if a.custom_properties["score_kind"].string_value == "multi_stage_fixed"]
    embedding = json.loads(inf.custom_properties["embedding"].string_value)
    assert embedding and "finetune_head" not in embedding        # W: the hidden layers both models share
    from tfx_components import example_io
    (ft_uri,) = [a.uri for a in _artifacts(root, "Model") if "/finetune_trainer/" in a.uri]
    ft = example_io.load_keras_model(os.path.join(ft_uri, "Format-Serving"))
    assert all(not ft.get_layer(n).trainable for n in embedding)  # saved frozen, as the module trained it
    from tf_influence import scores_io
    scores = scores_io.read_scores(os.path.join(inf.uri, "Split-train"))
    assert len(scores) == 234 and np.all(np.isfinite(list(scores.values())))
    assert np.std(list(scores.values())) > 0


def penguin_pipeline_module():
    from pipelines import penguin_module
    return penguin_module


def test_report_artifact_shows_what_the_filter_dropped(run):
    """The InfluenceReport artifact: one page, opened in headless Chromium — the filter's count, the top-scored
    examples in score order, drawn as feature tables."""
    from selenium.webdriver.common.by import By

    from tests.browser import browser, screenshot
    from tf_influence import scores_io
    root, s = run
    assert s["components"]["InfluenceReport"] == ["COMPLETE"]
    (page,) = s["reports"]
    (flt,) = s["filters"]
    (si_uri,) = [a["uri"] for a in s["scores"] if a["score_kind"] == "self_influence"]
    scores = scores_io.read_scores(os.path.join(si_uri, "Split-train"))
    top = sorted(scores, key=lambda k: -scores[k])[:8]
    d = browser()
    try:
        d.get("file://" + page)
        c = flt["counts"]["train"]
        assert f"dropped {c['dropped']} of {c['in']}" in d.find_element(By.CSS_SELECTOR, "section.self-influence").text
        shown = [e.text.split(" · ")[0] for e in d.find_elements(By.CSS_SELECTOR, ".example .score")]
        assert shown == [k.decode() for k in top]
        assert len(d.find_elements(By.CSS_SELECTOR, ".example table.features")) == 8
        assert d.find_element(By.CSS_SELECTOR, "img.plot").get_property("naturalWidth") > 0
        screenshot(d, "report_penguin.png")
    finally:
        d.quit()
