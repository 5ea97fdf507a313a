"""influence_pipeline: score pretraining digits by multi-stage influence, drop the most harmful,
retrain, and compare finetuning test accuracy (against dropping a random set of the same size).

    python -m pipelines.influence_pipeline [--quick] [--root reports/pipelines/influence]
        [--runner local|kubeflow_v2] [--beam-arg=--direct_num_workers=2 ...] [--pretrain-solver ekfac]
        [--case ...] [--finetune-solver '{"method": "cg_squared", "iterative": {"max_iter": 100}}'] ...

The InfluenceScorer's options are ``tf_influence.InfluenceArgs``, passed whole: every field is a flag,
with this pipeline's defaults (:func:`pipeline_influence_defaults`: ``cg_squared`` on both inverses in float64,
the whole pretraining corpus as the Hessian's data). ``--pretrain-solver ekfac`` (or ``kfac``) adds a
FactorFitter: the pretraining curvature is fitted over the corpus in Beam and the scorer inverts it.

DAG: ImportExampleGen (pretrain digits 0–3) and ImportExampleGen (finetune digits 4–9, train/test)
→ Trainer (pretrain) → Trainer (finetune, embedding fixed) → [FactorFitter →] InfluenceScorer → ScoreFilter
(drop the top 10 % scores) → Trainer (pretrain) → Trainer (finetune); RandomScores → ScoreFilter
→ Trainer → Trainer (the control); CompareModels. ``--runner local`` runs it with LocalDagRunner
and sqlite MLMD and writes ``reports/pipelines/influence_pipeline.json``; ``--runner kubeflow_v2``
compiles the pipeline JSON for Vertex AI Pipelines (``<root>/influence_pipeline.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import tf_influence as tfi
from pipelines.summary import BEAM_DEFAULT, RunArgs, execute, run_arguments
from tf_influence.cli import add_arguments, from_args
from tf_influence import console


def pipeline_influence_defaults() -> dict:
    """This pipeline's InfluenceArgs where they differ from the library's (said in ``--help``): the
    paper's cg_squared on both inverses in float64, the whole (small) pretraining corpus as the Hessian's
    data. (A function: building SolverConfigs imports TensorFlow, which the command quiets first.)"""
    return {
        "hessian_samples": None,
        "pretrain_solver": tfi.SolverConfig("cg_squared", damping=tfi.DEFAULT_PRETRAIN_DAMPING,
                                            iterative=tfi.IterativeOptions(dtype="float64")),
        "finetune_solver": tfi.SolverConfig("cg_squared", damping=tfi.DEFAULT_FINETUNE_DAMPING,
                                            iterative=tfi.IterativeOptions(dtype="float64")),
    }


#: ``--quick`` (CI): CG iterations of both solves when the solver flags are not given
QUICK_CG_ITERATIONS = 50


def pipeline_influence_args(quick: bool = False, pretrain_solver: str | None = None) -> "tfi.InfluenceArgs":
    """The InfluenceArgs the pipeline runs with by default (``quick``: 50 CG iterations), with
    ``pretrain_solver`` (a method name) replacing the pretraining solver's method."""
    from dataclasses import replace
    args = tfi.InfluenceArgs(**pipeline_influence_defaults())
    if quick:
        args = replace(args, pretrain_solver=args.pretrain_solver.replace(max_iter=QUICK_CG_ITERATIONS),
                       finetune_solver=args.finetune_solver.replace(max_iter=QUICK_CG_ITERATIONS))
    if pretrain_solver is not None:
        args = replace(args, pretrain_solver=replace(args.pretrain_solver, method=pretrain_solver))
    return args


def create_pipeline(root: str, data_root: str, quick: bool = False, beam_args=None, drop_fraction: float = 0.1,
                    enable_cache: bool = True, metadata_path: str | None = None, pretrain_solver: str | None = None,
                    influence_args: "tfi.InfluenceArgs | None" = None):
    """The pipeline. ``influence_args``: the scorer's options, whole (default
    :func:`pipeline_influence_args`); ``pretrain_solver`` (a method name) is the short form of
    replacing its pretraining solver's method — ``"ekfac"`` / ``"kfac"`` add a FactorFitter."""
    from tfx import v1 as tfx
    from tfx.proto import example_gen_pb2

    from pipelines import digits_data
    from pipelines.pipeline_components import CompareModels, RandomScores
    from tfx_components.factor_fitter.component import FactorFitter
    from tfx_components.influence_report.component import InfluenceReport
    from tfx_components.influence_scorer.component import InfluenceScorer
    from tfx_components.score_filter.component import ScoreFilter

    spec = digits_data.FEATURE_SPEC
    # the Trainer's run_fn by import path (this repository is on the path locally and in the image): a
    # module file would be packaged as a wheel and pip-installed on every Trainer run (about 3 s each)
    run_fn = "pipelines.trainer_module.run_fn"
    steps = 60 if quick else 400

    def gen(name, splits):
        cfg = example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name=s, pattern=p) for s, p in splits])
        kwargs = {}
        if len(splits) == 1:  # keep a single input split whole (ExampleGen would hash it into train/eval)
            kwargs["output_config"] = example_gen_pb2.Output(split_config=example_gen_pb2.SplitConfig(
                splits=[example_gen_pb2.SplitConfig.Split(name=splits[0][0], hash_buckets=1)]))
        return tfx.components.ImportExampleGen(input_base=data_root, input_config=cfg, **kwargs).with_id(name)

    pre_gen = gen("pretrain_examples", [("train", "pretrain/*")])
    ft_gen = gen("finetune_examples", [("train", "finetune_train/*"), ("test", "finetune_test/*")])

    def trainers(suffix, examples):
        pre = tfx.components.Trainer(
            run_fn=run_fn, examples=examples, train_args=tfx.proto.TrainArgs(num_steps=steps, splits=["train"]),
            eval_args=tfx.proto.EvalArgs(num_steps=0, splits=["train"]),
            custom_config={"stage": "pretrain", "n_classes": 4, "feature_spec": spec}
        ).with_id(f"pretrain_trainer{suffix}")
        ft = tfx.components.Trainer(
            run_fn=run_fn, examples=ft_gen.outputs["examples"], base_model=pre.outputs["model"],
            train_args=tfx.proto.TrainArgs(num_steps=steps, splits=["train"]),
            eval_args=tfx.proto.EvalArgs(num_steps=0, splits=["test"]),
            custom_config={"stage": "finetune", "case": "fixed", "n_classes": 6, "feature_spec": spec}).with_id(f"finetune_trainer{suffix}")
        return pre, ft

    pre_t, ft_t = trainers("", pre_gen.outputs["examples"])
    if influence_args is None:
        influence_args = pipeline_influence_args(quick, pretrain_solver)
    elif pretrain_solver is not None:
        raise TypeError("create_pipeline: pass influence_args or pretrain_solver, not both")
    if influence_args.case != "fixed":
        raise ValueError("influence_pipeline finetunes with the embedding fixed: InfluenceArgs.case must be 'fixed'")
    extra = []
    pre_solver = influence_args.pretrain_solver
    if pre_solver.method in ("ekfac", "kfac"):  # the pretraining curvature fitted over the corpus in Beam
        extra = [FactorFitter(examples=pre_gen.outputs["examples"], model=pre_t.outputs["model"], feature_spec=spec,
                              kind=pre_solver.method, fisher=pre_solver.kronecker.fisher,
                              seed=pre_solver.kronecker.seed)]
    scorer = InfluenceScorer(pretrain_examples=pre_gen.outputs["examples"], finetune_examples=ft_gen.outputs["examples"],
                             pretrain_model=pre_t.outputs["model"], finetune_model=ft_t.outputs["model"],
                             feature_spec=spec, embedding=["embedding"], influence_args=influence_args,
                             pretrain_factors=extra[0].outputs["factors"] if extra else None)
    top = ScoreFilter(examples=pre_gen.outputs["examples"], scores=scorer.outputs["scores"],
                      mode="drop_top_fraction", value=drop_fraction).with_id("drop_top")
    report = InfluenceReport(examples=pre_gen.outputs["examples"], scores=scorer.outputs["scores"], renderer="image",
                             feature="image", image_shape=[8, 8], label_feature="label",
                             drop_mode="drop_top_fraction", drop_value=drop_fraction,
                             title="Pretraining digits by their influence on the finetuned test loss")
    rnd_scores = RandomScores(examples=pre_gen.outputs["examples"], seed=0, key_feature="key")
    rnd = ScoreFilter(examples=pre_gen.outputs["examples"], scores=rnd_scores.outputs["scores"],
                      mode="drop_top_fraction", value=drop_fraction).with_id("drop_random")
    pre_top, ft_top = trainers("_drop_top", top.outputs["filtered_examples"])
    pre_rnd, ft_rnd = trainers("_drop_random", rnd.outputs["filtered_examples"])
    compare = CompareModels(test_examples=ft_gen.outputs["examples"], original=ft_t.outputs["model"],
                            dropped_top=ft_top.outputs["model"], dropped_random=ft_rnd.outputs["model"],
                            feature_spec=json.dumps(spec), finetune_steps=steps)
    components = [pre_gen, ft_gen, pre_t, ft_t, *extra, scorer, report, top, rnd_scores, rnd, pre_top, ft_top, pre_rnd, ft_rnd,
                  compare]
    kwargs = {}
    if metadata_path:
        kwargs["metadata_connection_config"] = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path)
    return tfx.dsl.Pipeline(pipeline_name="influence-pipeline", pipeline_root=os.path.join(root, "pipeline_root"),
                            components=components, enable_cache=enable_cache,
                            beam_pipeline_args=list(beam_args if beam_args is not None else BEAM_DEFAULT), **kwargs)


def main(argv=None):
    console.quiet_for_cli(argv)                           # before the configuration classes import TensorFlow
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    preset = pipeline_influence_args(quick)              # the quick preset's CG budget is a default, shown in --help
    ap.add_argument("--quick", action="store_true",
                    help=f"reduced sizes (CI): 200 finetuning examples, 60 training steps, {QUICK_CG_ITERATIONS} CG "
                         "iterations (the solver flags' defaults)")
    run_arguments(ap, "reports/pipelines/influence", "influence_pipeline")
    ap.add_argument("--data-dir", default=None, help="TFDS data dir for the embedded digits")
    add_arguments(ap, tfi.InfluenceArgs, title="the InfluenceScorer (InfluenceArgs; --pretrain-solver ekfac / kfac "
                                                "adds a FactorFitter)",
                  defaults={name: getattr(preset, name) for name in pipeline_influence_defaults()})
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    run = from_args(RunArgs, args, parser=ap)
    influence_args = from_args(tfi.InfluenceArgs, args, parser=ap)
    if influence_args.case != "fixed":
        ap.error("influence_pipeline finetunes with the embedding fixed: --case fixed")
    console.quiet(args.verbose)
    from pipelines import digits_data
    t0 = time.perf_counter()
    root = os.path.abspath(run.root)
    data_root = os.path.join(root, "data")
    counts = digits_data.write(data_root, n_finetune=200 if args.quick else 400, data_dir=args.data_dir)
    return execute("influence_pipeline",
                   lambda md: create_pipeline(root, data_root, args.quick, run.beam_args, metadata_path=md,
                                              influence_args=influence_args),
                   root, run.runner, run.image, run.report,
                   {"quick": args.quick, "data": counts, "influence_args": influence_args.to_dict()}, t0,
                   verbose=args.verbose)

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
