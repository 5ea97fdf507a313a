"""presence_pipeline: PRESENCE on the embedded text corpus, as a TFX pipeline.

    python -m pipelines.presence_pipeline [--quick] [--root reports/pipelines/presence]
        [--runner local|kubeflow_v2] [--beam-arg=...]

DAG: ImportExampleGen (noisy pool ``train`` + clean ``test``) → Trainer (character LM, uniform;
also the scoring model) → SelfInfluenceScorer (K = embedding) → ScoreFilter (keep the 80 %
lowest self-influence: PRESENCE-Sequential) → Trainer (uniform on the kept windows); Trainer
(PRESENCE reweighted step on the whole pool, τ = −1 throughout by default: ``--presence-tau1 1`` gives the
paper's two-stage schedule); CompareLMs (held-out clean loss, injected noise kept by the filter).

Why τ = −1 and not the paper's τ = +1 → −1: on the transformer LM grid of
``experiments.presence_lm`` the negative-only schedule was never significantly worse than the
two-stage one and better on 30 % code noise (4.507 ± 0.008 vs 4.565 ± 0.011 nats), and τ = +1
throughout was the worst schedule in 5 of 7 data settings: the first stage cost and never helped.

Writes ``reports/pipelines/presence_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipelines.summary import BEAM_DEFAULT, RunArgs, execute, run_arguments
from tf_influence import console


#: The PRESENCE trainer's settings in this pipeline: the library's PresenceArgs, with K = the LM's
#: embedding and τ = −1 throughout (why: the module docstring).
PIPELINE_PRESENCE = {"si_layers": ("embedding",), "tau1": -1.0}


def create_pipeline(root: str, data_root: str, n_train: int, quick: bool = False, beam_args=None,
                    metadata_path: str | None = None, keep_fraction: float = 0.8, tau1: float | None = None,
                    presence_args=None):
    """``presence_args``: a :class:`tf_influence.presence.PresenceArgs` for the PRESENCE trainer
    (default: :data:`PIPELINE_PRESENCE`); ``tau1`` is its deprecated shortcut (0.2)."""
    from tfx import v1 as tfx
    from tfx.proto import example_gen_pb2
    from tf_influence.presence import PresenceArgs
    if presence_args is None:
        presence_args = PresenceArgs(**PIPELINE_PRESENCE)
    if tau1 is not None:
        import dataclasses
        import warnings
        from tf_influence.deprecation import warn
        warn("create_pipeline(tau1=...)", "presence_args=PresenceArgs(tau1=...)")
        presence_args = dataclasses.replace(presence_args, tau1=float(tau1))

    from pipelines import text_data
    from pipelines.pipeline_components import CompareLMs
    from tfx_components.score_filter.component import ScoreFilter
    from tfx_components.self_influence_scorer.component import SelfInfluenceScorer

    spec = text_data.FEATURE_SPEC
    # the Trainer's run_fn by import path (this repository is on the path locally and in the image): a
    # module file would be packaged as a wheel and pip-installed on every Trainer run (about 3 s each)
    run_fn = "pipelines.trainer_module.run_fn"
    steps = 60 if quick else 800
    cfg = example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name="train", pattern="train/*"),
                                        example_gen_pb2.Input.Split(name="test", pattern="test/*")])
    gen = tfx.components.ImportExampleGen(input_base=data_root, input_config=cfg)

    def trainer(name, examples, extra=None):
        return tfx.components.Trainer(
            run_fn=run_fn, examples=examples, train_args=tfx.proto.TrainArgs(num_steps=steps, splits=["train"]),
            eval_args=tfx.proto.EvalArgs(num_steps=0, splits=["test"]),
            custom_config={"stage": "lm", "batch_size": 32, "learning_rate": 3e-3,
                           "feature_spec": spec, **(extra or {})}).with_id(name)

    uniform = trainer("uniform_trainer", gen.outputs["examples"])
    si = SelfInfluenceScorer(examples=gen.outputs["examples"], model=uniform.outputs["model"], feature_spec=spec,
                             si_layers=["embedding"], splits=["train"])
    flt = ScoreFilter(examples=gen.outputs["examples"], scores=si.outputs["scores"], mode="keep_lowest",
                      value=int(round(keep_fraction * n_train)))
    sequential = trainer("presence_sequential_trainer", flt.outputs["filtered_examples"])
    online = trainer("presence_trainer", gen.outputs["examples"],
                     {"presence": presence_args.to_dict()})
    compare = CompareLMs(examples=gen.outputs["examples"], uniform=uniform.outputs["model"],
                         presence_sequential=sequential.outputs["model"], presence=online.outputs["model"],
                         filtered=flt.outputs["filtered_examples"], feature_spec=json.dumps(spec))
    kwargs = {}
    if metadata_path:
        kwargs["metadata_connection_config"] = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path)
    return tfx.dsl.Pipeline(pipeline_name="presence-pipeline", pipeline_root=os.path.join(root, "pipeline_root"),
                            components=[gen, uniform, si, flt, sequential, online, compare], enable_cache=True,
                            beam_pipeline_args=list(beam_args if beam_args is not None else BEAM_DEFAULT), **kwargs)


def main(argv=None):
    console.quiet_for_cli(argv)                           # before PresenceArgs' module imports TensorFlow
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes (CI)")
    run_arguments(ap, "reports/pipelines/presence", "presence_pipeline")
    from tf_influence.cli import add_arguments, from_args
    from tf_influence.presence import PresenceArgs
    add_arguments(ap, PresenceArgs, prefix="presence_", title="the PRESENCE trainer (PresenceArgs)",
                  defaults=PIPELINE_PRESENCE)   # this pipeline's choice, said in --help
    ap.add_argument("--tau1", type=float, default=None, help=argparse.SUPPRESS)      # deprecated: --presence-tau1
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)
    if args.tau1 is not None:
        print("--tau1 is deprecated: use --presence-tau1", file=sys.stderr)
        args.presence_tau1 = args.tau1
    presence_args = from_args(PresenceArgs, args, prefix="presence_")
    run = from_args(RunArgs, args, parser=ap)
    from pipelines import text_data
    t0 = time.perf_counter()
    root = os.path.abspath(run.root)
    n_train = 480 if args.quick else 2400
    data_root = os.path.join(root, "data")
    counts = text_data.write(data_root, n_train=n_train, n_test=96 if args.quick else 500)
    return execute("presence_pipeline",
                   lambda md: create_pipeline(root, data_root, n_train, args.quick, run.beam_args, md,
                                              presence_args=presence_args),
                   root, run.runner, run.image, run.report, {"quick": args.quick, "data": counts}, t0,
                   verbose=args.verbose)

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
