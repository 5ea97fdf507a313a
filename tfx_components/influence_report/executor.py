"""Executor of InfluenceReport: reads the scores of each split and the examples they score and writes the
page with ``tf_influence.report.records`` (the library draws; this reads artifacts and writes one)."""

import dataclasses
import html
import json
import os

from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils

from tfx_components import common
from tfx_components.artifacts import scores_key_feature, scores_kind, scores_split_names

# keys of the component's spec (tfx_components.component_specs, as TFX's standard_component_specs names its own)
from tfx_components.component_specs import EXAMPLES_KEY, REPORT_KEY, SCORES_KEY, SPLITS_KEY  # noqa: E402
from tfx_components.component_specs import REPORT_ARGS_KEY as ARGS_KEY  # noqa: E402

REPORT_PATH_PROPERTY = "report_path"


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict, output_dict, exec_properties):
        from tf_influence.report.records import ReportArgs
        examples = artifact_utils.get_single_instance(input_dict[EXAMPLES_KEY])
        scores = artifact_utils.get_single_instance(input_dict[SCORES_KEY])
        report = artifact_utils.get_single_instance(output_dict[REPORT_KEY])
        args = ReportArgs.from_json(exec_properties[ARGS_KEY])
        splits = _splits(exec_properties, scores)
        pages = [write_split(examples, scores, split, args, report.uri) for split in splits]
        report.set_string_custom_property("split_names", json.dumps(splits))
        report.set_string_custom_property(REPORT_PATH_PROPERTY, pages[0])
        report.set_string_custom_property("pages", json.dumps(pages))


def _splits(exec_properties, scores) -> list:
    scored = scores_split_names(scores)
    asked = json.loads(exec_properties[SPLITS_KEY]) if exec_properties.get(SPLITS_KEY) else scored
    missing = [s for s in asked if s not in scored]
    if missing:
        raise ValueError(f"InfluenceScores artifact {scores.uri} has no scores for split(s) {missing} "
                         f"(it has {scored})")
    return list(asked)


def write_split(examples, scores, split: str, args, out_uri: str) -> str:
    """The page of one split: ``<out_uri>/Split-<split>/index.html``."""
    from tf_influence.report.records import write_report
    kind = "self_influence" if scores_kind(scores) == "self_influence" else "influence"
    title = args.title or f"{kind.replace('_', '-').capitalize()} of split '{split}' ({scores_kind(scores)})"
    return write_report(os.path.join(out_uri, f"Split-{split}"), os.path.join(scores.uri, f"Split-{split}"),
                        common.split_files(examples, split), dataclasses.replace(args, title=title),
                        key_feature=scores_key_feature(scores), kind=kind,
                        desc=f"Examples artifact {examples.uri}, split '{split}'")


def notebook_html(artifact) -> str:
    """What a notebook shows for the artifact: each split's page in an iframe (its own document, so its
    styles stay its own)."""
    pages = json.loads(artifact.get_string_custom_property("pages") or "[]")
    parts = []
    for p in pages:
        with open(p, encoding="utf-8") as fh:
            doc = fh.read()
        parts.append(f'<p><code>{html.escape(p)}</code></p><iframe style="width:100%;height:900px;border:1px solid '
                     f'#ddd" srcdoc="{html.escape(doc, quote=True)}"></iframe>')
    return "".join(parts) or f"<p>no report pages in {html.escape(artifact.uri)}</p>"
