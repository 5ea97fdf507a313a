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

import collections
import dataclasses
import json
import math
import os

import apache_beam as beam
import tensorflow as tf
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tf_influence import scores_io, selection
from tfx_components import common
from tfx_components import component_specs as specs
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


@dataclasses.dataclass(frozen=True)
class _Options:
    """The filter's execution properties, read and checked once."""
    mode: str
    value: float
    key_feature: str | None       # the identity the scorer used
    max_exact: int
    epsilon: float

    @classmethod
    def read(cls, e: dict, scores) -> "_Options":
        mode, value = e[specs.MODE_KEY], float(e[specs.VALUE_KEY])
        key_feature = scores_key_feature(scores)
        asked = e.get(specs.KEY_FEATURE_KEY)
        if asked and asked != key_feature:
            raise ValueError(f"ScoreFilter(key_feature='{asked}') but the InfluenceScores artifact {scores.uri} is "
                             f"keyed by {repr(key_feature) if key_feature else 'file and position (no key feature)'}")
        epsilon = float(e.get(specs.QUANTILE_EPSILON_KEY) or QUANTILE_EPSILON)
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"quantile_epsilon must be in (0, 1), got {epsilon}")
        selection.check_mode(mode, value)
        return cls(mode, value, key_feature, int(e.get(specs.MAX_EXACT_BOUNDARY_KEY) or MAX_EXACT_BOUNDARY), epsilon)


@dataclasses.dataclass(frozen=True)
class _Split:
    """One split of the examples: where it is read, staged and written, and its scores' folder (``None``: not
    scored, copied as it is)."""
    name: str
    desc: str
    pattern: str
    dst: str
    scores_dir: str | None


def _splits(examples, scores, out) -> list:
    """Every split of ``examples`` (the scored ones checked to have score files); fails on scores of a split the
    examples do not have, or on no scored split at all."""
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
        sdir = os.path.join(scores.uri, f"Split-{split}") if split in sc_splits else None
        if sdir is not None and not tf.io.gfile.glob(os.path.join(sdir, scores_io.PATTERN)):
            raise ValueError(f"InfluenceScores artifact {scores.uri}, split '{split}': no score files "
                             f"({scores_io.PATTERN}) in {sdir}")
        plan.append(_Split(split, f"Examples artifact {examples.uri}, split '{split}'",
                           common.split_pattern(examples, split),   # names a split without files
                           os.path.join(out.uri, f"Split-{split}"), sdir))
    return plan


def _cuts(plan, scores, opts: _Options) -> dict:
    """``{split: (keep_first, side, k, n)}``: the order-statistics cut of each scored split, from how many scores
    it has (counted by streaming the files, nothing kept); none for ``drop_above``."""
    cuts = {}
    for sp in plan:
        if sp.scores_dir is None or opts.mode == "drop_above":
            continue
        desc = f"InfluenceScores artifact {scores.uri}, split '{sp.name}'"
        n = common.count_records(sorted(tf.io.gfile.glob(os.path.join(sp.scores_dir, scores_io.PATTERN))), desc)
        try:
            keep_first, q = selection.order_cut(opts.mode, opts.value, n)
        except ValueError as err:
            raise ValueError(f"{desc} ({n} scores): {err}") from None
        cuts[sp.name] = (keep_first, *selection.first_set_boundary(q, n), n)
    return cuts


def _build(p, plan, staged, cuts, opts: _Options, scores, tmp) -> None:
    """The Beam job: each scored split's boundary element from the smaller side of its cut, then every key decided
    alone; unscored splits copied; every count of the job written by one sink (each sink is several stages)."""
    from tfx_components.beam_scoring import ShardNames
    counted = []
    for sp in plan:
        if sp.scores_dir is None:
            records = _read(p, sp.pattern, f"Read[{sp.name}]")
            counted.append(_count(records, sp.name, "in"))
            _write(records, staged[sp.name], f"Copy[{sp.name}]")
            continue
        keyed = (p | f"Files[{sp.name}]" >> ShardNames(sp.pattern)
                 | f"Key[{sp.name}]" >> beam.ParDo(_KeyedRecords(opts.key_feature, sp.desc)))
        counted.append(_count(keyed, sp.name, "in"))
        sdesc = f"InfluenceScores artifact {scores.uri}, split '{sp.name}'"
        scored = (_read(p, os.path.join(sp.scores_dir, scores_io.PATTERN), f"ReadScores[{sp.name}]")
                  | f"DecodeScores[{sp.name}]" >> beam.ParDo(_Score(sdesc)))
        joined = {"examples": keyed, "scores": scored} | f"Join[{sp.name}]" >> beam.CoGroupByKey()
        keep_first, side, k, n = cuts.get(sp.name, (True, "smallest", 0, 0))
        args = [] if opts.mode == "drop_above" else [
            beam.pvalue.AsSingleton(_boundary(scored, side, k, sp.name, n, opts.max_exact, opts.epsilon))]
        routed = joined | f"Decide[{sp.name}]" >> beam.ParDo(
            _Decide(sp.desc, opts.mode, opts.value, keep_first, side), *args).with_outputs(
            "kept", "dropped", "orphans", "extra")
        _write(routed.kept, staged[sp.name], f"Write[{sp.name}]")
        for what in ("kept", "dropped", "orphans", "extra"):
            counted.append(_count(routed[what], sp.name, what))
    (counted | "Counts" >> beam.Flatten() | "Count" >> beam.combiners.Count.PerElement()
     | "Lines" >> beam.MapTuple(lambda key, n: json.dumps([*json.loads(key), int(n)]))
     | "SaveCounts" >> beam.io.WriteToText(os.path.join(tmp, COUNTS_FILE), shard_name_template=""))


def _checked_counts(plan, counted: dict, cuts: dict, opts: _Options, scores) -> dict:
    """``{split: {"in", "kept", "dropped", "filtered"[, "cut"]}}`` from the job's counts; fails on examples sharing
    a key, scores without an example, or kept + dropped ≠ in."""
    counts = {}
    for sp in plan:
        if sp.scores_dir is None:
            n = counted[sp.name, "in"]
            counts[sp.name] = {"in": n, "kept": n, "dropped": 0, "filtered": False}
            continue
        c = {k: counted[sp.name, k] for k in ("in", "kept", "dropped", "orphans", "extra")}
        if c["extra"]:
            raise ValueError(f"{sp.desc}: {c['extra']} examples share a key; keys must be unique")
        if c["orphans"]:
            raise ValueError(f"{sp.desc}: {c['orphans']} score(s) in the InfluenceScores artifact "
                             f"{scores.uri} have no example ({c['in']} examples)")
        if c["kept"] + c["dropped"] != c["in"]:
            raise RuntimeError(f"{sp.desc}: kept + dropped != in ({c})")
        c = {"in": c["in"], "kept": c["kept"], "dropped": c["dropped"], "filtered": True}
        if sp.name in cuts:
            method = cut_method(cuts[sp.name][2], opts.max_exact)
            c["cut"] = method if method == "exact" else f"approximate (quantile_epsilon={opts.epsilon:g})"
        counts[sp.name] = c
    return counts


def _record(out, examples, plan, opts: _Options, counts: dict) -> None:
    out.split_names = artifact_utils.encode_split_names([sp.name for sp in plan])
    for prop in ("span", "version"):
        try:
            setattr(out, prop, getattr(examples, prop))
        except (AttributeError, KeyError):
            pass
    out.set_string_custom_property("filter_mode", opts.mode)
    out.set_string_custom_property("filter_value", repr(opts.value))
    out.set_string_custom_property("filter_counts", json.dumps(counts, sort_keys=True))
    for k in ("in", "kept", "dropped"):
        out.set_int_custom_property(f"num_{k}", int(sum(c[k] for c in counts.values())))


class Executor(base_beam_executor.BaseBeamExecutor):
    """Plan the splits and cuts in the driver, decide every example in one Beam job, then move the finished files
    into the output and record the counts (module docstring)."""

    def Do(self, input_dict, output_dict, exec_properties):
        examples = artifact_utils.get_single_instance(input_dict[specs.EXAMPLES_KEY])
        scores = artifact_utils.get_single_instance(input_dict[specs.SCORES_KEY])
        out = artifact_utils.get_single_instance(output_dict[specs.FILTERED_EXAMPLES_KEY])
        opts = _Options.read(exec_properties, scores)
        plan = _splits(examples, scores, out)
        cuts = _cuts(plan, scores, opts)
        tmp = self._get_tmp_dir()
        # Beam writes each split under the execution's temporary folder (its beam-temp-* shards included) and the
        # finished files are moved into the output folder only after the whole job succeeded: a failed or killed
        # run leaves nothing in an output folder
        staged = {sp.name: os.path.join(tmp, "staged", f"Split-{sp.name}") for sp in plan}
        common.run_beam(self, lambda p: _build(p, plan, staged, cuts, opts, scores, tmp),
                        f"ScoreFilter on Examples artifact {examples.uri} and InfluenceScores artifact {scores.uri}",
                        output_dirs=[sp.dst for sp in plan])
        for sp in plan:
            _move_files(staged[sp.name], sp.dst)
        _record(out, examples, plan, opts, _checked_counts(plan, _read_counts(tmp), cuts, opts, scores))


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
    """Each element as the key ``'["split", "what"]'``: the job counts every stream's keys in one keyed combine (six
    ``Count.Globally`` per split, each with its default-injecting side input, had made the job several times
    larger); a stream with no elements has no line, and reads as 0 (:func:`_read_counts`)."""
    key = json.dumps([split, what])
    return pcoll | f"Tag[{split},{what}]" >> beam.Map(lambda _, k=key: k)


def _read_counts(tmp) -> dict:
    """``{(split, what): n}`` from the job's counts file; 0 for a stream that had no elements."""
    out = collections.defaultdict(int)
    with tf.io.gfile.GFile(os.path.join(tmp, COUNTS_FILE)) as fh:
        for line in fh:
            if line.strip():
                split, what, n = json.loads(line)
                out[split, what] = int(n)
    return out
