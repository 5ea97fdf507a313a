"""Write the evidence report of a scorer's output as one HTML page.

    python -m tf_influence.report --scores SCORES_DIR --examples 'DATA/Split-train/*' --out reports/report \\
        [--kind influence|self_influence] [--key-feature key] [--renderer image|text|table] \\
        [--feature image --image-shape 8 8] [--drop-mode drop_top_fraction --drop-value 0.1]

``SCORES_DIR``: score shards as the scorers and the Beam scoring job write them (one split's folder of an
InfluenceScores artifact, or ``--out`` of ``python -m tfx_components.beam_scoring``); ``--examples``: the
TFRecord files that were scored. Prints the page's path. From Python, :class:`tf_influence.report.Report`
takes an ``InfluenceResult``, a gradient-index ``QueryResult`` or self-influence scores directly.
"""

from __future__ import annotations

import argparse
import sys

from ..console import quiet_for_cli


def main(argv=None) -> str:
    quiet_for_cli(argv)
    from ..cli import add_arguments, from_args
    from .records import ReportArgs, write_report
    ap = argparse.ArgumentParser(prog="python -m tf_influence.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", required=True, help="folder of score shards (scores-*.tfrecord.gz)")
    ap.add_argument("--examples", required=True, help="TFRecord file pattern of the scored examples")
    ap.add_argument("--out", required=True, help="the report's folder (index.html) or .html file")
    ap.add_argument("--kind", default="influence", choices=("influence", "self_influence"))
    ap.add_argument("--key-feature", default=None,
                    help="the examples' key feature (None: keys are file and position, as the scorers give them)")
    ap.add_argument("--verbose", action="store_true", help="show library logs")
    add_arguments(ap, ReportArgs, title="what the page shows (ReportArgs)")
    ns = ap.parse_args(argv)
    args = from_args(ReportArgs, ns, parser=ap)
    path = write_report(ns.out, ns.scores, ns.examples, args, key_feature=ns.key_feature, kind=ns.kind)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
