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


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        pre_ex = artifact_utils.get_single_instance(input_dict["pretrain_examples"])
        ft_ex = artifact_utils.get_single_instance(input_dict["finetune_examples"])
        pre_m = artifact_utils.get_single_instance(input_dict["pretrain_model"])
        ft_m = artifact_utils.get_single_instance(input_dict["finetune_model"])
        out = artifact_utils.get_single_instance(output_dict["scores"])
        e = exec_properties
        pre_model = beam_scoring.load_keras_model(common.model_path(pre_m))
        ft_model = beam_scoring.load_keras_model(common.model_path(ft_m))
        embedding = json.loads(e.get("embedding") or "null")
        if embedding is None:
            embedding = shared_layers(pre_model, ft_model, f"Model artifacts {pre_m.uri} / {ft_m.uri}")
        pre_loss = beam_scoring.resolve_loss(pre_model, e.get("loss"))
        ft_loss = beam_scoring.resolve_loss(ft_model, e.get("loss"))
        pre_splits = artifact_utils.decode_split_names(pre_ex.split_names)
        spec = common.feature_spec(e, input_dict, pre_model, pre_ex, pre_splits[0])          # pretraining examples
        ft_spec = common.feature_spec(e, input_dict, ft_model, ft_ex, e["finetune_train_split"])  # finetuning ones
        # driver side: the data the two Hessians and the test gradient need
        _, xf, yf = common.load_split(ft_ex, e["finetune_train_split"], ft_spec)
        tkeys, xt, yt = common.load_split(ft_ex, e["test_split"], ft_spec)
        if e.get("test_keys"):
            wanted = [k.encode() for k in json.loads(e["test_keys"])]
            index = {k: i for i, k in enumerate(tkeys)}
            absent = [k for k in wanted if k not in index]
            if absent:
                raise ValueError(f"Examples artifact {ft_ex.uri}, split '{e['test_split']}': no test example with "
                                 f"key(s) {absent[:5]}")
            sel = np.array([index[k] for k in wanted])
            tkeys = [tkeys[i] for i in sel]
            xt = {k: v[sel] for k, v in xt.items()} if isinstance(xt, dict) else xt[sel]
            yt = yt[sel]
        tkeys_sel = tkeys
        args = tfi.InfluenceArgs.from_json(e["influence_args"])
        pre_solver, ft_solver = args.pretrain_solver, args.finetune_solver
        factors_art = input_dict.get("pretrain_factors") or []
        hessian_samples = args.hessian_samples
        if factors_art:
            # the pretraining Hessian is the fitted (E)K-FAC curvature: the driver reads no pretraining
            # corpus, only one batch of it to build the operator the factors are checked against
            from tf_influence import kfac
            factors_uri = artifact_utils.get_single_instance(factors_art).uri
            factors = kfac.KFACFactors.load(factors_uri)
            # the solver's kind is the factors'; the driver holds one batch: nothing to diagnose there
            pre_solver = dataclasses.replace(pre_solver.with_factors(factors), curvature_iterations=0)
            if hessian_samples is not None:   # said, not silently dropped: the factors fix the curvature's sample
                logging.warning("InfluenceScorer: the pretraining Hessian is the KFACFactors artifact %s (fitted on "
                                "%d examples); influence_args.hessian_samples=%s applies to a Hessian built from "
                                "the corpus and is not used", factors_uri, factors.num_examples, hessian_samples)
            pretrain_hessian = f"KFACFactors {factors.kind} on {factors.num_examples} examples ({factors_uri})"
            _, xp, yp = common.load_split(pre_ex, pre_splits[0], spec, limit=int(e.get("batch_size") or 256))
            pre_ds = _ds(xp, yp)
        else:
            # never the corpus in the driver: the Hessian subsample (at the positions the library's
            # `subsample` draws) in memory, or — all examples — streamed from the files, one batch held
            bs = int(e.get("batch_size") or 256)
            pre_ds = (_ds(*common.sample_split(pre_ex, pre_splits[0], spec, int(hessian_samples), seed=args.seed))
                      if hessian_samples is not None else common.stream_split(pre_ex, pre_splits[0], spec, bs))
            pretrain_hessian = (f"corpus subsample of {int(hessian_samples)} examples (seed {args.seed})"
                                if hessian_samples is not None else "every corpus example")
        try:
            ms = tfi.MultiStageInfluence(
                tfi.Objective(pre_model, pre_loss), pre_ds, tfi.Objective(ft_model, ft_loss), _ds(xf, yf),
                embedding=embedding, args=args, pretrain_solver=pre_solver, hessian_samples=None)
            s, solves, seconds = ms.test_vectors(_ds(xt, yt), "sum")
        except tfi.ParameterGroupError as err:
            what = f"Model artifacts {pre_m.uri} / {ft_m.uri}"
            if factors_art:
                what += f" with KFACFactors artifact {factors_uri}"
            raise ValueError(f"{what}: {err}") from None
        except (tfi.DatasetError, tfi.NonFiniteError) as err:  # e.g. labels outside the models' classes
            raise ValueError(f"InfluenceScorer on Examples artifacts {pre_ex.uri} (pretraining) / {ft_ex.uri} "
                             f"(finetuning, test): {err}") from None
        except tf.errors.OpError as err:  # streamed pretraining split: a corrupt shard, a misshaped record
            raise ValueError(f"InfluenceScorer: Examples artifact {pre_ex.uri}, split '{pre_splits[0]}': "
                             f"{type(err).__name__}: {err.message.splitlines()[0]}") from None
        # the per-example products run in the workers over the same (W, U), rebuilt from its spec
        group_spec = ms.WU.spec(pre_model).to_json()

        index_art = input_dict.get("index") or []
        query = None
        if e.get("query_args"):
            from tf_influence.index import QueryArgs
            query = QueryArgs.from_json(e["query_args"])
        if index_art:
            # the corpus pass is replaced by queries against the GradientIndex (projected gradients)
            index_uri = artifact_utils.get_single_instance(index_art).uri
            indexed_spec = artifact_utils.get_single_instance(index_art).get_string_custom_property("feature_spec")
            spec = {**spec, "key": json.loads(indexed_spec).get("key") if indexed_spec else spec["key"]}

            def corpus(split):   # rerank: the split streamed, and its keys in the same order
                return (common.stream_split(pre_ex, split, spec, int(e.get("batch_size") or 256)),
                        common.split_keys(pre_ex, split, spec["key"]))
            backend = query_from_index(index_uri, pre_splits, tfi.Objective(pre_model, pre_loss), ms, s, _ds(xt, yt),
                                       tkeys_sel, query, out.uri, corpus=corpus)
            out.set_string_custom_property("scored_by", f"GradientIndex {index_uri}")
            if query is not None:
                out.set_string_custom_property("query_args", query.to_json())
                out.set_string_custom_property("index_backend", backend)
        elif query is not None:
            raise ValueError("InfluenceScorer: query_args is set but there is no index input")
        else:
            def build(p):
                for split in pre_splits:
                    beam_scoring.score_examples(
                        p, common.split_pattern(pre_ex, split), common.model_path(pre_m), spec, "influence",
                        os.path.join(out.uri, f"Split-{split}"), loss_config=e.get("loss"), group_spec=group_spec,
                        vector=s.numpy(), batch_size=int(e.get("batch_size") or 256), label=f"[{split}]",
                        temp_dir=os.path.join(self._get_tmp_dir(), "scores", split))

            common.run_beam(self, build, f"InfluenceScorer on Examples artifact {pre_ex.uri} "
                                         f"with Model artifact {pre_m.uri}",
                            output_dirs=[os.path.join(out.uri, f"Split-{s}") for s in pre_splits])
            out.set_string_custom_property("scored_by", "a pass over every pretraining example (Beam)")
        set_scores_metadata(out, pre_splits, f"multi_stage_{args.case}", key_feature=spec["key"])
        out.set_string_custom_property("feature_spec", json.dumps(spec, sort_keys=True))
        out.set_string_custom_property("embedding", json.dumps(embedding))
        out.set_string_custom_property("influence_args", e["influence_args"])
        out.set_string_custom_property("pretrain_hessian", pretrain_hessian)
        out.set_string_custom_property("solves", json.dumps(solves, sort_keys=True, default=float))
        out.set_string_custom_property("num_test_points", str(len(yt)))
        out.set_string_custom_property("group_spec", group_spec)
        out.set_string_custom_property("dampings", json.dumps({"pretrain": pre_solver.damping,
                                                               "finetune": ft_solver.damping}))
        common.record_summary(out, {sp: common.summarize(os.path.join(out.uri, f"Split-{sp}")) for sp in pre_splits})
