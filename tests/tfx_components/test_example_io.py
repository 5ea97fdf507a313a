"""Models as users bring them to the components and the standalone Beam job: feature specs derived
from a model's named inputs and a Schema / the examples (keras-hub's dict inputs, sequence features),
labels inferred or named, keys optional (file and position), clear errors; and a killed job leaves no
temporary file after the next run."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tfx")

import tf_influence as tfi  # noqa: E402
from tf_influence import scores_io, tracin  # noqa: E402
from tfx_components import beam_scoring, example_io  # noqa: E402
from tests.tfx_helpers import BEAM_IN_PROCESS  # noqa: E402


def _feature(values):
    values = np.asarray(values).ravel()
    if values.dtype.kind == "f":
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))


def run_and_kill(argv, ready, timeout: float = 300.0):
    """Start ``argv`` as its own process group, wait until ``ready()`` (polled every 50 ms), then
    SIGKILL the whole group (workers included); fails if the process ends first."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            assert proc.poll() is None, "the process ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_records(split_dir, rows, shards=2):
    """``rows``: list of {feature: values}; GZIP shards ``data_tfrecord-<i>-of-<n>.gz`` (rows dealt in turn)."""
    os.makedirs(split_dir, exist_ok=True)
    files = []
    for s in range(shards):
        path = os.path.join(split_dir, f"data_tfrecord-{s:05d}-of-{shards:05d}.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for row in rows[s::shards]:
                w.write(tf.train.Example(features=tf.train.Features(
                    feature={k: _feature(v) for k, v in row.items()})).SerializeToString())
        files.append(path)
    return files


@pytest.fixture(scope="module")
def hub_lm(tmp_path_factory):
    """A tiny keras-hub GPT-2 causal LM (dict inputs token_ids + padding_mask) and token examples
    without a key feature."""
    from tests import hub_models as hm
    root = tmp_path_factory.mktemp("hub_io")
    keras.utils.set_random_seed(0)
    model = hm.pretrain_model("gpt2", hm.backbone("gpt2"))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(root / "model.keras")
    model.save(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, hm.VOCAB, size=(30, hm.LENGTH))
    mask = np.ones_like(ids)
    mask[:10, -2:] = 0
    labels = np.roll(ids * mask, -1, axis=1)
    rows = [{"token_ids": ids[i] * mask[i], "padding_mask": mask[i], "labels": labels[i]} for i in range(30)]
    files = write_records(str(root / "examples" / "Split-train"), rows)
    # in each file, position p holds row s + 2p
    where = {example_io.record_key(f, p): s + 2 * p for s, f in enumerate(files) for p in range(15)}
    ref = tracin.self_influence(tfi.Objective(model, model.loss), tf.data.Dataset.from_tensor_slices(
        ({"token_ids": (ids * mask).astype(np.int32), "padding_mask": mask.astype(np.int32)}, labels)).batch(30))
    return root, path, model, where, ref


def test_a_keras_hub_lm_is_scored_without_spec_key_or_layers(hub_lm):
    """The standalone job on a dict-input keras-hub model: inputs and the sequence label derived from
    the first example, keys = file and position, K = every layer; equal to the library."""
    root, path, _, where, ref = hub_lm
    out = str(root / "scores")
    beam_scoring.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                       "--output", out, "--batch-size", "8", *BEAM_IN_PROCESS])
    got = scores_io.read_scores(out)
    assert set(got) == set(where)
    np.testing.assert_allclose([got[k] for k in where], [ref[i] for i in where.values()], rtol=2e-5)


def test_the_component_reads_inputs_from_a_schema_artifact(hub_lm, tmp_path):
    """SelfInfluenceScorer with a Schema artifact (the types and ``[length]`` shapes) and no feature spec."""
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import artifact_utils, standard_artifacts
    from tfx.utils import io_utils

    from tests import hub_models as hm
    from tfx_components.artifacts import InfluenceScores
    from tfx_components.self_influence_scorer.executor import Executor
    root, path, _, where, ref = hub_lm
    length = hm.LENGTH
    schema = schema_utils.schema_from_feature_spec({n: tf.io.FixedLenFeature([length], tf.int64)
                                                    for n in ("token_ids", "padding_mask", "labels")})
    io_utils.write_pbtxt_file(str(tmp_path / "schema" / "schema.pbtxt"), schema)
    ex, model, sch, out = (standard_artifacts.Examples(), standard_artifacts.Model(), standard_artifacts.Schema(),
                           InfluenceScores())
    ex.uri, ex.split_names = str(root / "examples"), artifact_utils.encode_split_names(["train"])
    os.makedirs(tmp_path / "model" / "Format-Serving")
    os.symlink(path, tmp_path / "model" / "Format-Serving" / "model.keras")
    model.uri, sch.uri, out.uri = str(tmp_path / "model"), str(tmp_path / "schema"), str(tmp_path / "out")
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=BEAM_IN_PROCESS, tmp_dir=str(tmp_path / "tmp"), unique_id="1")
    Executor(ctx).Do({"examples": [ex], "model": [model], "schema": [sch]}, {"scores": [out]}, {})
    spec = json.loads(out.get_string_custom_property("feature_spec"))
    assert spec["inputs"]["token_ids"] == {"name": "token_ids", "shape": [length], "dtype": "int32"}
    assert spec["y"] == {"name": "labels", "shape": [length], "dtype": "int64"} and spec["key"] is None
    assert out.get_string_custom_property("example_identity") == "file_position"
    got = scores_io.read_scores(os.path.join(out.uri, "Split-train"))
    np.testing.assert_allclose([got[k] for k in where], [ref[i] for i in where.values()], rtol=2e-5)


def test_derivation_names_what_is_wrong():
    a, b = keras.Input((1,), name="a"), keras.Input((2,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.concatenate([a, b])))

    def rec(**kw):
        return tf.train.Example(features=tf.train.Features(
            feature={k: _feature(v) for k, v in kw.items()})).SerializeToString()
    with pytest.raises(ValueError, match=r"input\(s\) \['b'\] that the first example of .* does not have"):
        example_io.derive_feature_spec(model, sample_record=rec(a=[1.0], label=[1]))
    with pytest.raises(ValueError, match=r"feature 'b' has 3 value\(s\) per example but model .* takes shape \[2\]"):
        example_io.derive_feature_spec(model, sample_record=rec(a=[1.0], b=[1.0, 2.0, 3.0], label=[1]))
    with pytest.raises(ValueError, match=r"cannot tell the label .* features \['id', 'label'\] are left .*label_key"):
        example_io.derive_feature_spec(model, sample_record=rec(a=[1.0], b=[1.0, 2.0], label=[1], id=[7]))
    spec = example_io.derive_feature_spec(model, sample_record=rec(a=[1.0], b=[1.0, 2.0], label=[1], id=[7]),
                                          key_feature="id")         # the key is not a label candidate
    assert spec["y"]["name"] == "label" and spec["key"] == "id"
    keys, x, y = example_io.decode_batch([rec(a=[1.0], b=[1.0, 2.0], label=[1], id=[7])], spec, "f")
    assert keys == [b"7"] and y.tolist() == [1] and x["b"].shape == (1, 2)
    with pytest.raises(ValueError, match=r"f.gz: .*b"):       # a record without an input feature, the file named
        example_io.decode_batch([rec(a=[1.0], label=[1], id=[7])], spec, "f.gz")
    with pytest.raises(ValueError, match="unknown entry \\['inputz'\\]"):
        example_io.parse_feature_spec({"inputz": {}, "y": {"name": "y"}})


def test_a_killed_job_leaves_no_temporary_after_the_rerun(tmp_path):
    """SIGKILL the standalone job (its whole process group) while it writes a scores file: nothing is
    published; the rerun into the same folder removes the killed run's temporaries and publishes
    every score once."""
    x_in = keras.Input((4,), name="x")
    model = keras.Model(x_in, keras.layers.Dense(3, name="head")(keras.layers.Dense(8, name="embedding")(x_in)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(tmp_path / "model.keras")
    model.save(path)
    rng = np.random.default_rng(0)
    rows = [{"x": rng.normal(size=4).astype(np.float32), "label": [int(rng.integers(3))]} for _ in range(3000)]
    write_records(str(tmp_path / "examples"), rows, shards=2)
    out = tmp_path / "scores"
    argv = [sys.executable, "-m", "tfx_components.beam_scoring", "--examples", str(tmp_path / "examples" / "*"),
            "--model", path, "--output", str(out), "--batch-size", "1", "--direct_running_mode=in_memory"]
    run_and_kill(argv, lambda: out.exists() and any(p.name.startswith(".tmp-") for p in out.iterdir()))
    left = sorted(p.name for p in out.iterdir())
    assert any(n.startswith(".tmp-") for n in left) and not any(n.startswith("scores-") for n in left), left
    subprocess.run(argv[:-3] + ["--batch-size", "512", "--direct_running_mode=in_memory"], check=True,
                   capture_output=True)          # the rerun, in bigger batches
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scores-00000-of-00002.tfrecord.gz", "scores-00001-of-00002.tfrecord.gz"], names
    assert len(scores_io.read_scores(str(out))) == 3000


def test_a_keras_hub_lm_loads_with_the_loss_it_was_saved_with(tmp_path):
    """keras-hub's CausalLM compiles itself (SparseCategoricalCrossentropy) and Keras skips the saved
    compile configuration of a model whose compile() is custom: without restoring it, the jobs scored a
    model saved with CausalLMLoss by another loss (and failed on its ignored positions)."""
    from tests import hub_models as hm
    from tf_influence.lm import CausalLMLoss
    model = hm.pretrain_model("gpt2", hm.backbone("gpt2"))
    model.compile(loss=CausalLMLoss(per_example="sum"))
    path = str(tmp_path / "lm.keras")
    model.save(path)
    keras.config.disable_interactive_logging()
    raw = keras.models.load_model(path)
    assert not isinstance(raw.loss, CausalLMLoss)          # what Keras alone gives back
    loaded = example_io.load_keras_model(path)
    assert isinstance(loaded.loss, CausalLMLoss) and loaded.loss.per_example == "sum"
