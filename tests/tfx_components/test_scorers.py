"""InfluenceScorer and SelfInfluenceScorer executors on real artifacts (scores equal the in-process
library), bad input, and the index mode (scorer → ScoreFilter under LocalDagRunner: tests/pipelines/test_penguin_pipeline.py and
test_presence_pipeline.py, which checks PRESENCE-Sequential's keep-lowest selection)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tfx")

from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor  # noqa: E402
from tfx.types import artifact_utils, standard_artifacts  # noqa: E402

import tf_influence as tfi  # noqa: E402
from model_zoo import cnn as models
from tf_influence import scores_io, tracin  # noqa: E402
from tfx_components.influence_scorer.component import InfluenceScorer  # noqa: E402
from tfx_components.influence_scorer.executor import Executor as InfluenceExecutor  # noqa: E402
from tfx_components.self_influence_scorer.executor import Executor as SIExecutor  # noqa: E402
from tests import tfx_helpers as th  # noqa: E402

SPEC = {"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}, "key": "key"}
from tests.tfx_helpers import BEAM_IN_PROCESS  # noqa: E402

def cg(lam):
    """The scorer's solver in these tests, and the library reference's: float64 CG on H² + λI."""
    return tfi.SolverConfig("cg_squared", damping=lam, iterative=tfi.IterativeOptions(max_iter=100, dtype="float64"))


def influence_props(hessian_samples=None):
    """InfluenceScorer's execution properties: the InfluenceArgs travel whole, as JSON."""
    args = tfi.InfluenceArgs(case="fixed", pretrain_solver=cg(1e-2), finetune_solver=cg(1e-3),
                             hessian_samples=hessian_samples)
    return dict(feature_spec=json.dumps(SPEC), embedding=json.dumps(["embedding"]), influence_args=args.to_json(),
                finetune_train_split="train", test_split="test")


INFLUENCE_PROPS = influence_props()


def examples_artifact(uri, splits):
    a = standard_artifacts.Examples()
    a.uri, a.split_names = uri, artifact_utils.encode_split_names(list(splits))
    return a


def model_artifact(uri, model):
    d = os.path.join(uri, "Format-Serving")
    os.makedirs(d, exist_ok=True)
    model.save(os.path.join(d, "model.keras"))
    a = standard_artifacts.Model()
    a.uri = uri
    return a


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    rng = np.random.default_rng(0)
    mk = lambda n, tag, classes: ([f"{tag}-{i:04d}".encode() for i in range(n)],  # noqa: E731
                                  rng.random((n, 8, 8)).astype(np.float32), rng.integers(0, classes, n))
    pre_data = {"train": mk(80, "pre", 4)}
    ft_data = {"train": mk(50, "ft", 3), "test": mk(20, "test", 3)}
    th.write_examples(str(root / "pre_examples"), pre_data)
    th.write_examples(str(root / "ft_examples"), ft_data)
    pre, ft, emb = models.build_two_stage_models((8, 8, 1), 4, 3, seed=0, l2=1e-3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for m, (k, x, y) in ((pre, pre_data["train"]), (ft, ft_data["train"])):
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
        if m is ft:
            emb.trainable = False
            m.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
        m.fit(x[..., None], y, epochs=5, batch_size=32, verbose=0)
        emb.trainable = True
    arts = dict(pre_ex=examples_artifact(str(root / "pre_examples"), ["train"]),
                ft_ex=examples_artifact(str(root / "ft_examples"), ["train", "test"]),
                pre_m=model_artifact(str(root / "pre_model"), pre), ft_m=model_artifact(str(root / "ft_model"), ft))
    return root, arts, pre_data, ft_data


def ctx(tmp):
    return BaseBeamExecutor.Context(beam_pipeline_args=BEAM_IN_PROCESS, tmp_dir=str(tmp), unique_id="1")


def ds(k_x_y):
    k, x, y = k_x_y
    return tf.data.Dataset.from_tensor_slices((x[..., None], y)).batch(256)


@pytest.fixture(scope="module")
def beam_scores(world, tmp_path_factory):
    """The InfluenceScorer executor's scores with :data:`INFLUENCE_PROPS` (its Beam pass over the pretraining split),
    run once for the tests that compare them with the library and with the index."""
    from tfx_components.artifacts import InfluenceScores
    _, a, _, _ = world
    tmp = tmp_path_factory.mktemp("beam_scores")
    out = InfluenceScores()
    out.uri = str(tmp / "scores")
    InfluenceExecutor(ctx(tmp / "tmp")).Do(
        {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
         "finetune_model": [a["ft_m"]]}, {"scores": [out]}, dict(INFLUENCE_PROPS))
    return out


@pytest.fixture(scope="module")
def library(world):
    """The saved models and the splits as the artifacts hold them (the same order, so the iterative solves see
    identical sums), and ``multi_stage_influence`` on them with the scorer's solvers over every pretraining example."""
    from tfx_components import beam_scoring, common
    _, a, _, _ = world
    pre = keras.models.load_model(os.path.join(a["pre_m"].uri, "Format-Serving", "model.keras"))
    ft = keras.models.load_model(os.path.join(a["ft_m"].uri, "Format-Serving", "model.keras"))
    spec = beam_scoring.parse_feature_spec(SPEC)
    splits = dict(pre=common.load_split(a["pre_ex"], "train", spec), ft=common.load_split(a["ft_ex"], "train", spec),
                  test=common.load_split(a["ft_ex"], "test", spec))
    ref = tfi.multi_stage_influence(tfi.Objective(pre, pre.loss), mk(*splits["pre"][1:]), tfi.Objective(ft, ft.loss),
                                    mk(*splits["ft"][1:]), mk(*splits["test"][1:]), embedding=["embedding"],
                                    args=tfi.InfluenceArgs(pretrain_solver=cg(1e-2), finetune_solver=cg(1e-3),
                                                           hessian_samples=None)).scores
    return pre, ft, splits, ref


def mk(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(256)


def test_influence_scorer_equals_the_library(world, beam_scores, library, tmp_path):
    root, a, pre_data, ft_data = world
    from tfx_components.artifacts import InfluenceScores
    out, props = beam_scores, dict(INFLUENCE_PROPS)
    got = scores_io.read_scores(os.path.join(out.uri, "Split-train"))
    pre, ft, splits, ref = library
    (pk, px, py), (_, fx, fy), (_, tx, ty) = splits["pre"], splits["ft"], splits["test"]
    assert sorted(pk) == sorted(pre_data["train"][0])
    for i, k in enumerate(pk):  # float32 agreement: Beam batches the per-example products differently
        assert got[k] == pytest.approx(ref[i], rel=1e-4, abs=1e-6)
    assert out.get_string_custom_property("score_kind") == "multi_stage_fixed"
    summary = json.loads(out.get_string_custom_property("summary"))
    assert summary["train"]["count"] == 80 and len(summary["train"]["top_keys"]) == 10
    assert json.loads(out.get_string_custom_property("solves"))["pretrain"]["method"] == "cg_squared"
    assert out.get_string_custom_property("pretrain_hessian") == "every corpus example"
    # EK-FAC through the component: the same scores as the library with the same solver
    out_ek = InfluenceScores()
    out_ek.uri = str(tmp_path / "scores_ekfac")
    InfluenceExecutor(ctx(tmp_path / "tmp_ek")).Do(
        {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
         "finetune_model": [a["ft_m"]]}, {"scores": [out_ek]},
        {**props, "influence_args": tfi.InfluenceArgs(
            hessian_samples=None, pretrain_solver=tfi.SolverConfig("ekfac", damping=1e-2),
            finetune_solver=tfi.SolverConfig("ekfac", damping=1e-3)).to_json()})
    got_ek = scores_io.read_scores(os.path.join(out_ek.uri, "Split-train"))
    ek = lambda lam: tfi.SolverConfig("ekfac", damping=lam)  # noqa: E731
    ref_ek = tfi.multi_stage_influence(tfi.Objective(pre, pre.loss), mk(px, py), tfi.Objective(ft, ft.loss),
                                       mk(fx, fy), mk(tx, ty), embedding=["embedding"],
                                       args=tfi.InfluenceArgs(pretrain_solver=ek(1e-2), finetune_solver=ek(1e-3),
                                                              hessian_samples=None)).scores
    for i, k in enumerate(pk):
        assert got_ek[k] == pytest.approx(ref_ek[i], rel=1e-4, abs=1e-6)
    assert json.loads(out_ek.get_string_custom_property("solves"))["pretrain"]["method"] == "ekfac"
    # the (W, U) layout the workers used is recorded and rebuilds on the model file
    rebuilt = tfi.ParameterGroup.from_spec(pre, out.get_string_custom_property("group_spec"))
    assert rebuilt.size == sum(v.numpy().size for v in pre.trainable_variables)


def test_influence_scorer_streams_the_pretraining_corpus(world, library, tmp_path, monkeypatch):
    """The driver never loads the pretraining split: it streams it from the files, and its Hessian
    subsample is the library's (same positions), so scores equal ``multi_stage_influence`` with
    ``hessian_samples`` on the split held in memory."""
    root, a, pre_data, ft_data = world
    from tfx_components import beam_scoring, common
    from tfx_components.artifacts import InfluenceScores
    spec = beam_scoring.parse_feature_spec(SPEC)
    pk, px, py = common.load_split(a["pre_ex"], "train", spec)
    streamed = list(common.stream_split(a["pre_ex"], "train", spec, batch_size=32))
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in streamed]), px)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in streamed]), py)
    sx, sy = common.sample_split(a["pre_ex"], "train", spec, 30)
    keep = tfi.objective.subsample_mask(80, 30)
    np.testing.assert_array_equal(sx, px[keep])
    np.testing.assert_array_equal(sy, py[keep])
    assert common.count_records(common.split_files(a["pre_ex"], "train"), "pre") == 80
    real_load = common.load_split

    def guarded(examples, split, spec_, limit=None):
        assert examples.uri != a["pre_ex"].uri, "the driver loaded the pretraining split"
        return real_load(examples, split, spec_, limit)
    monkeypatch.setattr(common, "load_split", guarded)
    out = InfluenceScores()
    out.uri = str(tmp_path / "scores")
    InfluenceExecutor(ctx(tmp_path / "tmp")).Do(
        {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
         "finetune_model": [a["ft_m"]]}, {"scores": [out]}, influence_props(30))
    monkeypatch.setattr(common, "load_split", real_load)
    got = scores_io.read_scores(os.path.join(out.uri, "Split-train"))
    _, _, splits, full = library                # full: every pretraining example in the Hessian
    (_, fx, fy), (_, tx, ty) = splits["ft"], splits["test"]
    # models loaded afresh, like the executor's: the fixture's have traced their products at the full split's shapes,
    # and float32 products traced at other shapes round differently (1e-5 of the largest score)
    pre = keras.models.load_model(os.path.join(a["pre_m"].uri, "Format-Serving", "model.keras"))
    ft = keras.models.load_model(os.path.join(a["ft_m"].uri, "Format-Serving", "model.keras"))
    ref = tfi.multi_stage_influence(tfi.Objective(pre, pre.loss), mk(px, py), tfi.Objective(ft, ft.loss),
                                    mk(fx, fy), mk(tx, ty), embedding=["embedding"],
                                    args=tfi.InfluenceArgs(pretrain_solver=cg(1e-2), finetune_solver=cg(1e-3),
                                                           hessian_samples=30)).scores
    assert not np.allclose(ref, full, rtol=1e-3)  # the subsample matters, so agreement below is not vacuous
    for i, k in enumerate(pk):
        assert got[k] == pytest.approx(ref[i], rel=1e-4, abs=1e-6)
    # a corrupt shard in the middle of the streamed corpus fails naming the artifact and split
    import shutil
    bad_dir = tmp_path / "bad_pre"
    shutil.copytree(a["pre_ex"].uri, bad_dir)
    with open(bad_dir / "Split-train" / "data_tfrecord-00001-of-00002.gz", "r+b") as fh:
        fh.seek(40)
        fh.write(b"\x00garbage\xff" * 8)
    bad = examples_artifact(str(bad_dir), ["train"])
    for samples in (30, None):
        with pytest.raises(ValueError, match=f"Examples artifact {bad_dir}.*split 'train'"):
            InfluenceExecutor(ctx(tmp_path / "tmp2")).Do(
                {"pretrain_examples": [bad], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
                 "finetune_model": [a["ft_m"]]}, {"scores": [InfluenceScores()]},
                influence_props(samples))



def test_influence_scorer_takes_influence_args_whole_and_the_old_keywords_for_one_release():
    from tfx.types import channel_utils, standard_artifacts as sa
    ch = lambda t: channel_utils.as_channel([t()])  # noqa: E731
    inputs = dict(pretrain_examples=ch(sa.Examples), finetune_examples=ch(sa.Examples),
                  pretrain_model=ch(sa.Model), finetune_model=ch(sa.Model), feature_spec=SPEC, embedding=["embedding"])
    args = tfi.InfluenceArgs(case="updated", alpha=0.05, pretrain_solver=tfi.SolverConfig("ekfac", damping=1e-4))
    c = InfluenceScorer(**inputs, influence_args=args)
    assert tfi.InfluenceArgs.from_json(c.exec_properties["influence_args"]) == args
    assert tfi.InfluenceArgs.from_json(InfluenceScorer(**inputs).exec_properties["influence_args"]) == \
        tfi.InfluenceArgs()                                      # the library's defaults, not a second copy
    with pytest.warns(DeprecationWarning, match="influence_args=tf_influence.InfluenceArgs"):
        old = InfluenceScorer(**inputs, case="fixed", damping_pretrain=1e-2, damping_finetune=1e-4,
                              solver="cg_squared", max_iter=50, hessian_samples=30)
    got = tfi.InfluenceArgs.from_json(old.exec_properties["influence_args"])
    assert (got.pretrain_solver.method, got.pretrain_solver.damping, got.pretrain_solver.iterative.max_iter) == \
        ("cg_squared", 1e-2, 50)
    assert (got.finetune_solver.method, got.finetune_solver.damping, got.hessian_samples) == ("cg_squared", 1e-4, 30)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['dampng_pretrain'\]"):
        InfluenceScorer(**inputs, dampng_pretrain=1e-2)
    with pytest.raises(ValueError, match="case must be 'fixed'"):
        InfluenceScorer(**inputs, influence_args={"case": "fxed"})
    # the index's queries: QueryArgs passed whole; index_top_k = k is QueryArgs(top_k=k) for one release
    from tf_influence.index import QueryArgs
    from tfx_components.artifacts import GradientIndex
    idx = dict(inputs, index=ch(GradientIndex))
    query = QueryArgs(top_k=7, rerank=50, backend="exact")
    assert QueryArgs.from_json(InfluenceScorer(**idx, query_args=query).exec_properties["query_args"]) == query
    assert InfluenceScorer(**idx).exec_properties["query_args"] is None        # scores only, no per-test lists
    with pytest.warns(DeprecationWarning, match=r"query_args=tf_influence.index.QueryArgs\(top_k=k\)"):
        old = InfluenceScorer(**idx, index_top_k=5)
    assert QueryArgs.from_json(old.exec_properties["query_args"]) == QueryArgs(top_k=5)
    with pytest.raises(TypeError, match="not both"):
        InfluenceScorer(**idx, index_top_k=5, query_args=query)
    with pytest.raises(ValueError, match="give the index input"):
        InfluenceScorer(**inputs, query_args=query)
    with pytest.raises(ValueError, match="already hold both inverse Hessians"):
        InfluenceScorer(**idx, query_args={"precondition": "diagonal"})
    with pytest.raises(ValueError, match="every pretraining example's score is always written"):
        InfluenceScorer(**idx, query_args=QueryArgs(all_scores=True))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['top_kk'\]"):
        InfluenceScorer(**idx, query_args={"top_kk": 3})


def test_factor_fitter_feeds_the_influence_scorer(world, library, tmp_path):
    """FactorFitter (Beam combiner over the pretraining artifact) → InfluenceScorer(pretrain_factors=…)
    equals the library with EK-FAC fitted in process on the same data (empirical Fisher: deterministic)."""
    from tfx_components.artifacts import InfluenceScores, KFACFactors
    from tfx_components.factor_fitter.component import FactorFitter
    from tfx_components.factor_fitter.executor import Executor as FactorExecutor
    root, a, pre_data, ft_data = world
    factors = KFACFactors()
    factors.uri = str(tmp_path / "factors")
    fprops = dict(feature_spec=json.dumps(SPEC), kind="ekfac", fisher="empirical", batch_size=16)
    FactorExecutor(ctx(tmp_path / "tmp_f")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]},
                                               {"factors": [factors]}, fprops)
    assert factors.get_int_custom_property("num_examples") == 80
    assert json.loads(factors.get_string_custom_property("summary"))["bfloat16_products"] == []
    out = InfluenceScores()
    out.uri = str(tmp_path / "scores")
    props = dict(INFLUENCE_PROPS)
    InfluenceExecutor(ctx(tmp_path / "tmp")).Do(
        {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
         "finetune_model": [a["ft_m"]], "pretrain_factors": [factors]}, {"scores": [out]}, props)
    assert json.loads(out.get_string_custom_property("solves"))["pretrain"]["method"] == "ekfac"
    # which Hessian was used is recorded, not silently chosen
    assert out.get_string_custom_property("pretrain_hessian").startswith("KFACFactors ekfac on 80 examples")
    got = scores_io.read_scores(os.path.join(out.uri, "Split-train"))
    pre, ft, splits, _ = library
    pk = splits["pre"][0]
    ref = tfi.multi_stage_influence(tfi.Objective(pre, pre.loss), mk(*splits["pre"][1:]), tfi.Objective(ft, ft.loss),
                                    mk(*splits["ft"][1:]), mk(*splits["test"][1:]), embedding=["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None,
                                                           pretrain_solver=tfi.SolverConfig(
                                                               "ekfac", damping=1e-2,
                                                               kronecker=tfi.KroneckerOptions(fisher="empirical")),
                                                           finetune_solver=cg(1e-3))).scores
    for i, k in enumerate(pk):
        assert got[k] == pytest.approx(ref[i], rel=1e-3, abs=1e-6)
    # factors of another model's parameters are refused, naming the artifact (fitted with bfloat16 products: the
    # product_dtype parameter reaches the Beam workers, and the artifact's summary says which products used it)
    other = KFACFactors()
    other.uri = str(tmp_path / "factors_ft")
    FactorExecutor(ctx(tmp_path / "tmp_g")).Do({"examples": [a["ft_ex"]], "model": [a["ft_m"]]},
                                               {"factors": [other]}, {**fprops, "splits": json.dumps(["train"]),
                                                                      "product_dtype": "bfloat16"})
    low = json.loads(other.get_string_custom_property("summary"))["bfloat16_products"]
    assert low and all(k.split("/")[1] in ("in", "out", "per_example") for k in low), low
    with pytest.raises(ValueError, match="KFACFactors artifact .*another parameter group"):
        InfluenceExecutor(ctx(tmp_path / "tmp2")).Do(
            {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
             "finetune_model": [a["ft_m"]], "pretrain_factors": [other]}, {"scores": [InfluenceScores()]}, props)
    with pytest.raises(ValueError, match="Model artifact .*no_such_layer"):
        FactorExecutor(ctx(tmp_path / "tmp_h")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]},
                                                   {"factors": [KFACFactors()]},
                                                   {**fprops, "layers": json.dumps(["no_such_layer"])})
    with pytest.raises(ValueError, match="kind must be"):
        FactorFitter(examples=None, model=None, feature_spec=SPEC, kind="diagonal")
    with pytest.raises(ValueError, match="product_dtype must be one of"):
        FactorFitter(examples=None, model=None, feature_spec=SPEC, product_dtype="float16")
    # memory_budget reaches the Beam workers, whose memory plan refuses the fit before any pass
    with pytest.raises(Exception, match="over the memory budget of 2.0 KB"):
        FactorExecutor(ctx(tmp_path / "tmp_i")).Do({"examples": [a["ft_ex"]], "model": [a["ft_m"]]},
                                                   {"factors": [KFACFactors()]},
                                                   {**fprops, "splits": json.dumps(["train"]), "memory_budget": "2kB"})
    with pytest.raises(ValueError, match="memory size must be"):
        FactorFitter(examples=None, model=None, feature_spec=SPEC, memory_budget="lots")


def test_self_influence_scorer_equals_the_library_and_names_bad_input(world, tmp_path):
    root, a, pre_data, _ = world
    from tfx_components.artifacts import InfluenceScores
    out = InfluenceScores()
    out.uri = str(tmp_path / "si")
    SIExecutor(ctx(tmp_path / "tmp")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"scores": [out]},
                                         {"feature_spec": json.dumps(SPEC), "si_layers": json.dumps(["embedding"])})
    got = scores_io.read_scores(os.path.join(out.uri, "Split-train"))
    pre = keras.models.load_model(os.path.join(a["pre_m"].uri, "Format-Serving", "model.keras"))
    ref = tracin.self_influence(tfi.Objective(pre, pre.loss), ds(pre_data["train"]), ["embedding"])
    for i, k in enumerate(pre_data["train"][0]):
        assert got[k] == pytest.approx(float(ref[i]), rel=1e-5)
    assert out.get_string_custom_property("score_kind") == "self_influence"
    # no si_layers: every layer with parameters, the library's default too
    out_all = InfluenceScores()
    out_all.uri = str(tmp_path / "si_all")
    SIExecutor(ctx(tmp_path / "tmpa")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"scores": [out_all]},
                                          {"feature_spec": json.dumps(SPEC)})
    got_all = scores_io.read_scores(os.path.join(out_all.uri, "Split-train"))
    ref_all = tracin.self_influence(tfi.Objective(pre, pre.loss), ds(pre_data["train"]))
    for i, k in enumerate(pre_data["train"][0]):
        assert got_all[k] == pytest.approx(float(ref_all[i]), rel=1e-5)
        assert got_all[k] > got[k]
    # TracIn over two checkpoints with learning rates
    ck = [str(tmp_path / "c1.weights.h5"), str(tmp_path / "c2.weights.h5")]
    pre.save_weights(ck[0])
    saved = pre.get_weights()
    pre.set_weights([w * 0.5 for w in saved])
    pre.save_weights(ck[1])
    ref2 = tracin.self_influence(tfi.Objective(pre, pre.loss), ds(pre_data["train"]), ["embedding"])
    pre.set_weights(saved)
    out2 = InfluenceScores()
    out2.uri = str(tmp_path / "si2")
    SIExecutor(ctx(tmp_path / "tmpc")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"scores": [out2]},
                                          {"feature_spec": json.dumps(SPEC), "si_layers": json.dumps(["embedding"]),
                                           "checkpoints": json.dumps(ck), "learning_rates": json.dumps([0.1, 0.2])})
    got2 = scores_io.read_scores(os.path.join(out2.uri, "Split-train"))
    for i, k in enumerate(pre_data["train"][0]):
        assert got2[k] == pytest.approx(0.1 * float(ref[i]) + 0.2 * float(ref2[i]), rel=1e-5)
    with pytest.raises(ValueError, match=f"Model artifact {a['pre_m'].uri}.*no layer named 'encoder'"):
        SIExecutor(ctx(tmp_path / "t2")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"scores": [out]},
                                            {"feature_spec": json.dumps(SPEC), "si_layers": json.dumps(["encoder"])})
    with pytest.raises(ValueError, match="has no split 'validation'"):
        SIExecutor(ctx(tmp_path / "t3")).Do({"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"scores": [out]},
                                            {"feature_spec": json.dumps(SPEC), "si_layers": json.dumps(["embedding"]),
                                             "splits": json.dumps(["validation"])})
    empty = standard_artifacts.Model()
    empty.uri = str(tmp_path / "nomodel")
    with pytest.raises(FileNotFoundError, match="no Keras model file"):
        SIExecutor(ctx(tmp_path / "t4")).Do({"examples": [a["pre_ex"]], "model": [empty]}, {"scores": [out]},
                                            {"feature_spec": json.dumps(SPEC), "si_layers": json.dumps(["embedding"])})


def test_summary_streams_and_equals_numpy(tmp_path):
    """The scores summary is computed in two streamed passes (chunks of 7 here) and equals numpy."""
    from tfx_components import common
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}".encode() for i in range(100)]
    vals = rng.normal(size=100).astype(np.float32)
    th.write_scores(str(tmp_path), "train", keys, vals)
    got = common.summarize(str(tmp_path / "Split-train"), top_k=5, chunk=7)
    v = vals.astype(np.float64)
    hist, edges = np.histogram(v, bins=20)
    assert got["count"] == 100 and got["histogram"]["counts"] == hist.tolist()
    np.testing.assert_allclose(got["histogram"]["edges"], edges)
    np.testing.assert_allclose([got["mean"], got["std"], got["min"], got["max"]], [v.mean(), v.std(), v.min(), v.max()],
                               rtol=1e-12)
    order = np.argsort(v)
    assert got["top_keys"] == [keys[i].decode() for i in order[::-1][:5]]
    assert got["bottom_keys"] == [keys[i].decode() for i in order[:5]]
    os.makedirs(tmp_path / "bad")
    with tf.io.TFRecordWriter(str(tmp_path / "bad" / "scores-0.tfrecord.gz"), options="GZIP") as w:
        for k, s in ((b"a", 1.0), (b"b", float("nan"))):
            w.write(scores_io.encode_score(k, s))
    with pytest.raises(ValueError, match="non-finite score for key b'b'"):
        common.summarize(str(tmp_path / "bad"))


def test_every_component_documents_itself_with_an_example():
    from tfx_components.factor_fitter.component import FactorFitter
    from tfx_components.influence_scorer.component import InfluenceScorer
    from tfx_components.score_filter.component import ScoreFilter
    from tfx_components.self_influence_scorer.component import SelfInfluenceScorer
    for c in (FactorFitter, InfluenceScorer, ScoreFilter, SelfInfluenceScorer):
        assert c.__doc__ and len(c.__doc__) > 200, c.__name__
    for c in (FactorFitter, InfluenceScorer, SelfInfluenceScorer):
        assert f"{c.__name__}(" in c.__doc__, c.__name__


def test_influence_scorer_queries_a_gradient_index(world, beam_scores, library, tmp_path):
    """GradientIndexer → InfluenceScorer(index=...): with a projection as wide as every block (the
    identity) the index's scores equal the Beam pass's, and each test point's top-k harmful / helpful
    keys are the largest / most negative of its own exact scores (``test_vectors(..., "each")``),
    re-scored (``QueryArgs.rerank``) over the streamed split with its keys, as the scores show."""
    from tf_influence.index import QueryArgs
    from tf_influence.projection import ProjectionArgs
    from tfx_components.artifacts import GradientIndex, InfluenceScores
    from tfx_components.gradient_indexer.executor import Executor as IndexExecutor
    root, a, pre_data, ft_data = world
    index = GradientIndex()
    index.uri = str(tmp_path / "index")
    IndexExecutor(ctx(tmp_path / "tmp_i")).Do(
        {"examples": [a["pre_ex"]], "model": [a["pre_m"]]}, {"index": [index]},
        {"projection_args": ProjectionArgs(k=10_000, k_other=10_000, dtype="float32").to_json(),
         "feature_spec": json.dumps(SPEC)})
    assert index.get_int_custom_property("num_examples") == 80
    out = InfluenceScores()
    out.uri = str(tmp_path / "index_scores")
    InfluenceExecutor(ctx(tmp_path / "tmp_index")).Do(
        {"pretrain_examples": [a["pre_ex"]], "finetune_examples": [a["ft_ex"]], "pretrain_model": [a["pre_m"]],
         "finetune_model": [a["ft_m"]], "index": [index]}, {"scores": [out]},
        {**INFLUENCE_PROPS, "query_args": QueryArgs(top_k=5, rerank=20).to_json()})
    outs = {"beam": beam_scores, "index": out}
    beam = scores_io.read_scores(os.path.join(outs["beam"].uri, "Split-train"))
    got = scores_io.read_scores(os.path.join(outs["index"].uri, "Split-train"))
    assert set(got) == set(beam)
    for k in beam:
        assert got[k] == pytest.approx(beam[k], rel=1e-4, abs=1e-6)
    assert outs["index"].get_string_custom_property("scored_by").startswith("GradientIndex")
    # every test point as its own query
    pre, ft, splits, _ = library
    (pk, px, py), (_, fx, fy), (tk, tx, ty) = splits["pre"], splits["ft"], splits["test"]
    args = tfi.InfluenceArgs.from_json(INFLUENCE_PROPS["influence_args"])
    ms = tfi.MultiStageInfluence(tfi.Objective(pre, pre.loss), mk(px, py), tfi.Objective(ft, ft.loss), mk(fx, fy),
                                 embedding=["embedding"], args=args)
    each, _, _ = ms.test_vectors(mk(tx, ty), "each")
    exact = tfi.per_example_dot(tfi.Objective(pre, pre.loss), mk(px, py), ms.WU, each.numpy(), method="jacobian")
    top = json.load(open(os.path.join(outs["index"].uri, "Split-train", "top_k.json")))
    assert [r["test_key"] for r in top] == [k.decode() for k in tk]
    for j, row in enumerate(top):
        assert [k.encode() for k, _ in row["harmful"]] == [pk[i] for i in np.argsort(-exact[:, j])[:5]]
        assert [k.encode() for k, _ in row["helpful"]] == [pk[i] for i in np.argsort(exact[:, j])[:5]]
        position = {k: i for i, k in enumerate(pk)}
        for k, v in row["harmful"] + row["helpful"]:   # the exact (re-scored) products of those examples
            assert v == pytest.approx(float(exact[position[k.encode()], j]), rel=1e-5, abs=1e-7)
    assert outs["index"].get_string_custom_property("index_backend") == "exact+rerank"
    assert QueryArgs.from_json(outs["index"].get_string_custom_property("query_args")).rerank == 20
