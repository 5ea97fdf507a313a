"""Beam executor of ScoreFilter (all scoring math and selection lives in ``tf_influence``)."""

import json
import os

import apache_beam as beam
import tensorflow as tf
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tf_influence import scores_io
from tfx_components import common
from tfx_components.artifacts import scores_split_names

_DATA = "data_tfrecord"


class _Route(beam.DoFn):
    """Tag each serialized example 'kept' or 'dropped' by its key; fail on a key without a score."""

    def __init__(self, key_feature, artifact_desc):
        self.key_feature, self.desc = key_feature, artifact_desc

    def process(self, record, decisions):
        ex = tf.train.Example.FromString(record)
        feat = ex.features.feature.get(self.key_feature)
        if feat is None or not feat.bytes_list.value:
            raise ValueError(f"{self.desc}: an example has no bytes feature '{self.key_feature}' "
                             f"(features: {sorted(ex.features.feature)})")
        key = feat.bytes_list.value[0]
        if key not in decisions:
            raise ValueError(f"{self.desc}: example with key {key!r} has no score")
        yield beam.pvalue.TaggedOutput("kept" if decisions[key] else "dropped", record)
        yield beam.pvalue.TaggedOutput("keys", key)


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        scores = artifact_utils.get_single_instance(input_dict["scores"])
        out = artifact_utils.get_single_instance(output_dict["filtered_examples"])
        mode, value = exec_properties["mode"], float(exec_properties["value"])
        key_feature = exec_properties.get("key_feature") or "key"
        ex_splits = artifact_utils.decode_split_names(examples.split_names)
        sc_splits = scores_split_names(scores)
        missing = [s for s in sc_splits if s not in ex_splits]
        if missing:
            raise ValueError(f"InfluenceScores artifact {scores.uri} has scores for split(s) {missing} that the "
                             f"Examples artifact {examples.uri} does not have (it has {ex_splits})")
        if not sc_splits:
            raise ValueError(f"InfluenceScores artifact {scores.uri} has no splits")
        counts = {}
        plan = []
        for split in ex_splits:
            desc = f"Examples artifact {examples.uri}, split '{split}'"
            pattern = common.split_pattern(examples, split)
            dst = os.path.join(out.uri, f"Split-{split}")
            if split in sc_splits:
                sdesc = f"InfluenceScores artifact {scores.uri}, split '{split}'"
                try:
                    table = scores_io.read_scores(os.path.join(scores.uri, f"Split-{split}"))
                except (FileNotFoundError, ValueError) as err:
                    raise ValueError(f"{sdesc}: {err}") from None
                kept = scores_io.select_kept(table, mode, value)
                plan.append((split, desc, pattern, dst, {k: (k in kept) for k in table}))
            else:
                plan.append((split, desc, pattern, dst, None))
        tmp = self._get_tmp_dir()

        def build(p):
            for split, desc, pattern, dst, decisions in plan:
                records = (p | f"Read[{split}]" >> beam.io.ReadFromTFRecord(
                    pattern, coder=beam.coders.BytesCoder(),
                    compression_type=beam.io.filesystem.CompressionTypes.AUTO))
                if decisions is None:
                    _write(records, dst, f"Copy[{split}]")
                    _count(records, tmp, split, "in")
                    continue
                routed = records | f"Route[{split}]" >> beam.ParDo(_Route(key_feature, desc), decisions).with_outputs(
                    "kept", "dropped", "keys")
                _write(routed.kept, dst, f"Write[{split}]")
                _count(records, tmp, split, "in")
                _count(routed.kept, tmp, split, "kept")
                _count(routed.dropped, tmp, split, "dropped")
                _count(routed.keys | f"Distinct[{split}]" >> beam.Distinct(), tmp, split, "distinct_keys")
        common.run_beam(self, build, f"ScoreFilter on Examples artifact {examples.uri} and InfluenceScores "
                                     f"artifact {scores.uri}")
        total = {"in": 0, "kept": 0, "dropped": 0}
        for split, desc, _, _, decisions in plan:
            if decisions is None:
                n = _read_count(tmp, split, "in")
                c = {"in": n, "kept": n, "dropped": 0, "filtered": False, "distinct_keys": n}
            else:
                c = {k: _read_count(tmp, split, k) for k in ("in", "kept", "dropped", "distinct_keys")}
                c["filtered"] = True
                if c["distinct_keys"] != c["in"]:
                    raise ValueError(f"{desc}: {c['in'] - c['distinct_keys']} examples share a key; keys must be unique")
                if c["in"] != len(decisions):
                    raise ValueError(f"{desc}: {len(decisions) - c['in']} score(s) in the InfluenceScores artifact "
                                     f"{scores.uri} have no example ({len(decisions)} scores, {c['in']} examples)")
                if c["kept"] + c["dropped"] != c["in"]:
                    raise RuntimeError(f"{desc}: kept + dropped != in ({c})")
            c.pop("distinct_keys")
            counts[split] = c
            for k in total:
                total[k] += c[k]
        out.split_names = artifact_utils.encode_split_names(ex_splits)
        for prop in ("span", "version"):
            try:
                setattr(out, prop, getattr(examples, prop))
            except (AttributeError, KeyError):
                pass
        out.set_string_custom_property("filter_mode", mode)
        out.set_string_custom_property("filter_value", repr(value))
        out.set_string_custom_property("filter_counts", json.dumps(counts, sort_keys=True))
        for k, v in total.items():
            out.set_int_custom_property(f"num_{k}", int(v))


def _write(pcoll, dst, label):
    pcoll | label >> beam.io.WriteToTFRecord(  # noqa: B018 (Beam side effect)
        os.path.join(dst, _DATA), file_name_suffix=".gz",
        compression_type=beam.io.filesystem.CompressionTypes.GZIP)


def _count(pcoll, tmp, split, what):
    (pcoll | f"Count[{split},{what}]" >> beam.combiners.Count.Globally()
     | f"Save[{split},{what}]" >> beam.io.WriteToText(os.path.join(tmp, f"count-{split}-{what}"),
                                                       shard_name_template=""))


def _read_count(tmp, split, what) -> int:
    with tf.io.gfile.GFile(os.path.join(tmp, f"count-{split}-{what}")) as fh:
        return int(fh.read().strip() or 0)
