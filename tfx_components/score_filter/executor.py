"""Beam executor of ScoreFilter (all scoring math and selection lives in ``tf_influence``).

Bounded memory at corpus scale: no process holds the scores or the examples. The driver counts
each split's scores by streaming their files (nothing kept). For the order-statistics modes (``drop_top_fraction``, ``keep_lowest``,
``keep_highest``) the library turns the mode into one cut of the ascending ``(score, key)`` order
(:func:`tf_influence.selection.order_cut`); the Beam job finds the cut's boundary element with an
**exact** top-k over the smaller side of the cut (``beam.combiners.Top``: each worker holds at most
``min(kept, dropped)`` ``(score, key)`` pairs, ≈ 100 bytes each — 10⁷ scores at a 10 % cut ≈ 100 MB),
joins examples and scores by key (``CoGroupByKey``) and decides every key alone with the boundary
as a side input — the same examples as :func:`tf_influence.selection.select_kept` on the whole
table. ``drop_above`` needs no global step.

When the smaller side is larger than ``max_exact_boundary`` pairs (default 10⁶, ≈ 100 MB in one
worker), the boundary comes from Beam's ``ApproximateQuantilesCombineFn`` instead (``1/ε + 1``
quantiles of the ``(score, key)`` order, ``ε = quantile_epsilon``, default 10⁻⁴; its memory is
``O((1/ε)·log²(εn))`` pairs): the element nearest the cut's rank. Beam's bound — each returned
quantile's rank is within ``ε·n`` of the exact one — plus the ``n/(2/ε)`` rounding to the nearest
quantile bounds how far the cut moves: the number of kept examples differs from the exact rule's
by at most ``1.5·ε·n`` (e.g. ±15,000 of 10⁸), every example is still decided by one boundary
element, and ``filter_counts`` records the method and the actual counts.
"""

import json
import math
import os

import apache_beam as beam
import tensorflow as tf
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tf_influence import scores_io, selection
from tfx_components import common
from tfx_components.artifacts import scores_key_feature, scores_split_names

_DATA = "data_tfrecord"


class _KeyedRecords(beam.DoFn):
    """One examples file → its ``(key, record)`` pairs, read in order: the key feature, or — without
    one — the file-and-position identity the scorers gave it (``example_io.record_key``). Fails naming
    the file on a missing key feature or a corrupt file."""

    def __init__(self, key_feature, artifact_desc):
        self.key_feature, self.desc = key_feature, artifact_desc

    def process(self, path):
        from tfx_components.example_io import keyed_batches
        for keys, records in keyed_batches(path, self.key_feature, f"{self.desc}, file {path}"):
            yield from zip(keys, records)


class _Score(beam.DoFn):
    """Score record → ``(key, score)``; fails naming the artifact on a NaN/Inf score."""

    def __init__(self, artifact_desc):
        self.desc = artifact_desc

    def process(self, record):
        key, score, _ = scores_io.decode_score(record)
        if not math.isfinite(score):
            raise ValueError(f"{self.desc}: the score of key {key!r} is {score}; cannot select")
        yield key, float(score)


class _Decide(beam.DoFn):
    """One key's examples and scores → the examples tagged 'kept' / 'dropped' by the library's rule,
    plus 'orphans' (scores without an example) and 'extra' (examples sharing a key) for the
    driver's checks; fails on an example without a score or a key scored twice."""

    def __init__(self, artifact_desc, mode, value, keep_first, side):
        self.desc, self.mode, self.value, self.keep_first, self.side = artifact_desc, mode, value, keep_first, side

    def process(self, item, boundary=None):
        key, grouped = item
        records, scores = list(grouped["examples"]), list(grouped["scores"])
        if not records:
            yield beam.pvalue.TaggedOutput("orphans", key)
            return
        if not scores:
            raise ValueError(f"{self.desc}: example with key {key!r} has no score")
        if len(scores) > 1:
            raise ValueError(f"{self.desc}: duplicate score for key {key!r}")
        if self.mode == "drop_above":
            keep = scores[0] <= self.value
        else:
            keep = selection.kept_by_cut(scores[0], key, self.keep_first, self.side, boundary)
        for _ in records[1:]:
            yield beam.pvalue.TaggedOutput("extra", key)
        for r in records:
            yield beam.pvalue.TaggedOutput("kept" if keep else "dropped", r)


MAX_EXACT_BOUNDARY = 1_000_000
QUANTILE_EPSILON = 1e-4


def cut_method(k: int, max_exact: int) -> str:
    """``"exact"`` (top-k) when the smaller side has at most ``max_exact`` pairs, else ``"approximate"``."""
    return "exact" if k <= max_exact else "approximate"


def _nearest_quantile(quantiles, rank: int, n: int):
    """The returned quantile nearest ascending ``rank`` (0-based) of ``n``: quantile ``i`` of
    ``len - 1`` intervals sits at rank ``i·(n − 1)/(len − 1)``."""
    q = len(quantiles) - 1
    return quantiles[int(round(rank * q / max(1, n - 1)))]


def _boundary(scores, side, k, label, n=None, max_exact=MAX_EXACT_BOUNDARY, epsilon=QUANTILE_EPSILON):
    """The cut's boundary element as a one-element PCollection (``None`` when ``k == 0``): the largest
    of the ``k`` smallest or the smallest of the ``k`` largest ``(score, key)`` pairs — exact by a
    top-k, or (``k > max_exact``) the nearest of Beam's approximate quantiles (module docstring)."""
    pairs = scores | f"Pairs[{label}]" >> beam.MapTuple(lambda key, score: (score, key))
    if k == 0:
        return pairs.pipeline | f"NoBoundary[{label}]" >> beam.Create([None])
    if cut_method(k, max_exact) == "approximate":
        from apache_beam.transforms.stats import ApproximateQuantilesCombineFn
        num = int(math.ceil(1.0 / epsilon)) + 1
        fn = ApproximateQuantilesCombineFn.create(num, epsilon=epsilon, max_num_elements=max(int(n), 2))
        rank = k - 1 if side == "smallest" else n - k
        return (pairs | f"Quantiles[{label}]" >> beam.CombineGlobally(fn)
                | f"Boundary[{label}]" >> beam.Map(_nearest_quantile, rank, n))
    top = beam.combiners.Top.Smallest(k) if side == "smallest" else beam.combiners.Top.Largest(k)
    pick = max if side == "smallest" else min
    return pairs | f"Top[{label}]" >> top | f"Boundary[{label}]" >> beam.Map(pick)


def _read(p, pattern, label):
    return p | label >> beam.io.ReadFromTFRecord(pattern, coder=beam.coders.BytesCoder(),
                                                 compression_type=beam.io.filesystem.CompressionTypes.AUTO)


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        scores = artifact_utils.get_single_instance(input_dict["scores"])
        out = artifact_utils.get_single_instance(output_dict["filtered_examples"])
        mode, value = exec_properties["mode"], float(exec_properties["value"])
        key_feature = scores_key_feature(scores)   # the identity the scorer used
        if exec_properties.get("key_feature") and exec_properties["key_feature"] != key_feature:
            raise ValueError(f"ScoreFilter(key_feature='{exec_properties['key_feature']}') but the InfluenceScores "
                             f"artifact {scores.uri} is keyed by "
                             f"{repr(key_feature) if key_feature else 'file and position (no key feature)'}")
        max_exact = int(exec_properties.get("max_exact_boundary") or MAX_EXACT_BOUNDARY)
        epsilon = float(exec_properties.get("quantile_epsilon") or QUANTILE_EPSILON)
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"quantile_epsilon must be in (0, 1), got {epsilon}")
        selection.check_mode(mode, value)
        ex_splits = artifact_utils.decode_split_names(examples.split_names)
        sc_splits = scores_split_names(scores)
        missing = [s for s in sc_splits if s not in ex_splits]
        if missing:
            raise ValueError(f"InfluenceScores artifact {scores.uri} has scores for split(s) {missing} that the "
                             f"Examples artifact {examples.uri} does not have (it has {ex_splits})")
        if not sc_splits:
            raise ValueError(f"InfluenceScores artifact {scores.uri} has no splits")
        plan = []
        for split in ex_splits:
            desc = f"Examples artifact {examples.uri}, split '{split}'"
            pattern = common.split_pattern(examples, split)  # names a split without files
            sdir = os.path.join(scores.uri, f"Split-{split}") if split in sc_splits else None
            if sdir is not None and not tf.io.gfile.glob(os.path.join(sdir, scores_io.PATTERN)):
                raise ValueError(f"InfluenceScores artifact {scores.uri}, split '{split}': no score files "
                                 f"({scores_io.PATTERN}) in {sdir}")
            plan.append((split, desc, pattern, os.path.join(out.uri, f"Split-{split}"), sdir))
        tmp = self._get_tmp_dir()
        # Beam writes each split under the execution's temporary folder (its beam-temp-* shards
        # included) and the finished files are moved into the output folder only after the whole job
        # succeeded: a failed or killed run leaves nothing in an output folder
        staged = {split: os.path.join(tmp, "staged", f"Split-{split}") for split, *_ in plan}

        # how many scores each split has (the order-statistics cut needs n): streamed, nothing kept
        cuts = {}
        for split, _, _, _, sdir in plan:
            if sdir is None or mode == "drop_above":
                continue
            n = common.count_records(sorted(tf.io.gfile.glob(os.path.join(sdir, scores_io.PATTERN))),
                                     f"InfluenceScores artifact {scores.uri}, split '{split}'")
            try:
                keep_first, q = selection.order_cut(mode, value, n)
            except ValueError as err:
                raise ValueError(f"InfluenceScores artifact {scores.uri}, split '{split}' ({n} scores): "
                                 f"{err}") from None
            cuts[split] = (keep_first, *selection.first_set_boundary(q, n), n)

        # Beam: the boundary element from the smaller side, then every key decided alone
        def build(p):
            counted = []   # every count of the job, written by one sink (each sink is several stages)
            for split, desc, pattern, dst, sdir in plan:
                if sdir is None:
                    records = _read(p, pattern, f"Read[{split}]")
                    counted.append(_count(records, split, "in"))
                    _write(records, staged[split], f"Copy[{split}]")
                    continue
                from tfx_components.beam_scoring import ShardNames
                keyed = (p | f"Files[{split}]" >> ShardNames(pattern)
                         | f"Key[{split}]" >> beam.ParDo(_KeyedRecords(key_feature, desc)))
                counted.append(_count(keyed, split, "in"))
                sdesc = f"InfluenceScores artifact {scores.uri}, split '{split}'"
                scored = (_read(p, os.path.join(sdir, scores_io.PATTERN), f"ReadScores[{split}]")
                          | f"DecodeScores[{split}]" >> beam.ParDo(_Score(sdesc)))
                joined = {"examples": keyed, "scores": scored} | f"Join[{split}]" >> beam.CoGroupByKey()
                keep_first, side, k, n = cuts.get(split, (True, "smallest", 0, 0))
                args = [] if mode == "drop_above" else [
                    beam.pvalue.AsSingleton(_boundary(scored, side, k, split, n, max_exact, epsilon))]
                routed = joined | f"Decide[{split}]" >> beam.ParDo(
                    _Decide(desc, mode, value, keep_first, side), *args).with_outputs(
                    "kept", "dropped", "orphans", "extra")
                _write(routed.kept, staged[split], f"Write[{split}]")
                for what in ("kept", "dropped", "orphans", "extra"):
                    counted.append(_count(routed[what], split, what))
            (counted | "Counts" >> beam.Flatten()
             | "SaveCounts" >> beam.io.WriteToText(os.path.join(tmp, COUNTS_FILE), shard_name_template=""))
        common.run_beam(self, build, f"ScoreFilter on Examples artifact {examples.uri} and InfluenceScores "
                                     f"artifact {scores.uri}", output_dirs=[odir for _, _, _, odir, _ in plan])
        for split, _, _, dst, _ in plan:
            _move_files(staged[split], dst)
        counts = {}
        total = {"in": 0, "kept": 0, "dropped": 0}
        counted = _read_counts(tmp)
        for split, desc, _, _, sdir in plan:
            if sdir is None:
                n = counted[split, "in"]
                c = {"in": n, "kept": n, "dropped": 0, "filtered": False}
            else:
                c = {k: counted[split, k] for k in ("in", "kept", "dropped", "orphans", "extra")}
                if c["extra"]:
                    raise ValueError(f"{desc}: {c['extra']} examples share a key; keys must be unique")
                if c["orphans"]:
                    raise ValueError(f"{desc}: {c['orphans']} score(s) in the InfluenceScores artifact "
                                     f"{scores.uri} have no example ({c['in']} examples)")
                if c["kept"] + c["dropped"] != c["in"]:
                    raise RuntimeError(f"{desc}: kept + dropped != in ({c})")
                c = {"in": c["in"], "kept": c["kept"], "dropped": c["dropped"], "filtered": True}
                if split in cuts:
                    method = cut_method(cuts[split][2], max_exact)
                    c["cut"] = method if method == "exact" else f"approximate (quantile_epsilon={epsilon:g})"
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


def _move_files(src: str, dst: str) -> None:
    """Move the finished data files of ``src`` into ``dst`` (created)."""
    tf.io.gfile.makedirs(dst)
    for path in tf.io.gfile.glob(os.path.join(src, f"{_DATA}*")):
        tf.io.gfile.rename(path, os.path.join(dst, os.path.basename(path)), overwrite=True)


COUNTS_FILE = "counts.jsonl"


def _count(pcoll, split, what):
    """One JSON line ``[split, what, n]`` (``Count.Globally`` gives 0 for an empty collection)."""
    return (pcoll | f"Count[{split},{what}]" >> beam.combiners.Count.Globally()
            | f"Line[{split},{what}]" >> beam.Map(lambda n, s=split, w=what: json.dumps([s, w, int(n)])))


def _read_counts(tmp) -> dict:
    """``{(split, what): n}`` from the job's counts file."""
    out = {}
    with tf.io.gfile.GFile(os.path.join(tmp, COUNTS_FILE)) as fh:
        for line in fh:
            if line.strip():
                split, what, n = json.loads(line)
                out[split, what] = int(n)
    return out
