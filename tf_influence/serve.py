"""A page to ask questions of a gradient index: type a prompt and a completion (a language model) and see the
indexed examples that push the completion's probability up or down, drawn as text with the tokens that
carry each score highlighted.

    python -m tf_influence.serve --index DIR --model model.keras --data 'corpus/*.tfrecord.gz' \\
        [--key-feature key] [--vocabulary tokens.txt | --tokenizer PRESET_DIR] [--host 127.0.0.1] [--port 8765]

``--index``: a :class:`~tf_influence.index.GradientIndex` built from ``--model`` (refused, on the page, if
the weights differ); ``--data``: the indexed examples (TFRecords, keyed as the index is: ``--key-feature``,
or file and position) — they are held as serialized records, parsed when shown. The test vector of a
query is ``∇_θ log p(completion | prompt)`` over the index's parameters (single-stage, identity
Hessian — the raw gradient, preconditioned as ``--precondition`` says), so a positive score means
training on the example lowers the completion's probability ("harmful", the library's convention:
removing it is predicted to lower the completion's loss). The highlighted tokens are each shown example's
exact per-token terms of ``∇l(z) · q`` (:func:`tf_influence.lm.token_scores`, unprojected).

With ``--result DIR`` (a saved :class:`~tf_influence.influence.InfluenceResult`, e.g. multi-stage, whose test
vectors already hold both inverse Hessians) the page also lists its test points; picking one queries the
index with that column, placed on the index's parameters (``GET /point?j=…``).

The server is Flask's (a well-kept WSGI framework) on loopback by default, threaded, with the model's
computations serialized by a lock; ``GET /`` is the page, ``GET /query?prompt=…&completion=…`` answers on
the page, ``GET /api/query`` the same as JSON. Bad input (empty, unknown characters, too long, another
model) is answered with a message (HTTP 400) and the server keeps serving.
"""

from __future__ import annotations

import argparse
import html
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .console import quiet_for_cli


class QueryError(ValueError):
    """A question the page cannot answer, with the message the page shows."""


@dataclass(frozen=True)
class ServeArgs:
    """The server's options (the command's flags)."""

    index: str = field(metadata={"help": "the gradient index's directory"})
    model: str = field(metadata={"help": "the model the index was built from (.keras)"})
    data: str = field(metadata={"help": "TFRecord file pattern of the indexed examples"})
    key_feature: str | None = field(default=None, metadata={
        "help": "the examples' key feature (None: keys are file and position, as the index builders give them)"})
    vocabulary: str | None = field(default=None, metadata={
        "help": "a file with one token per line (id = line number); None: the embedded corpus' characters"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "a keras-hub tokenizer preset directory (Tokenizer.save_to_preset), instead of --vocabulary"})
    feature: str = field(default="token_ids", metadata={"help": "the examples' token-id feature"})
    top_k: int = field(default=5, metadata={"help": "examples shown per side"})
    precondition: str = field(default="none", metadata={
        "choices": ("none", "diagonal"), "help": "the index query's preconditioner (QueryArgs.precondition)"})
    highlights: bool = field(default=True, metadata={"help": "per-token highlights of the shown examples"})
    result: str | None = field(default=None, metadata={
        "help": "a saved InfluenceResult (InfluenceResult.save / Analyzer): its test points (the columns of its "
                "test vector — multi-stage ones hold both inverse Hessians) can be picked on the page"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (loopback by default)"})
    port: int = field(default=8765, metadata={"help": "port"})


class Tokens:
    """Text ↔ token ids: the embedded corpus' characters (id 0 padding), a vocabulary file matched greedily,
    longest token first, or a keras-hub tokenizer (a preset directory)."""

    def __init__(self, vocabulary: str | None = None, tokenizer: str | None = None):
        from .report.renderers import PRINTABLE_ASCII
        self.tokenizer = None
        if tokenizer is not None:
            if vocabulary is not None:
                raise ValueError("give --tokenizer or --vocabulary, not both")
            import keras_hub
            self.tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(tokenizer)
            return
        if vocabulary is None:
            self.tokens = [""] + PRINTABLE_ASCII
        else:
            with open(vocabulary, encoding="utf-8") as fh:
                self.tokens = [line.rstrip("\n") for line in fh]
        self.ids = {t: i for i, t in enumerate(self.tokens) if t}
        self.longest = max(len(t) for t in self.ids)

    def encode(self, text: str, what: str) -> list:
        if self.tokenizer is not None:
            return [int(t) for t in np.asarray(self.tokenizer(text)).reshape(-1)]
        out, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                if text[i:i + n] in self.ids:
                    out.append(self.ids[text[i:i + n]])
                    i += n
                    break
            else:
                raise QueryError(f"the {what} has a character the model's vocabulary does not have: {text[i]!r} "
                                 f"(position {i})")
        return out


class IndexService:
    """The model, the index and the corpus, loaded once; :meth:`ask` answers one question."""

    def __init__(self, args: ServeArgs):
        import tensorflow as tf

        from . import Objective
        from .index import GradientIndex
        from .lm import CausalLMLoss, completion_log_probability
        from .report import TextRenderer
        from tfx_components.example_io import keyed_batches, load_keras_model
        self.args = args
        self.model = load_keras_model(args.model)
        self.index = GradientIndex(args.index)
        self.objective = Objective(self.model, CausalLMLoss(), include_model_losses=False)
        self.measure = Objective(self.model, completion_log_probability(), include_model_losses=False)
        from .compiled import function
        self._log_probability = function(lambda x, y: self.measure.per_example_losses(x, y), reduce_retracing=True)
        self.tokens = Tokens(args.vocabulary, args.tokenizer)
        self.renderer = (TextRenderer(tokenizer=self.tokens.tokenizer, feature=args.feature)
                         if self.tokens.tokenizer is not None else
                         TextRenderer(vocabulary=self.tokens.tokens, feature=args.feature))
        self.lock = threading.Lock()
        self.length = self._length()
        files = sorted(tf.io.gfile.glob(args.data))
        if not files:
            raise FileNotFoundError(f"--data {args.data!r} matches no file")
        self.records = {}
        for f in files:
            for keys, recs in keyed_batches(f, args.key_feature, f"--data file {f}"):
                self.records.update(zip(keys, recs))
        if len(self.records) != self.index.count:
            raise ValueError(f"--data has {len(self.records):,} examples, the index {self.index.count:,}: "
                             "not the indexed corpus")
        self.mismatch = None
        try:
            self.projector = self.index.projector(self.objective)
        except ValueError as err:            # another model: said on the page for every question
            self.mismatch = str(err)
        self.result = self.result_group = None
        if args.result:
            from .influence import InfluenceResult
            from .params import ParameterGroup
            self.result = InfluenceResult.load(args.result)
            if self.result.group_spec is None:
                raise ValueError(f"--result {args.result}: the saved result has no group spec (its test vector "
                                 "cannot be placed on the model's parameters)")
            self.result_group = ParameterGroup.from_spec(self.model, self.result.group_spec.to_json())
            v = np.asarray(self.result.test_vector)
            self.points = v.reshape(v.shape[0], -1)

    def _length(self):
        """The longest sequence the model reads: its inputs' length, or its backbone's
        ``max_sequence_length`` (keras-hub models take ``(None, None)`` inputs), or None."""
        shapes = [tuple(t.shape) for t in self.model.inputs]
        if shapes and len(shapes[0]) > 1 and shapes[0][1] is not None:
            return int(shapes[0][1])
        n = getattr(getattr(self.model, "backbone", None), "max_sequence_length", None)
        return int(n) if n else None

    def _inputs(self, ids: np.ndarray, mask: np.ndarray):
        names = [t.name.split(":")[0] for t in self.model.inputs]
        if len(self.model.inputs) > 1 or "token_ids" in names:
            return {"token_ids": ids, "padding_mask": mask}
        return ids

    def encode(self, prompt: str, completion: str):
        """``(x, y, prompt_length)`` of one test sequence: the completion's positions labelled, the rest not."""
        from .lm import causal_lm_examples
        if not completion.strip():
            raise QueryError("the completion is empty: type the text whose probability you ask about")
        p, c = self.tokens.encode(prompt, "prompt"), self.tokens.encode(completion, "completion")
        n = len(p) + len(c)
        if not p:
            raise QueryError("the prompt is empty: the completion is predicted from at least one token")
        if self.length is not None and n > self.length:
            raise QueryError(f"prompt and completion are {n} tokens; the model reads at most {self.length}")
        width = self.length or n
        ids = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, :n] = p + c
        mask[0, :n] = 1
        x, y = causal_lm_examples(ids, mask, prompt_lengths=[len(p)])
        return self._inputs(x["token_ids"], x["padding_mask"]), y, len(p)

    def _query_args(self):
        from .index import QueryArgs
        return QueryArgs(top_k=self.args.top_k, precondition=self.args.precondition)

    def ask_point(self, j) -> dict:
        """The saved result's test point ``j``: its test vector (a column of ``--result``) queried as it is."""
        if self.result is None:
            raise QueryError("no saved result: start the server with --result DIR to pick its test points")
        try:
            j = int(j)
        except (TypeError, ValueError):
            raise QueryError(f"test point {j!r} is not a number") from None
        if not 0 <= j < self.points.shape[1]:
            raise QueryError(f"test point {j} does not exist: the saved result has {self.points.shape[1]} "
                             f"(0 … {self.points.shape[1] - 1})")
        if self.mismatch:
            raise QueryError(self.mismatch)
        t0 = time.perf_counter()
        with self.lock:
            res = self.index.query(self.objective, self.points[:, j], self._query_args(),
                                   vector_group=self.result_group)
            out = self._shown(res, self.result_group, self.points[:, j])
        out["seconds"] = time.perf_counter() - t0
        out["test_point"] = j
        return out

    def _shown(self, res, group, vector) -> dict:
        """The query's examples of both sides with their per-token terms along ``vector`` (over ``group``)."""
        import tensorflow as tf

        from .lm import token_scores
        out = {}
        sides = {side: (getattr(res, f"{side}_keys")[0], getattr(res, f"{side}_scores")[0])
                 for side in ("harmful", "helpful")}
        feats = {side: [self._example(k) for k in keys] for side, (keys, _) in sides.items()}
        shown = feats["harmful"] + feats["helpful"]
        terms = [None] * len(shown)
        if self.args.highlights and shown:          # both sides' highlights in one forward-mode pass
            ds = tf.data.Dataset.from_tensor_slices(self._batch(shown)).batch(len(shown))
            terms = token_scores(self.objective, ds, group, vector)
        at = 0
        for side, (keys, scores) in sides.items():
            out[side] = [(k.decode() if isinstance(k, bytes) else str(k), float(s), f, t)
                         for k, s, f, t in zip(keys, scores, feats[side], terms[at:at + len(keys)])]
            at += len(keys)
        return out

    def ask(self, prompt: str, completion: str) -> dict:
        """``{"harmful": [(key, score, features, per-token terms)], "helpful": …, "log_probability", "seconds"}``."""
        import tensorflow as tf

        from .gradients import GradientKernels
        if self.mismatch:
            raise QueryError(self.mismatch)
        t0 = time.perf_counter()
        x, y, _ = self.encode(prompt, completion)
        with self.lock:
            group = self.projector.group
            y = tf.constant(y)
            q = GradientKernels.get(self.measure, group).sum_grad(x, y).numpy()
            logp = float(self._log_probability(x, y).numpy()[0])
            res = self.index.query(self.objective, q, self._query_args())
            out = {"log_probability": logp, **self._shown(res, group, q)}
        out["seconds"] = time.perf_counter() - t0
        return out

    def _example(self, key):
        from .report.records import example_features
        return example_features(self.records[key])

    def _batch(self, feats):
        from .lm import causal_lm_examples
        ids = np.stack([np.asarray(f[self.args.feature]).reshape(-1) for f in feats]).astype(np.int32)
        mask = (np.stack([np.asarray(f["padding_mask"]).reshape(-1) for f in feats]) if "padding_mask" in feats[0]
                else (ids != 0)).astype(np.int32)
        x, y = causal_lm_examples(ids, mask)
        return self._inputs(x["token_ids"], x["padding_mask"]), y


def _form(prompt: str = "", completion: str = "") -> str:
    return ('<form class="query" action="query" method="get"><label>prompt<br><textarea name="prompt" rows="2" '
            f'id="prompt">{html.escape(prompt)}</textarea></label><br><label>completion<br><textarea name="completion" '
            f'rows="2" id="completion">{html.escape(completion)}</textarea></label><br>'
            '<button type="submit" id="ask">ask the index</button></form>')


def create_app(service: IndexService):
    """The Flask application of one :class:`IndexService`."""
    from flask import Flask, jsonify, request

    from .report import page
    app = Flask("tf_influence.serve")
    title = "Ask the gradient index"
    sub = (f"{service.index.count:,} indexed examples, dimension {service.index.dim:,}; model "
           f"{service.args.model}")

    def points_form():
        if service.result is None:
            return ""
        n = service.points.shape[1]
        opts = "".join(f'<option value="{j}">test point {j}</option>' for j in range(n))
        return (f'<form class="query" action="point" method="get"><label>or a test point of the saved result '
                f'({html.escape(service.result.method)}, {n} point{"s" if n > 1 else ""}) <select name="j" '
                f'id="point">{opts}</select></label> <button type="submit" id="ask-point">ask</button></form>')

    def answer_html(prompt, completion, res):
        what = (f'test point {res["test_point"]} of the saved result' if "test_point" in res else
                f'log p(completion | prompt) = {res["log_probability"]:.4f}')
        parts = [_form(prompt, completion), points_form(), page.LEGEND,
                 f'<p class="meta">{what} · answered in '
                 f'{res["seconds"]:.2f} s</p><section class="test-point"><div class="cols">']
        for side in ("harmful", "helpful"):
            parts.append(f'<div class="col"><h3>top {len(res[side])} {side}</h3>')
            for key, score, feats, terms in res[side]:
                parts.append(f'<div class="example {side} kind-text"><div class="score">{html.escape(key)} · score '
                             f'{score:+.4g}</div>{service.renderer.html(feats, None, terms)}</div>')
            parts.append("</div>")
        parts.append("</div></section>")
        return "".join(parts)

    def error_html(prompt, completion, message):
        return f'{_form(prompt, completion)}{points_form()}<p class="error" id="error">{html.escape(message)}</p>'

    @app.get("/")
    def index():
        return page.document(title, _form() + points_form(), sub)

    @app.get("/point")
    def point():
        try:
            res = service.ask_point(request.args.get("j"))
        except QueryError as err:
            return page.document(title, error_html("", "", str(err)), sub), 400
        return page.document(title, answer_html("", "", res), sub)

    def _ask():
        prompt = request.args.get("prompt", "")
        completion = request.args.get("completion", "")
        try:
            return prompt, completion, service.ask(prompt, completion), None
        except QueryError as err:
            return prompt, completion, None, str(err)
        except Exception as err:   # noqa: BLE001 — said on the page; the server keeps serving
            app.logger.exception("query failed")
            return prompt, completion, None, f"the query failed: {type(err).__name__}: {str(err)[:300]}"

    @app.get("/query")
    def query():
        prompt, completion, res, err = _ask()
        if err:
            return page.document(title, error_html(prompt, completion, err), sub), 400
        return page.document(title, answer_html(prompt, completion, res), sub)

    @app.get("/api/query")
    def api_query():
        _, _, res, err = _ask()
        if err:
            return jsonify({"error": err}), 400
        return jsonify({"log_probability": res["log_probability"], "seconds": res["seconds"],
                        **{side: [{"key": k, "score": s, "token_terms": None if t is None else np.asarray(t).tolist()}
                                  for k, s, _, t in res[side]] for side in ("harmful", "helpful")}})

    return app


def main(argv=None):
    quiet_for_cli(argv)
    from .cli import add_arguments, from_args
    ap = argparse.ArgumentParser(prog="python -m tf_influence.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, ServeArgs)
    ap.add_argument("--verbose", action="store_true", help="show library logs")
    args = from_args(ServeArgs, ap.parse_args(argv), parser=ap)
    service = IndexService(args)
    if service.mismatch:
        print(f"warning: {service.mismatch}", file=sys.stderr)
    print(f"serving {service.index.count:,} examples on http://{args.host}:{args.port}/", flush=True)
    create_app(service).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main(sys.argv[1:])
