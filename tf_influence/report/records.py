"""Reports from files: score shards (:mod:`tf_influence.scores_io`, what the scorers and the Beam jobs write)
and the TFRecord examples they score, matched by key — what ``python -m tf_influence.report`` and the
``InfluenceReport`` TFX component build. Examples are read as raw ``tf.train.Example`` features (every
feature, no model needed) and only the shown ones are kept."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from ..errors import require_finite
from .. import scores_io
from ..configs import JsonConfig
from . import Report
from .renderers import ImageRenderer, TableRenderer, TextRenderer

RENDERERS = ("image", "text", "table")


@dataclass(frozen=True)
class ReportArgs(JsonConfig):
    """How a report from files draws its examples (one set of options for the CLI and the component)."""

    renderer: str = field(default="table", metadata={"choices": RENDERERS,
                                                     "help": "how an example is drawn: image, text or table"})
    feature: str | None = field(default=None, metadata={
        "help": "the feature drawn as an image / text (None: 'image' / 'token_ids'); a table shows every feature"})
    image_shape: list[int] | None = field(default=None, metadata={"help": "image shape, e.g. 8 8"})
    vocabulary: str | None = field(default=None, metadata={
        "help": "text: a file with one token per line (None: the embedded corpus' characters)"})
    label_feature: str | None = field(default=None, metadata={"help": "the feature shown as the label"})
    class_names: list[str] | None = field(default=None, metadata={"help": "names of the label's classes"})
    top_k: int = field(default=8, metadata={"help": "examples shown at each end of the ranking"})
    drop_mode: str | None = field(default=None, metadata={
        "help": "a ScoreFilter mode (drop_top_fraction, drop_above, keep_lowest, keep_highest): mark what it drops"})
    drop_value: float | None = field(default=None, metadata={"help": "the ScoreFilter value of drop_mode"})
    title: str | None = field(default=None, metadata={"help": "the page's title"})

    def __post_init__(self):
        if self.renderer not in RENDERERS:
            raise ValueError(f"ReportArgs.renderer must be one of {RENDERERS}, got '{self.renderer}'")
        if (self.drop_mode is None) != (self.drop_value is None):
            raise ValueError("ReportArgs: give drop_mode and drop_value together")
        if int(self.top_k) < 1:
            raise ValueError(f"ReportArgs.top_k must be ≥ 1, got {self.top_k}")

    def make_renderer(self):
        if self.renderer == "image":
            return ImageRenderer(shape=self.image_shape, feature=self.feature or "image", class_names=self.class_names)
        if self.renderer == "text":
            return TextRenderer(vocabulary=self.vocabulary, feature=self.feature or "token_ids")
        return TableRenderer(class_names=self.class_names)


def example_features(record: bytes, skip=()) -> dict:
    """A serialized ``tf.train.Example``'s features as numpy (one value: a scalar), by name, ``skip`` left out."""
    out = {}
    for name, feat in sorted(tf.train.Example.FromString(record).features.feature.items()):
        if name in skip:
            continue
        kind = feat.WhichOneof("kind")
        vals = list(getattr(feat, kind).value) if kind else []
        out[name] = np.asarray(vals, {"float_list": np.float32, "int64_list": np.int64}.get(kind, object))
        if out[name].size == 1:
            out[name] = out[name].reshape(())
    return out


def keyed_examples(files, key_feature: str | None, wanted, desc: str = "examples") -> dict:
    """``{key: features}`` of the examples whose key is in ``wanted``, read file by file (keys as the
    scorers give them: the ``key_feature``, or file and position); raises naming the missing keys."""
    from tfx_components.example_io import keyed_batches
    wanted, out = set(wanted), {}
    for f in files:
        for keys, records in keyed_batches(f, key_feature, desc):
            for k, r in zip(keys, records):
                if k in wanted:
                    out[k] = example_features(r)
        if len(out) == len(wanted):
            break
    missing = sorted(wanted - set(out))
    if missing:
        raise KeyError(f"{desc}: no example with key(s) {missing[:5]} (are these the examples that were scored?)")
    return out


def report_from_files(scores_dir: str, example_files, args: ReportArgs | None = None, key_feature: str | None = None,
                      kind: str = "influence", desc: str = "examples") -> Report:
    """A :class:`Report` of the scores in ``scores_dir`` over the TFRecord ``example_files``: the score
    histogram with what ``drop_mode`` / ``drop_value`` drops, and the ``top_k`` examples at each end
    (``kind="self_influence"``: the highest only, the first a filter drops)."""
    args = args or ReportArgs()
    files = sorted(tf.io.gfile.glob(example_files) if isinstance(example_files, str) else example_files)
    if not files:
        raise FileNotFoundError(f"no example files match {example_files!r}")
    table = scores_io.read_scores(scores_dir)
    keys = sorted(table)
    s = np.asarray([table[k] for k in keys], np.float64)
    require_finite(s, f"scores in {scores_dir}", keys)
    threshold = dropped = None
    if args.drop_mode is not None:
        kept = scores_io.select_kept(table, args.drop_mode, args.drop_value)
        dropped = len(keys) - len(kept)
        threshold = max(table[k] for k in kept) if dropped and kept else None
    k = min(int(args.top_k), len(keys))
    high = list(np.argsort(-s, kind="stable")[:k])
    low = [] if kind == "self_influence" else list(np.argsort(s, kind="stable")[:k])
    shown = keyed_examples(files, key_feature, {keys[i] for i in high + low}, desc)
    skip = {key_feature} if key_feature else set()

    def lookup(indices):
        out = {}
        for i in indices:
            feats = dict(shown[keys[int(i)]])
            y = feats.pop(args.label_feature, None) if args.label_feature else None
            out[int(i)] = ({n: v for n, v in feats.items() if n not in skip}, y)
        return out

    title = args.title or f"{'Self-influence' if kind == 'self_influence' else 'Influence'} scores of {len(s):,} examples"
    rep = Report(title, renderer=args.make_renderer(), subtitle=f"scores: {scores_dir}")
    rep.add_self_influence(s, lookup if kind == "self_influence" else None, threshold=threshold, keys=keys,
                           top_k=k if kind == "self_influence" else 0,
                           title="Scores" + (f" and what {args.drop_mode}={args.drop_value:g} drops"
                                             if args.drop_mode else ""),
                           xlabel="self-influence" if kind == "self_influence" else "influence score",
                           dropped=dropped)
    if kind != "self_influence":
        rep.add_ranked(s, lookup, keys=keys, top_k=k, title=f"The {k} highest and lowest scores")
    return rep


def write_report(out: str, scores_dir: str, example_files, args: ReportArgs | None = None, **kwargs) -> str:
    path = report_from_files(scores_dir, example_files, args, **kwargs).write(out)
    with open(os.path.join(os.path.dirname(path), "report_args.json"), "w") as fh:
        json.dump((args or ReportArgs()).to_dict(), fh, indent=1)
    return path
