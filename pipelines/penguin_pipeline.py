"""penguin_pipeline: TFX's penguin tutorial pipeline with tf-influence's components added.

    python -m pipelines.penguin_pipeline [--root reports/pipelines/penguin] [--two-stage]
        [--drop-fraction 0.1] [--beam-arg=--direct_num_workers=2 ...]

The tutorial's DAG — ``ImportExampleGen`` (the penguin data that ships inside the ``tfx`` package,
``tfx/components/testdata/penguin``; the tutorial reads the same rows from CSV) → ``StatisticsGen``
→ ``SchemaGen`` → ``Transform`` (z-scores, ``pipelines/penguin_module.py``) → ``Trainer`` (its Keras
model with four named inputs) — followed by

    SelfInfluenceScorer → ScoreFilter(drop_top_fraction=0.1) → Trainer (retrained on what is kept)

with nothing declared but the artifacts: no key column (examples are identified by file and
position), no feature spec (the model's inputs and the label come from the Transform graph), no
layer set (self-influence over every layer with parameters). ``--two-stage`` adds the
multi-stage variant: a finetuning ``Trainer(base_model=...)`` that freezes the tutorial model's
hidden layers and trains a new head, then ``InfluenceScorer`` (W: the layers both models share).

The run prints one line per component and writes ``reports/pipelines/penguin_pipeline.json``
(component states, filter counts, the artifacts' URIs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from pipelines.summary import BEAM_DEFAULT, RunArgs, execute, run_arguments
from tf_influence.cli import add_arguments, from_args
from tf_influence import console

MODULE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "penguin_module.py")


def penguin_data_root() -> str:
    """The penguin tutorial's examples shipped inside the installed ``tfx`` package."""
    import tfx
    root = os.path.join(os.path.dirname(tfx.__file__), "components", "testdata", "penguin", "data")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the tfx package has no penguin test data at {root}")
    return root


def create_pipeline(root: str, data_root: str | None = None, beam_args=None, drop_fraction: float = 0.1,
                    two_stage: bool = False, train_steps: int = 100, metadata_path: str | None = None):
    """The tutorial pipeline plus SelfInfluenceScorer → ScoreFilter → Trainer (and, with
    ``two_stage``, a finetuning Trainer and InfluenceScorer). Every tf-influence component gets
    only artifacts and the filter's fraction."""
    from tfx import v1 as tfx
    from tfx.proto import example_gen_pb2

    import tf_influence as tfi
    from tfx_components.influence_report.component import InfluenceReport
    from tfx_components.influence_scorer.component import InfluenceScorer
    from tfx_components.score_filter.component import ScoreFilter
    from tfx_components.self_influence_scorer.component import SelfInfluenceScorer

    data_root = data_root or penguin_data_root()
    example_gen = tfx.components.ImportExampleGen(
        input_base=data_root, input_config=example_gen_pb2.Input(splits=[
            example_gen_pb2.Input.Split(name="train", pattern="Split-train/*"),
            example_gen_pb2.Input.Split(name="eval", pattern="Split-eval/*")]))
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True)
    transform = tfx.components.Transform(examples=example_gen.outputs["examples"],
                                         schema=schema_gen.outputs["schema"], module_file=MODULE)
    examples, graph = transform.outputs["transformed_examples"], transform.outputs["transform_graph"]

    def trainer(name, train_examples, **kwargs):
        return tfx.components.Trainer(
            module_file=MODULE, examples=train_examples, transform_graph=graph, schema=schema_gen.outputs["schema"],
            train_args=tfx.proto.TrainArgs(num_steps=train_steps), eval_args=tfx.proto.EvalArgs(num_steps=5),
            **kwargs).with_id(name)

    model = trainer("trainer", examples)
    # --- tf-influence: score, drop the most self-influential fraction, retrain
    si = SelfInfluenceScorer(examples=examples, model=model.outputs["model"], transform_graph=graph)
    drop = ScoreFilter(examples=examples, scores=si.outputs["scores"], mode="drop_top_fraction",
                       value=drop_fraction).with_id("drop_top_self_influence")
    report = InfluenceReport(examples=examples, scores=si.outputs["scores"], renderer="table",
                             drop_mode="drop_top_fraction", drop_value=drop_fraction, splits=["train"],
                             title="Penguins by self-influence (the most self-influential are dropped)")
    retrained = trainer("trainer_filtered", drop.outputs["filtered_examples"])
    components = [example_gen, statistics_gen, schema_gen, transform, model, si, report, drop, retrained]
    if two_stage:
        finetuned = trainer("finetune_trainer", examples, base_model=model.outputs["model"],
                            custom_config={"stage": "finetune"})
        influence = InfluenceScorer(
            pretrain_examples=examples, finetune_examples=examples, pretrain_model=model.outputs["model"],
            finetune_model=finetuned.outputs["model"], transform_graph=graph,
            finetune_train_split="train", test_split="eval",
            influence_args=tfi.InfluenceArgs(case="fixed", hessian_samples=200))
        components += [finetuned, influence]
    kwargs = {}
    if metadata_path:
        kwargs["metadata_connection_config"] = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path)
    return tfx.dsl.Pipeline(pipeline_name="penguin-influence", pipeline_root=os.path.join(root, "pipeline_root"),
                            components=components, enable_cache=True,
                            beam_pipeline_args=list(beam_args if beam_args is not None else BEAM_DEFAULT), **kwargs)


@dataclass
class PenguinArgs:
    """What the penguin pipeline builds (the command's own flags; ``create_pipeline``'s arguments)."""

    two_stage: bool = field(default=False, metadata={
        "help": "add the finetuning Trainer (frozen hidden layers) and InfluenceScorer"})
    drop_fraction: float = field(default=0.1, metadata={"help": "ScoreFilter's drop_top_fraction"})
    train_steps: int = field(default=100, metadata={"help": "TrainArgs(num_steps) of every Trainer"})
    data_root: Optional[str] = field(default=None, metadata={
        "help": "folder with Split-train/ and Split-eval/ GZIP TFRecords (None: tfx's penguin data)"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(ap, "reports/pipelines/penguin", "penguin_pipeline")
    add_arguments(ap, PenguinArgs)
    console.add_verbose_flag(ap)
    ns = ap.parse_args(argv)
    run, args = from_args(RunArgs, ns, parser=ap), from_args(PenguinArgs, ns, parser=ap)
    console.quiet(ns.verbose)
    t0 = time.perf_counter()
    root = os.path.abspath(run.root)
    return execute("penguin_pipeline",
                   lambda md: create_pipeline(root, args.data_root, run.beam_args, args.drop_fraction, args.two_stage,
                                              args.train_steps, metadata_path=md),
                   root, run.runner, run.image, run.report, {"two_stage": args.two_stage}, t0,
                   verbose=ns.verbose)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
