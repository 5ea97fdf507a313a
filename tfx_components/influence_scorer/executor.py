"""Executor of InfluenceScorer: test-side vector in the driver (library), per-example products in Beam.

With a ``pretrain_factors`` input (FactorFitter's KFACFactors) the pretraining Hessian is inverted
with those factors and the driver never loads the pretraining corpus."""

import dataclasses
import json
import os

from absl import logging

import numpy as np
import tensorflow as tf
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

import tf_influence as tfi
from tfx_components import beam_scoring, common
from tfx_components import component_specs as specs
from tfx_components.artifacts import set_scores_metadata


def _ds(x, y, batch=256):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def shared_layers(pre_model, ft_model, desc: str) -> list:
    """The embedding W when none is named: the layers with parameters that the finetuned model
    shares with the pretrained one — same name, same variable shapes (a finetuning model built on
    the pretrained one, as ``Trainer(base_model=...)`` does). Fails naming both models if there are none."""
    pre = {l.name: [tuple(w.shape) for w in l.weights] for l in pre_model.layers if l.weights}
    shared = [l.name for l in ft_model.layers
              if l.weights and pre.get(l.name) == [tuple(w.shape) for w in l.weights]]
    if not shared:
        raise ValueError(f"{desc}: the finetuned model shares no layer with parameters with the pretrained one "
                         f"(pretrained: {sorted(pre)}); name the embedding layers with embedding=[...]")
    return shared


def query_from_index(index_uri, splits, objective, ms, s, test_ds, test_keys, query, out_uri: str,
                     corpus=None):
    """Index mode of InfluenceScorer: the scores of every example of each split from the
    GradientIndex (``⟨P∇g(z), Ps⟩`` — the same ``s``, projected), and with ``query`` (a
    :class:`~tf_influence.index.QueryArgs`) the ``top_k`` harmful / helpful examples of every test
    point (``test_vectors(..., "each")``, one query each) in ``<out>/Split-<split>/top_k.json``.
    ``corpus(split)`` → ``(dataset, keys)`` of the indexed split, for ``query.rerank``. Returns the
    backend that answered the per-test queries (``None`` without ``query``)."""
    from dataclasses import replace

    from tf_influence import scores_io
    from tf_influence.index import GradientIndex, QueryArgs
    each, backend = None, None
    if query is not None:
        each, _, _ = ms.test_vectors(test_ds, "each")
        each = np.asarray(each)
    for split in splits:
        index = GradientIndex(os.path.join(index_uri, f"Split-{split}"))
        res = index.query(objective, np.asarray(s), QueryArgs(top_k=1, all_scores=True), vector_group=ms.WU)
        d = os.path.join(out_uri, f"Split-{split}")
        scores_io.write_scores(d, res.keys, res.scores[0].astype(np.float64))
        if each is not None:
            data = {}
            if query.rerank:
                data["dataset"], data["keys"] = corpus(split)
            top = index.query(objective, each, replace(query, all_scores=False), vector_group=ms.WU, **data)
            rows = [{"test_key": tk.decode(errors="replace"),
                     "harmful": [[k.decode(errors="replace"), float(v)] for k, v in zip(hk, hs)],
                     "helpful": [[k.decode(errors="replace"), float(v)] for k, v in zip(lk, ls)]}
                    for tk, hk, hs, lk, ls in zip(test_keys, top.harmful_keys, top.harmful_scores, top.helpful_keys,
                                                  top.helpful_scores)]
            with tf.io.gfile.GFile(os.path.join(d, "top_k.json"), "w") as fh:
                fh.write(json.dumps(rows, indent=1))
            backend = top.backend
    return backend


@dataclasses.dataclass
class _Inputs:
    """The artifacts and models of one execution, read once."""
    pre_ex: object
    ft_ex: object
    pre_m: object
    ft_m: object
    out: object
    pre_model: object
    ft_model: object
    pre_splits: list
    factors_uri: str | None
    index: object

    @classmethod
    def read(cls, input_dict, output_dict) -> "_Inputs":
        def one(key):
            return artifact_utils.get_single_instance(input_dict[key])
        pre_ex, pre_m, ft_m = one(specs.PRETRAIN_EXAMPLES_KEY), one(specs.PRETRAIN_MODEL_KEY), one(specs.FINETUNE_MODEL_KEY)
        factors = input_dict.get(specs.PRETRAIN_FACTORS_KEY) or []
        index = input_dict.get(specs.INDEX_KEY) or []
        return cls(pre_ex, one(specs.FINETUNE_EXAMPLES_KEY), pre_m, ft_m,
                   artifact_utils.get_single_instance(output_dict[specs.SCORES_KEY]),
                   beam_scoring.load_keras_model(common.model_path(pre_m)),
                   beam_scoring.load_keras_model(common.model_path(ft_m)),
                   artifact_utils.decode_split_names(pre_ex.split_names),
                   artifact_utils.get_single_instance(factors).uri if factors else None,
                   artifact_utils.get_single_instance(index) if index else None)

    @property
    def models_desc(self) -> str:
        return f"Model artifacts {self.pre_m.uri} / {self.ft_m.uri}"


def select_test_points(keys, x, y, wanted_json, desc: str):
    """The test points named by ``test_keys`` (JSON list), in that order; all of them without it."""
    if not wanted_json:
        return keys, x, y
    wanted = [k.encode() for k in json.loads(wanted_json)]
    position = {k: i for i, k in enumerate(keys)}
    absent = [k for k in wanted if k not in position]
    if absent:
        raise ValueError(f"{desc}: no test example with key(s) {absent[:5]}")
    sel = np.array([position[k] for k in wanted])
    return [keys[i] for i in sel], ({k: v[sel] for k, v in x.items()} if isinstance(x, dict) else x[sel]), y[sel]


def pretraining_hessian(run: _Inputs, spec, args, batch_size: int):
    """``(pretraining dataset the driver holds, pretraining solver, description)``: with a KFACFactors input the
    fitted (E)K-FAC curvature and one batch of the corpus (what the operator is checked against); else the
    Hessian subsample (at the positions the library's ``subsample`` draws) in memory, or every example streamed
    from the files with one batch held — never the corpus in the driver."""
    split = run.pre_splits[0]
    if run.factors_uri is None:
        n = args.hessian_samples
        if n is None:
            return common.stream_split(run.pre_ex, split, spec, batch_size), args.pretrain_solver, "every corpus example"
        data = _ds(*common.sample_split(run.pre_ex, split, spec, int(n), seed=args.seed))
        return data, args.pretrain_solver, f"corpus subsample of {int(n)} examples (seed {args.seed})"
    from tf_influence import kfac
    factors = kfac.KFACFactors.load(run.factors_uri)
    # the solver's kind is the factors'; the driver holds one batch: nothing to diagnose there
    solver = dataclasses.replace(args.pretrain_solver.with_factors(factors), curvature_iterations=0)
    if args.hessian_samples is not None:   # said, not silently dropped: the factors fix the curvature's sample
        logging.warning("InfluenceScorer: the pretraining Hessian is the KFACFactors artifact %s (fitted on %d "
                        "examples); influence_args.hessian_samples=%s applies to a Hessian built from the corpus "
                        "and is not used", run.factors_uri, factors.num_examples, args.hessian_samples)
    _, xp, yp = common.load_split(run.pre_ex, split, spec, limit=batch_size)
    return _ds(xp, yp), solver, f"KFACFactors {factors.kind} on {factors.num_examples} examples ({run.factors_uri})"


def test_vector(run: _Inputs, losses, pre_ds, finetune, test, embedding, args, pre_solver):
    """``(s, solves, ms)``: the library's test-side vector, its failures named by the artifacts involved."""
    try:
        ms = tfi.MultiStageInfluence(
            tfi.Objective(run.pre_model, losses[0]), pre_ds, tfi.Objective(run.ft_model, losses[1]), finetune,
            embedding=embedding,   # the driver's pretraining data is already the Hessian's sample (or one batch)
            args=dataclasses.replace(args, pretrain_solver=pre_solver, hessian_samples=None))
        s, solves, _ = ms.test_vectors(test, "sum")
        return s, solves, ms
    except tfi.ParameterGroupError as err:
        what = run.models_desc + (f" with KFACFactors artifact {run.factors_uri}" if run.factors_uri else "")
        raise ValueError(f"{what}: {err}") from None
    except (tfi.DatasetError, tfi.NonFiniteError) as err:  # e.g. labels outside the models' classes
        raise ValueError(f"InfluenceScorer on Examples artifacts {run.pre_ex.uri} (pretraining) / {run.ft_ex.uri} "
                         f"(finetuning, test): {err}") from None
    except tf.errors.OpError as err:  # streamed pretraining split: a corrupt shard, a misshaped record
        raise ValueError(f"InfluenceScorer: Examples artifact {run.pre_ex.uri}, split '{run.pre_splits[0]}': "
                         f"{type(err).__name__}: {err.message.splitlines()[0]}") from None


class Executor(base_beam_executor.BaseBeamExecutor):
    """Reads the artifacts once, computes the test-side vector in the driver (the library), then scores every
    pretraining example — by a Beam pass, or by queries of a GradientIndex input — and records how."""

    def Do(self, input_dict, output_dict, exec_properties):
        e, run = exec_properties, _Inputs.read(input_dict, output_dict)
        embedding = json.loads(e.get(specs.EMBEDDING_KEY) or "null")
        if embedding is None:
            embedding = shared_layers(run.pre_model, run.ft_model, run.models_desc)
        losses = [beam_scoring.resolve_loss(m, e.get(specs.LOSS_KEY)) for m in (run.pre_model, run.ft_model)]
        spec = common.feature_spec(e, input_dict, run.pre_model, run.pre_ex, run.pre_splits[0])
        ft_spec = common.feature_spec(e, input_dict, run.ft_model, run.ft_ex, e[specs.FINETUNE_TRAIN_SPLIT_KEY])
        _, xf, yf = common.load_split(run.ft_ex, e[specs.FINETUNE_TRAIN_SPLIT_KEY], ft_spec)
        tkeys, xt, yt = select_test_points(*common.load_split(run.ft_ex, e[specs.TEST_SPLIT_KEY], ft_spec),
                                           e.get(specs.TEST_KEYS_KEY),
                                           f"Examples artifact {run.ft_ex.uri}, split '{e[specs.TEST_SPLIT_KEY]}'")
        args = tfi.InfluenceArgs.from_json(e[specs.INFLUENCE_ARGS_KEY])
        batch = specs.batch_size(e)
        pre_ds, pre_solver, hessian_desc = pretraining_hessian(run, spec, args, batch)
        s, solves, ms = test_vector(run, losses, pre_ds, _ds(xf, yf), _ds(xt, yt), embedding, args, pre_solver)
        group_spec = ms.WU.spec(run.pre_model).to_json()   # the workers rebuild the same (W, U) from it
        query = None
        if e.get(specs.QUERY_ARGS_KEY):
            from tf_influence.index import QueryArgs
            query = QueryArgs.from_json(e[specs.QUERY_ARGS_KEY])
        if run.index is not None:
            spec = self._score_by_index(run, spec, ms, s, _ds(xt, yt), tkeys, query, losses[0], batch)
        elif query is not None:
            raise ValueError("InfluenceScorer: query_args is set but there is no index input")
        else:
            self._score_by_beam(run, spec, e.get(specs.LOSS_KEY), group_spec, s, batch)
        _record(run.out, run.pre_splits, spec, args, e, embedding, hessian_desc, solves, len(yt), group_spec,
                {"pretrain": pre_solver.damping, "finetune": args.finetune_solver.damping})

    def _score_by_index(self, run, spec, ms, s, test, tkeys, query, pre_loss, batch) -> dict:
        """The corpus pass replaced by queries of the GradientIndex input (projected gradients)."""
        uri = run.index.uri
        indexed = run.index.get_string_custom_property("feature_spec")
        spec = {**spec, "key": json.loads(indexed).get("key") if indexed else spec["key"]}

        def corpus(split):   # rerank: the split streamed, and its keys in the same order
            return (common.stream_split(run.pre_ex, split, spec, batch),
                    common.split_keys(run.pre_ex, split, spec["key"]))
        backend = query_from_index(uri, run.pre_splits, tfi.Objective(run.pre_model, pre_loss), ms, s, test,
                                   tkeys, query, run.out.uri, corpus=corpus)
        run.out.set_string_custom_property("scored_by", f"GradientIndex {uri}")
        if query is not None:
            run.out.set_string_custom_property(specs.QUERY_ARGS_KEY, query.to_json())
            run.out.set_string_custom_property("index_backend", backend)
        return spec

    def _score_by_beam(self, run, spec, loss_config, group_spec, s, batch) -> None:
        """A Beam pass over every pretraining example: ``⟨∇g(z), s⟩`` per example, in the workers."""
        def build(p):
            for split in run.pre_splits:
                beam_scoring.score_examples(
                    p, common.split_pattern(run.pre_ex, split), common.model_path(run.pre_m), spec, "influence",
                    os.path.join(run.out.uri, f"Split-{split}"), loss_config=loss_config, group_spec=group_spec,
                    vector=s.numpy(), batch_size=batch, label=f"[{split}]",
                    temp_dir=os.path.join(self._get_tmp_dir(), "scores", split))
        common.run_beam(self, build, f"InfluenceScorer on Examples artifact {run.pre_ex.uri} with Model artifact "
                                     f"{run.pre_m.uri}",
                        output_dirs=[os.path.join(run.out.uri, f"Split-{sp}") for sp in run.pre_splits])
        run.out.set_string_custom_property("scored_by", "a pass over every pretraining example (Beam)")


def _record(out, splits, spec, args, e, embedding, hessian_desc, solves, num_test, group_spec, dampings) -> None:
    """The output artifact's properties: what was scored, with what, and a summary of each split's scores."""
    set_scores_metadata(out, splits, f"multi_stage_{args.case}", key_feature=spec["key"])
    props = {"feature_spec": json.dumps(spec, sort_keys=True), specs.EMBEDDING_KEY: json.dumps(embedding),
             specs.INFLUENCE_ARGS_KEY: e[specs.INFLUENCE_ARGS_KEY], "pretrain_hessian": hessian_desc,
             "solves": json.dumps(solves, sort_keys=True, default=float), "num_test_points": str(num_test),
             "group_spec": group_spec, "dampings": json.dumps(dampings)}
    for k, v in props.items():
        out.set_string_custom_property(k, v)
    common.record_summary(out, {sp: common.summarize(os.path.join(out.uri, f"Split-{sp}")) for sp in splits})
