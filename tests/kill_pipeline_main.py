"""A small LocalDagRunner pipeline (Importers → SelfInfluenceScorer → ScoreFilter) for
``tests/pipelines/test_killed_runs.py``, which starts it as its own process and SIGKILLs it while the scorer
runs. ``python tests/kill_pipeline_main.py ROOT`` (ROOT holds ``examples/`` and ``model/``)."""

import os
import sys

# run as a script, sys.path[0] is tests/, whose folders (tests/tf_influence/, tests/model_zoo/, …) would
# shadow the packages they test: the repository root instead
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(root):
    from tfx import v1 as tfx
    from tfx.orchestration import metadata
    from tfx.orchestration import pipeline as tfx_pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner
    from tfx.types import artifact_utils, standard_artifacts

    from tests.tfx_helpers import BEAM_IN_PROCESS

    from tfx_components.score_filter.component import ScoreFilter
    from tfx_components.self_influence_scorer.component import SelfInfluenceScorer
    ex = tfx.dsl.Importer(source_uri=os.path.join(root, "examples"), artifact_type=standard_artifacts.Examples,
                          properties={"split_names": artifact_utils.encode_split_names(["train"])}).with_id("examples")
    model = tfx.dsl.Importer(source_uri=os.path.join(root, "model"), artifact_type=standard_artifacts.Model
                             ).with_id("model")
    si = SelfInfluenceScorer(examples=ex.outputs["result"], model=model.outputs["result"], batch_size=1)
    flt = ScoreFilter(examples=ex.outputs["result"], scores=si.outputs["scores"], mode="drop_top_fraction", value=0.1)
    LocalDagRunner().run(tfx_pipeline.Pipeline(
        pipeline_name="killed_run_test", pipeline_root=os.path.join(root, "pipeline_root"),
        components=[ex, model, si, flt], enable_cache=True,
        metadata_connection_config=metadata.sqlite_metadata_connection_config(os.path.join(root, "mlmd.sqlite")),
        beam_pipeline_args=BEAM_IN_PROCESS))


if __name__ == "__main__":
    main(sys.argv[1])
