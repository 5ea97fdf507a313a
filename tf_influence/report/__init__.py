"""A report of the evidence: the influential pretraining examples of each test point, rendered as a person
reads them, in one self-contained HTML page.

Built from what the library already produces — an :class:`~tf_influence.influence.InfluenceResult`
(single- or multi-stage, one column per test point), a gradient-index
:class:`~tf_influence.index.QueryResult`, self-influence scores — plus the datasets they came from and a
renderer (:mod:`tf_influence.report.renderers`: text with per-token highlights, image thumbnails, feature
tables). The page opens from disk: no server, no internet (plots and thumbnails are inline PNGs).

>>> import numpy as np, tensorflow as tf
>>> from tf_influence.report import Report, TableRenderer
>>> train = tf.data.Dataset.from_tensor_slices((np.eye(4, 3, dtype="float32"), np.arange(4))).batch(2)
>>> rep = Report("Self-influence of four rows", renderer=TableRenderer(["a", "b", "c"]))
>>> rep.add_self_influence(np.array([0.1, 3.0, 0.2, 0.4]), train, threshold=1.0, top_k=2)
>>> "dropped 1 of 4" in rep.html()
True

Per-token attribution for language models (:func:`tf_influence.lm.token_scores`): pass the pretraining
``Objective`` as ``token_objective`` to :meth:`Report.add_influence` and each shown sequence's tokens are
coloured by their share of its score (the shares sum to the score).
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import tensorflow as tf

from . import page
from .renderers import PRINTABLE_ASCII, ImageRenderer, TableRenderer, TextRenderer, renderer_for


def examples_at(dataset, indices, model=None, name: str = "dataset") -> dict:
    """``{index: (x, y)}`` (numpy, one example each) of the examples at ``indices`` of a batched dataset,
    in one pass over it (dataset order: the order of the scores)."""
    if callable(dataset) and not isinstance(dataset, tf.data.Dataset):   # a lookup of its own (records.py)
        return dataset(sorted({int(i) for i in indices}))
    from ..objective import batches
    want = sorted({int(i) for i in indices})
    out, pos, j = {}, 0, 0
    for x, y in batches(dataset, name, model):
        n = int(tf.shape(tf.nest.flatten(y)[0])[0])
        while j < len(want) and want[j] < pos + n:
            r = want[j] - pos
            out[want[j]] = (tf.nest.map_structure(lambda t: np.asarray(t[r]), x),
                            tf.nest.map_structure(lambda t: np.asarray(t[r]), y))
            j += 1
        pos += n
        if j == len(want):
            break
    missing = [i for i in want if i not in out]
    if missing:
        raise IndexError(f"{name} has {pos} examples; asked for example(s) {missing[:5]}")
    return out


def _stack(examples: list):
    """A batch (``tf.data`` of one batch of 8s) of ``[(x, y), …]``."""
    xs = tf.nest.map_structure(lambda *t: np.stack(t), *[e[0] for e in examples])
    ys = tf.nest.map_structure(lambda *t: np.stack(t), *[e[1] for e in examples])
    return tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8)


def _key(keys, i) -> str:
    if keys is None:
        return f"#{i}"
    k = keys[i]
    return k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)


class Report:
    """Sections added one by one, written as one HTML file.

    ``renderer``: how pretraining examples are drawn (default: chosen from the first example,
    :func:`~tf_influence.report.renderers.renderer_for`); ``test_renderer``: the test points (default: the
    same kind as ``renderer``).
    """

    def __init__(self, title: str = "Influential pretraining examples", renderer=None, test_renderer=None,
                 subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.renderer, self.test_renderer = renderer, test_renderer
        self.sections: list[str] = []
        self.summary: dict = {"test_points": 0, "examples": 0, "sections": []}

    # -- helpers -------------------------------------------------------------------------------------
    def _renderers(self, sample_x, renderer, test_renderer):
        r = renderer or self.renderer or renderer_for(sample_x)
        return r, test_renderer or self.test_renderer or r

    def _example(self, r, x, y, cls: str, head: str, highlights=None) -> str:
        self.summary["examples"] += 1
        lab = r.label(y)
        lab = f' · label <b>{lab}</b>' if lab else ""
        return (f'<div class="example {cls} kind-{getattr(r, "kind", "other")}"><div class="score">{page.esc(head)}'
                f'{lab}</div>{r.html(x, y, highlights)}</div>')

    # -- sections ------------------------------------------------------------------------------------
    def add_influence(self, result, train, test=None, model=None, measurement=None, loss=None, top_k: int = 5,
                      token_objective=None, keys=None, renderer=None, test_renderer=None,
                      title: str | None = None, test_names=None, completion_terms=None) -> dict:
        """One section per test point (a column of ``result.scores``; a ``test_target="sum"`` result is one
        point: the summed test loss) with its ``top_k`` harmful and helpful pretraining examples of ``train``.

        ``test``: the test points' dataset (one example per column); with ``model`` (the finetuned model)
        each test point shows the model's prediction and its loss (or ``measurement``: a per-example
        ``fn(y_true, y_pred)``, e.g. :func:`~tf_influence.lm.completion_log_probability`; ``loss``: the
        model's loss when it was not compiled with one). ``token_objective``:
        the pretraining :class:`~tf_influence.objective.Objective` of a language model — the shown
        sequences' tokens are coloured by their per-token terms (:func:`~tf_influence.lm.token_scores`,
        which sum to the score; needs ``result.group``, or ``result.group_spec`` and the objective's model).
        ``keys``: the pretraining examples' keys, shown instead of positions. ``completion_terms``: per test
        point ``j``, an ``[m, T]`` array — each pretraining example's score split over the test sequence's
        positions (:func:`~tf_influence.lm.split_completion`) — drawn under each shown example as the test
        text with the completion tokens coloured by what they owe to it. Returns what was shown:
        ``{"columns": [{"harmful": [...], "helpful": [...], "token_sums": [...]}]}``.
        """
        scores = np.asarray(result.scores, np.float64)
        cols = scores[:, None] if scores.ndim == 1 else scores
        m, k = cols.shape
        top_k = min(int(top_k), m)
        picks = [(np.argsort(-cols[:, j], kind="stable")[:top_k], np.argsort(cols[:, j], kind="stable")[:top_k])
                 for j in range(k)]
        shown = examples_at(train, {int(i) for h, l in picks for i in (*h, *l)}, name="pretraining data")
        r, tr = self._renderers(next(iter(shown.values()))[0], renderer, test_renderer)
        tests = {}
        measured = None
        if test is not None:
            if scores.ndim == 2:           # one test point per column
                tests = examples_at(test, range(k), name="test data")
            if model is not None:
                measured = self._measure(model, test, measurement, loss)
        group = getattr(result, "group", None)
        if token_objective is not None and group is None and getattr(result, "group_spec", None) is not None:
            from ..params import ParameterGroup
            group = ParameterGroup.from_spec(token_objective.model, result.group_spec)
        if token_objective is not None:
            vector = np.asarray(result.test_vector)
            vector = vector.reshape(vector.shape[0], -1)
        out = {"columns": []}
        heading = title or f"Influence: {page.esc(result.method)} on {m:,} pretraining examples"
        higher_is_better = _higher_is_better(measurement)
        blocks = [f"<h2>{page.esc(heading)}</h2>", page.LEGEND_GAIN if higher_is_better else page.LEGEND,
                  self._diagnostics(result)]
        colours = ("#36c", "#d33") if higher_is_better else ("#d33", "#36c")
        for j, (harm, help_) in enumerate(picks):
            token = {}
            if token_objective is not None:
                from ..lm import token_scores
                idx = [int(i) for i in (*harm, *help_)]
                ts = token_scores(token_objective, _stack([shown[i] for i in idx]), group, vector[:, j],
                                  name="shown pretraining examples")
                token = dict(zip(idx, ts))
            name = (test_names[j] if test_names is not None else
                    f"test point {j}" if scores.ndim == 2 else "all test points (summed test loss)")
            body = [f'<section class="test-point" data-column="{j}"><h3>{page.esc(name)}</h3>']
            if j in tests:
                x, y = tests[j]
                line = []
                lab = tr.label(y)
                if lab:
                    line.append(f"label <b>{lab}</b>")
                if measured is not None:
                    pred, value, what = measured
                    if pred is not None:
                        line.append(f"prediction <b>{page.esc(tr.label(pred[j]) or pred[j])}</b>")
                    line.append(f"{page.esc(what)} <b>{value[j]:.4g}</b>")
                body.append(f'<div class="example test"><div class="score">{" · ".join(line)}</div>'
                            f'{tr.html(x, y)}</div>')
            body.append(f'<img class="plot" alt="score distribution" src="'
                        f'{page.score_histogram(cols[:, j], harm, help_, "scores of every pretraining example", colours=colours)}">')
            body.append('<div class="cols">')
            # a loss: the highest scores are harmful (removal lowers it); a measurement to raise (a
            # log-probability): the highest scores support it (removal lowers it), drawn as helpful, and the
            # token colours flipped to match (red: against the measurement)
            sides = ((("supporting", "helpful", harm), ("opposing", "harmful", help_)) if higher_is_better
                     else (("harmful", "harmful", harm), ("helpful", "helpful", help_)))
            for label, cls, idx in sides:
                body.append(f'<div class="col"><h3>top {len(idx)} {label}</h3>')
                for i in idx:
                    head = f"{_key(keys, int(i))} · score {cols[i, j]:+.4g}"
                    x, y = shown[int(i)]
                    w = token.get(int(i))
                    card = self._example(r, x, y, cls, head, None if w is None else (-w if higher_is_better else w))
                    if completion_terms is not None and j in tests:
                        c = np.asarray(completion_terms[j][int(i)], np.float64)
                        card = card[:-len("</div>")] + (
                            '<div class="completion"><span class="score">the test completion, each token by its '
                            f'share:</span>{tr.html(tests[j][0], tests[j][1], -c if higher_is_better else c)}'
                            '</div></div>')
                    body.append(card)
                body.append("</div>")
            body.append("</div></section>")
            blocks.append("".join(body))
            out["columns"].append({"harmful": [int(i) for i in harm], "helpful": [int(i) for i in help_],
                                   "token_sums": {int(i): float(np.sum(v)) for i, v in token.items()}})
            self.summary["test_points"] += 1
        self.sections.append("".join(blocks))
        self.summary["sections"].append("influence")
        return out

    def add_ranked(self, scores, train, keys=None, top_k: int = 8, title: str | None = None, renderer=None,
                   name: str = "every example, ranked") -> dict:
        """The ``top_k`` highest and lowest of plain ``scores`` (one per example of ``train``: a dataset, or
        a function ``indices -> {index: (x, y)}``) — e.g. scores read back from a scorer's files."""
        from types import SimpleNamespace
        res = SimpleNamespace(scores=np.asarray(scores, np.float64).reshape(-1), method="scores", solves={},
                              test_vector=None, group=None)
        return self.add_influence(res, train, top_k=top_k, keys=keys, renderer=renderer, title=title,
                                  test_names=[name])

    def add_query(self, query, train, keys, test=None, renderer=None, test_renderer=None, title: str | None = None,
                  test_names=None) -> None:
        """A gradient-index :class:`~tf_influence.index.QueryResult`: per query row its top harmful and
        helpful keys, looked up in ``train`` whose ``keys`` (one per example, dataset order) name them."""
        lookup = {(_k.decode() if isinstance(_k, bytes) else str(_k)): i for i, _k in enumerate(keys)}

        def pos(kk):
            kk = kk.decode() if isinstance(kk, bytes) else str(kk)
            if kk not in lookup:
                raise KeyError(f"index key {kk!r} is not among the {len(lookup)} keys of the given data "
                               "(is it the data the index was built from?)")
            return lookup[kk]
        hk, hs = np.atleast_2d(query.harmful_keys), np.atleast_2d(query.harmful_scores)
        lk, ls = np.atleast_2d(query.helpful_keys), np.atleast_2d(query.helpful_scores)
        need = {pos(kk) for row in (*hk, *lk) for kk in row}
        shown = examples_at(train, need, name="indexed data")
        r, tr = self._renderers(next(iter(shown.values()))[0], renderer, test_renderer)
        tests = examples_at(test, range(hk.shape[0]), name="test data") if test is not None else {}
        blocks = [f"<h2>{page.esc(title or f'Gradient-index query ({query.backend})')}</h2>", page.LEGEND]
        for q in range(hk.shape[0]):
            name = test_names[q] if test_names is not None else f"query {q}"
            body = [f'<section class="test-point" data-column="{q}"><h3>{page.esc(name)}</h3>']
            if q in tests:
                body.append(f'<div class="example test">{tr.html(*tests[q])}</div>')
            body.append('<div class="cols">')
            for cls, ks, ss in (("harmful", hk[q], hs[q]), ("helpful", lk[q], ls[q])):
                body.append(f'<div class="col"><h3>top {len(ks)} {cls}</h3>')
                for kk, sc in zip(ks, ss):
                    x, y = shown[pos(kk)]
                    body.append(self._example(r, x, y, cls, f"{_key([kk], 0)} · score {float(sc):+.4g}"))
                body.append("</div>")
            body.append("</div></section>")
            blocks.append("".join(body))
            self.summary["test_points"] += 1
        self.sections.append("".join(blocks))
        self.summary["sections"].append("query")

    def add_self_influence(self, scores, train=None, threshold=None, keys=None, top_k: int = 10, renderer=None,
                           title: str | None = None, xlabel: str = "self-influence", dropped: int | None = None) -> None:
        """Self-influence scores: their histogram with the filter's ``threshold`` (examples above it are
        the ones a :class:`ScoreFilter` / PRESENCE-Sequential drops; ``dropped``: its count when known) and the
        ``top_k`` highest examples."""
        s = np.asarray(scores, np.float64).reshape(-1)
        if dropped is None and threshold is not None:     # else: the filter's own count (ties decided by key)
            dropped = int(np.sum(s > threshold))
        head = [f"<h2>{page.esc(title or 'Self-influence')}</h2><section class='self-influence'>"]
        line = f"{len(s):,} examples; median {np.median(s):.4g}, max {s.max():.4g}"
        if threshold is not None:
            line += f"; threshold {threshold:.4g}: dropped {dropped:,} of {len(s):,}"
        head.append(f"<p>{page.esc(line)}</p>")
        head.append(f'<img class="plot" alt="self-influence histogram" src="{page.threshold_histogram(s, threshold, xlabel=xlabel)}">')
        if train is not None and top_k:
            idx = np.argsort(-s, kind="stable")[:min(int(top_k), len(s))]
            shown = examples_at(train, idx, name="scored data")
            r, _ = self._renderers(next(iter(shown.values()))[0], renderer, None)
            head.append(f"<h3>the {len(idx)} highest (the first to be dropped)</h3>")
            for i in idx:
                cls = "harmful" if threshold is not None and s[i] > threshold else "kept"
                head.append(self._example(r, *shown[int(i)], cls, f"{_key(keys, int(i))} · self-influence {s[i]:.4g}"))
        head.append("</section>")
        self.sections.append("".join(head))
        self.summary["sections"].append("self_influence")

    def add_figure(self, title: str, figure, caption: str = "") -> None:
        """A matplotlib figure (or a ``data:`` URI) with a caption."""
        src = figure if isinstance(figure, str) else page.figure_png(figure)
        cap = f"<p>{page.esc(caption)}</p>" if caption else ""
        self.sections.append(f'<h2>{page.esc(title)}</h2><section class="figure"><img class="plot" alt="'
                             f'{page.esc(title)}" src="{src}">{cap}</section>')
        self.summary["sections"].append("figure")

    def add_table(self, title: str, rows: list, caption: str = "") -> None:
        """A table of ``rows`` (dicts with the same keys)."""
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f"<th>{page.esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{page.esc(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                       for r in rows)
        cap = f"<p>{page.esc(caption)}</p>" if caption else ""
        self.sections.append(f'<h2>{page.esc(title)}</h2><section class="table"><table class="diag">'
                             f"<tr>{head}</tr>{body}</table>{cap}</section>")
        self.summary["sections"].append("table")

    # -- pieces --------------------------------------------------------------------------------------
    @staticmethod
    def _measure(model, test, measurement, loss=None):
        """``(predictions or None, values, what)`` of the test points."""
        from ..objective import Objective, batches
        if measurement is None:
            obj, what = Objective(model, loss, include_model_losses=False), "test loss"
        else:
            obj = Objective(model, measurement, include_model_losses=False)
            what = getattr(measurement, "__name__", "measurement").replace("_", " ")
        preds, values = [], []
        for x, y in batches(test, "test data", model):
            out = model(x, training=False)
            values.append(obj.loss_fn(y, out).numpy().reshape(len(out), -1).mean(axis=1))
            o = np.asarray(out)
            preds.append(o.argmax(-1) if o.ndim == 2 and o.shape[-1] > 1 else None)
        pred = None if any(p is None for p in preds) else np.concatenate(preds)
        return pred, np.concatenate(values), what

    @staticmethod
    def _diagnostics(result) -> str:
        solves = getattr(result, "solves", None) or {}
        if not solves:
            return ""
        rows = []
        for name, d in solves.items():
            auto = d.get("auto") or {}
            why = auto.get("why", "") if isinstance(auto, dict) else str(auto)
            conv = d.get("converged")
            curvature = d.get("curvature") if isinstance(d.get("curvature"), dict) else {}
            warn = d.get("warnings") or curvature.get("warnings")
            rows.append(f"<tr><td>{page.esc(name)}</td><td>{page.esc(d.get('method', '?'))}</td>"
                        f"<td>{page.esc(why)}</td><td>{'' if conv is None else ('yes' if conv else 'NO')}</td>"
                        f"<td>{page.esc(d.get('iterations', ''))}</td>"
                        f"<td class='warn'>{page.esc('; '.join(map(str, warn)) if warn else '')}</td></tr>")
        return ('<section class="diagnostics"><h3>solver diagnostics</h3><table class="diag"><tr><th>solve</th>'
                '<th>method</th><th>why</th><th>converged</th><th>iterations</th><th>warnings</th></tr>'
                + "".join(rows) + "</table></section>")

    def html(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        sub = (self.subtitle + " · " if self.subtitle else "") + f"written {stamp} by tf_influence.report"
        return page.document(self.title, "".join(self.sections), sub)

    def write(self, path: str) -> str:
        """Write the page (``path`` ending in ``.html``, or a directory: ``index.html`` in it) and a
        ``summary.json`` beside it (test points and examples shown); returns the page's path."""
        if not path.endswith(".html"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "index.html")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.html())
        os.replace(tmp, path)
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "summary.json"), "w") as fh:
            json.dump(self.summary, fh, indent=1)
        return path


def _higher_is_better(measurement) -> bool:
    """A measurement to raise rather than a loss (:func:`tf_influence.influence.higher_is_better`)."""
    from ..influence import higher_is_better
    return higher_is_better(measurement)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


__all__ = ["Report", "examples_at", "TextRenderer", "ImageRenderer", "TableRenderer", "renderer_for",
           "PRINTABLE_ASCII"]
