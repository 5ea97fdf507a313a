"""The standalone Beam scoring job: DirectRunner in multi-processing mode with 2 workers gives the
same scores as the in-process library."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from model_zoo import cnn as models
from tf_influence import scores_io, tracin
from tests import tfx_helpers as th

beam_scoring = pytest.importorskip("tfx_components.beam_scoring")

SPEC = {"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}, "key": "key"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam")
    splits = th.digits_splits(n_train=90, n_eval=0)
    written = th.write_examples(str(root / "examples"), {"train": splits["train"]}, shards=3)
    pre, _, _ = models.build_two_stage_models((8, 8, 1), 4, 6, seed=0)
    pre.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(root / "model.keras")
    pre.save(path)
    keys, images, labels = splits["train"]
    x = np.asarray(images, np.float32).reshape(-1, 8, 8, 1)
    y = np.asarray(labels, np.int64)
    return root, path, dict(zip(keys, range(len(keys)))), x, y, pre


def test_direct_runner_two_workers_equals_in_process(setup):
    """The job as users start it (``python -m``, its own process) with 2 worker processes."""
    import subprocess
    import sys
    root, path, index, x, y, pre = setup
    out = str(root / "si_scores")
    subprocess.run([sys.executable, "-m", "tfx_components.beam_scoring",
                    "--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                    "--feature-spec", json.dumps(SPEC), "--si-layers", "embedding", "--output", out,
                    "--batch-size", "16", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                   check=True, capture_output=True)
    got = scores_io.read_scores(out)
    assert set(got) == set(index)
    ref = tracin.self_influence(tfi.Objective(pre, pre.loss), tf.data.Dataset.from_tensor_slices((x, y)).batch(90),
                                ["embedding"])
    for k, i in index.items():
        # float32 agreement: scores are stored as float32 and Beam batches differently from the library
        assert got[k] == pytest.approx(float(ref[i]), rel=1e-5)


def test_influence_kind_reads_a_saved_result(setup):
    root, path, index, x, y, pre = setup
    # (W, U) with U before W: the workers must rebuild this exact layout from the saved group spec
    group = tfi.concat_groups("(U,W)", tfi.group_from_layers(pre, ["pretrain_head"]),
                              tfi.group_from_layers(pre, ["embedding"]))
    v = np.random.default_rng(0).normal(size=group.size).astype(np.float32)
    saved = tfi.InfluenceResult(np.zeros(len(index)), tf.constant(v), group, len(index), "test", group_spec=group.spec(pre))
    saved.save(str(root / "result"))
    out = str(root / "inf_scores")
    beam_scoring.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                       "--feature-spec", json.dumps(SPEC), "--kind", "influence", "--result", str(root / "result"),
                       "--output", out, "--direct_running_mode=in_memory"])
    got = scores_io.read_scores(out)
    ref = tfi.per_example_dot(tfi.Objective(pre, pre.loss), tf.data.Dataset.from_tensor_slices((x, y)).batch(90),
                              group, v)
    for k, i in index.items():
        assert got[k] == pytest.approx(float(ref[i]), rel=1e-4, abs=1e-6)

    # an array given to score_examples travels as a file the workers read, not inside the pipeline (a pickled
    # Create element: compressed into the job, 73 s for 65 MB); the file is removed once the scores are out
    import apache_beam as beam
    out2 = str(root / "inf_scores_array")
    p = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--direct_running_mode=in_memory"]))
    beam_scoring.score_examples(p, str(root / "examples" / "Split-train" / "*"), path, json.dumps(SPEC), "influence",
                                out2, group_spec=group.spec(pre).to_json(), vector=v)
    from apache_beam.portability.api import beam_runner_api_pb2
    transforms = p.to_runner_api().components.transforms.values()
    score = [beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload) for t in transforms
             if t.unique_name == "ScoreScore"]
    assert len(score) == 1 and not score[0].side_inputs                   # no side input, no Create of it
    assert not any(t.unique_name.endswith("Vector") for t in transforms)
    assert [n for n in os.listdir(out2) if n.startswith(".tmp-vector-")]   # the file the workers read
    p.run().wait_until_finish()
    assert scores_io.read_scores(out2) == pytest.approx(got, rel=1e-6)
    assert not [n for n in os.listdir(out2) if n.startswith(".tmp-")]


def test_bad_input(setup, tmp_path):
    root, path, *_ = setup
    bad_spec = {"x": {"name": "pixels", "shape": [8, 8, 1]}, "y": {"name": "label"}}
    with pytest.raises(Exception, match="no feature 'pixels'"):
        beam_scoring.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                           "--feature-spec", json.dumps(bad_spec), "--si-layers", "embedding",
                           "--output", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no Keras model file"):
        beam_scoring.load_keras_model(str(tmp_path))
    # a group spec of another model: the worker names the variable that does not match
    other, _, _ = models.build_two_stage_models((8, 8, 1), 4, 6, filters=(4, 16))
    spec = tfi.ParameterGroup.from_model(other).spec(other).to_json()
    with pytest.raises(Exception, match="conv1/kernel .*spec expects conv1/kernel"):
        beam_scoring.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                           "--feature-spec", json.dumps(SPEC), "--kind", "influence", "--group-spec", spec,
                           "--vector", str(_save_vector(tmp_path, spec)), "--output", str(tmp_path / "g")])
    with pytest.raises(Exception, match="no layer named 'encoder'"):
        beam_scoring.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                           "--feature-spec", json.dumps(SPEC), "--si-layers", "encoder", "--output", str(tmp_path / "p")])


def _save_vector(tmp_path, spec_json):
    size = sum(int(np.prod(shape)) for _, _, shape in tfi.GroupSpec.from_json(spec_json).variables)
    path = tmp_path / "v.npy"
    np.save(str(path), np.ones(size, np.float32))
    return path


def test_factors_as_a_beam_combiner_equal_the_in_process_fit(setup):
    """Two worker processes each sum their batches; the combined factors equal ``fit_factors``. The
    examples are given as several patterns (one per file): every one is read."""
    import glob

    from tf_influence import kfac
    from tfx_components import beam_factors
    root, path, index, x, y, pre = setup
    out = str(root / "factors")
    files = sorted(glob.glob(str(root / "examples" / "Split-train" / "*")))
    assert len(files) == 3
    beam_factors.main(["--examples", *files, "--model", path,
                       "--feature-spec", json.dumps(SPEC), "--output", out, "--fisher", "empirical",
                       "--batch-size", "16", "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    got = kfac.KFACFactors.load(out)
    group = tfi.ParameterGroup.from_model(pre)
    ref = kfac.fit_factors(tfi.Objective(pre), tf.data.Dataset.from_tensor_slices((x, y)).batch(32), group,
                           fisher="empirical")
    assert got.num_examples == len(x) and set(got.blocks) == set(ref.blocks)
    # float32 model: per-batch products in float32 (sums in float64), batched differently → ~1e-5 relative
    for name, blk in ref.blocks.items():
        np.testing.assert_allclose(got.blocks[name]["eig"], blk["eig"], rtol=1e-4, atol=1e-6 * blk["eig"].max())
    # the inverse they define is the same operator (eigenbases are unique up to sign / rotation)
    v = np.random.default_rng(1).normal(size=group.size)
    a = kfac.KFACInverse(got, pre, group, damping=0.1)(v).numpy()  # damped: float32 noise not amplified
    b = kfac.KFACInverse(ref, pre, group, damping=0.1)(v).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    empty = str(root / "empty.tfrecord.gz")
    with tf.io.TFRecordWriter(empty, options="GZIP"):
        pass
    with pytest.raises(Exception, match="no examples to fit"):
        beam_factors.main(["--examples", empty, "--model", path, "--feature-spec", json.dumps(SPEC),
                           "--output", str(root / "f2"), "--direct_running_mode=in_memory"])
    assert not os.path.exists(str(root / "f2" / "factors.json"))


def test_factor_workers_split_batches_into_the_fits_microbatches_and_check_its_memory_plan(setup, monkeypatch):
    """Each worker splits the batches BatchElements hands it into the microbatches the in-process fit would use
    (here forced to 5 of a batch of 16: 5 + 5 + 5 + 1) and the factors still equal ``fit_factors``'; a
    ``--memory-budget`` below the fit's plan fails before any pass, naming the plan's largest block, and an
    invalid one is refused in the driver."""
    from tf_influence import kfac, memory
    from tfx_components import beam_factors
    root, path, index, x, y, pre = setup
    seen = []

    def five(stats, shape, limit=None):
        seen.append(tuple(shape))
        return 5
    monkeypatch.setattr(memory, "factor_microbatch", five)
    calls = []
    real = kfac.FactorStatistics.covariances
    monkeypatch.setattr(kfac.FactorStatistics, "covariances",
                        lambda self, xs, ys, step: calls.append(len(ys)) or real(self, xs, ys, step))
    flags = ["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
             "--feature-spec", json.dumps(SPEC), "--fisher", "empirical", "--batch-size", "16",
             "--direct_running_mode=in_memory"]
    out = str(root / "factors-micro")
    beam_factors.main([*flags, "--output", out])
    assert seen and max(calls) == 5 and sum(calls) == len(x)        # every example once, in steps of at most 5
    got = kfac.KFACFactors.load(out)
    ref = kfac.fit_factors(tfi.Objective(pre), tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
                           tfi.ParameterGroup.from_model(pre), fisher="empirical")
    for name, blk in ref.blocks.items():
        np.testing.assert_allclose(got.blocks[name]["eig"], blk["eig"], rtol=1e-4, atol=1e-6 * blk["eig"].max())
    monkeypatch.undo()
    with pytest.raises(Exception, match=r"over the memory budget of 2\.0 KB: .* of 'conv2'"):
        beam_factors.main([*flags, "--output", str(root / "factors-over"), "--memory-budget", "2kB"])
    assert not os.path.exists(str(root / "factors-over" / "factors.json"))
    with pytest.raises(ValueError, match="memory size must be"):
        beam_factors.main([*flags, "--output", str(root / "factors-bad"), "--memory-budget", "lots"])


def test_dataflow_job_compiles(setup, tmp_path):
    """The scoring job translated for Dataflow (``--dry_run``: built, not submitted — no GCP here):
    the workers get this package from ``setup.py`` (staged as ``workflow.tar.gz``)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    from apache_beam.portability.api import beam_runner_api_pb2
    root, path, *_ = setup
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    opts = PipelineOptions(["--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
                            "--temp_location=gs://my-bucket/tmp", f"--setup_file={os.path.join(repo, 'setup.py')}",
                            "--no_auth", "--dry_run=True"])
    p = beam.Pipeline(options=opts)
    beam_scoring.score_examples(p, str(root / "examples" / "Split-train" / "*"), "gs://my-bucket/model.keras",
                                json.dumps(SPEC), "self_influence", "gs://my-bucket/scores", si_layers=["embedding"])
    job = p.run().job
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"ScoreRead", "ScoreScore", "ScoreCollect", "ScoreWrite"} <= names
    staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
              for env in job.proto_pipeline.components.environments.values() for d in env.dependencies}
    assert "workflow.tar.gz" in staged
    assert job.options.view_as(GoogleCloudOptions).region == "us-central1"


def test_keys_may_be_bytes_or_int64_and_anything_else_is_named():
    import tensorflow as tf
    from tfx_components.beam_scoring import decode_batch, example_key, parse_feature_spec

    def example(key_feature):
        return tf.train.Example(features=tf.train.Features(feature={
            "id": key_feature, "x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0])),
            "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}))

    spec = parse_feature_spec({"x": {"name": "x", "shape": [2]}, "y": {"name": "y"}, "key": "id"})
    recs = [example(tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))).SerializeToString()
            for i in (7, 1234567890123)]
    keys, x, y = decode_batch(recs, spec, "penguins.tfrecord.gz")   # an int64 ID column (was an IndexError)
    assert keys == [b"7", b"1234567890123"] and x.shape == (2, 2) and y.tolist() == [1, 1]
    b = example(tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"ex-1"])))
    assert example_key(b.features.feature, "id") == b"ex-1"
    f = example(tf.train.Feature(float_list=tf.train.FloatList(value=[0.5])))
    with pytest.raises(ValueError, match="f.tfrecord.gz: the key feature 'id' of an example is float"):
        example_key(f.features.feature, "id", "f.tfrecord.gz")
    with pytest.raises(ValueError, match="f.tfrecord.gz: an example has no key feature 'key'"):
        example_key(f.features.feature, "key", "f.tfrecord.gz")


def test_no_partial_file_survives_a_failed_run_or_the_next_run(setup, tmp_path):
    """A killed earlier run's ``.tmp-*`` / ``beam-temp-*`` are removed when the next run starts; a run
    that fails removes its own; published score files are whole or absent."""
    root, path, index, x, y, pre = setup
    out = tmp_path / "scores"
    (out / ".tmp-deadbeef").mkdir(parents=True)
    (out / ".tmp-deadbeef" / "scores.tfrecord.gz").write_bytes(b"partial")
    (out / "beam-temp-scores-0123").mkdir()
    argv = ["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
            "--feature-spec", json.dumps(SPEC), "--output", str(out), "--batch-size", "32"]
    with pytest.raises(Exception, match="no layer named 'encoder'"):
        beam_scoring.main(argv + ["--si-layers", "encoder"])
    assert sorted(p.name for p in out.iterdir()) == []            # the stale ones gone, nothing new left
    beam_scoring.main(argv)                                        # K = every layer (no --si-layers)
    assert all(not p.name.startswith((".tmp-", "beam-temp-")) for p in out.iterdir())
    got = scores_io.read_scores(str(out))
    ref = tracin.self_influence(tfi.Objective(pre, pre.loss), tf.data.Dataset.from_tensor_slices((x, y)).batch(90))
    for k, i in index.items():
        assert got[k] == pytest.approx(float(ref[i]), rel=1e-5)


def test_save_for_influence_is_what_the_components_read(tmp_path):
    import types as pytypes

    import keras

    from tfx_components.beam_scoring import load_keras_model
    from tfx_components.saving import save_for_influence
    model = models.build_two_stage_models((8, 8, 1), 4, 6, filters=(4, 16))[0]
    serving = tmp_path / "Format-Serving"
    with pytest.raises(ValueError, match="no compiled loss"):
        save_for_influence(model, pytypes.SimpleNamespace(serving_model_dir=str(serving)))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.get_layer("embedding").trainable = False            # a frozen embedding is fine
    model.export(str(serving), verbose=False)                 # the run_fn's SavedModel stays as it was
    path = save_for_influence(model, pytypes.SimpleNamespace(serving_model_dir=str(serving)))
    assert path == str(serving / "model.keras")
    loaded = load_keras_model(str(tmp_path))                  # the Model artifact's uri, as the executors pass
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    assert loaded.loss is not None
    with pytest.raises(FileNotFoundError, match="save_for_influence"):
        load_keras_model(str(tmp_path / "elsewhere"))
