"""The InfluenceReport component's notebook side: importing the component registers a visualization for its
artifact type, and ``InteractiveContext.show`` of the artifact displays its page (the whole document, in an
iframe). The component itself runs in both pipelines' tests."""

import json

import numpy as np
import pytest

pytest.importorskip("tfx")


def test_show_displays_the_report_page(tmp_path, monkeypatch):
    import IPython.core.display as ipd
    from tfx.orchestration.experimental.interactive import visualizations

    from tf_influence.report import Report
    from tfx_components.artifacts import InfluenceReport as Artifact
    from tfx_components.influence_report import component  # noqa: F401  (registers the visualization)
    page = Report("a page").write(str(tmp_path / "Split-train"))
    art = Artifact()
    art.uri = str(tmp_path)
    art.set_string_custom_property("pages", json.dumps([page]))
    shown = []
    monkeypatch.setattr(ipd, "display", lambda obj: shown.append(obj))
    vis = visualizations.get_registry().get_visualization(Artifact.TYPE_NAME)
    assert vis is not None
    vis.display(art)
    (html,) = [o.data for o in shown]
    assert "<iframe" in html and "srcdoc=" in html and "a page" in html and page in html


def test_report_from_files_refuses_scores_of_other_examples(tmp_path):
    import tensorflow as tf

    from tf_influence import scores_io
    from tf_influence.report.records import ReportArgs, report_from_files
    path = str(tmp_path / "data.tfrecord.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for i in range(4):
            f = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"k{i}".encode()])),
                 "x": tf.train.Feature(float_list=tf.train.FloatList(value=[float(i)]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    scores_io.write_scores(str(tmp_path / "s"), [b"k0", b"k1", b"other"], np.array([0.1, 0.2, 0.3]))
    with pytest.raises(KeyError, match="no example with key"):
        report_from_files(str(tmp_path / "s"), path, ReportArgs(top_k=3), key_feature="key")
    with pytest.raises(ValueError, match="drop_mode and drop_value together"):
        ReportArgs(drop_mode="drop_top_fraction")
