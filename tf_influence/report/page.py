"""The report's HTML: one self-contained page (styles inline, plots and thumbnails as ``data:`` URIs), so it
opens from disk without a server or the internet, and the plots (matplotlib, Agg)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:1em 2em;
     color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:.8em 0 .3em}
.meta{color:#666;font-size:.9em}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:.6em 1.2em 1em;margin:1em 0}
.cols{display:flex;gap:1.5em;flex-wrap:wrap} .col{flex:1 1 440px;min-width:320px}
.example{border-left:4px solid #ccc;padding:.3em .6em;margin:.4em 0;background:#fcfcfc}
.example.harmful{border-color:#d33} .example.helpful{border-color:#36c}
.col .example.kind-image,.self-influence .example.kind-image{display:inline-block;vertical-align:top;margin:.3em .3em 0 0}
.score{font-family:ui-monospace,monospace;font-size:.85em;color:#444}
.text{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap;word-break:break-all;line-height:1.5}
.tok{border-radius:2px} .more{color:#999}
img.thumb{image-rendering:pixelated;border:1px solid #ddd;vertical-align:middle}
img.plot{max-width:100%}
table.features,table.diag{border-collapse:collapse;font-size:.85em}
table.features td,table.features th,table.diag td,table.diag th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.warn{color:#a60} .legend{font-size:.85em;color:#555}
.sw{display:inline-block;width:1em;height:1em;vertical-align:middle;border-radius:2px}
form.query textarea{width:100%;font-family:ui-monospace,monospace}
.error{color:#b00;font-weight:600}
"""


def figure_png(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64,…`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def score_histogram(scores, marked_high=(), marked_low=(), title: str = "", xlabel: str = "score",
                    colours=("#d33", "#36c")) -> str:
    """Histogram of ``scores`` with the selected examples marked (``colours``: of the highest and the
    lowest; red: harmful, blue: helpful)."""
    plt = _plt()
    s = np.asarray(scores, np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    ax.hist(s, bins=min(60, max(10, len(s) // 10)), color="#999")
    for i in marked_high:
        ax.axvline(s[i], color=colours[0], lw=1)
    for i in marked_low:
        ax.axvline(s[i], color=colours[1], lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    if title:
        ax.set_title(title, fontsize=10)
    return figure_png(fig)


def threshold_histogram(scores, threshold=None, title: str = "", xlabel: str = "self-influence") -> str:
    """Histogram of self-influence scores (log-spaced bins when they are positive) with the filter's
    threshold and what it dropped (the part above it, red)."""
    plt = _plt()
    s = np.asarray(scores, np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    positive = bool(np.all(s > 0)) and s.max() / max(s.min(), 1e-300) > 50
    bins = np.geomspace(s.min(), s.max(), 50) if positive else 50
    if threshold is None:
        ax.hist(s, bins=bins, color="#999")
    else:
        ax.hist(s[s <= threshold], bins=bins, color="#999", label="kept")
        ax.hist(s[s > threshold], bins=bins, color="#d33", label="dropped")
        ax.axvline(threshold, color="k", lw=1, ls="--")
        ax.legend(fontsize=8)
    if positive:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    if title:
        ax.set_title(title, fontsize=10)
    return figure_png(fig)


def esc(s) -> str:
    return html.escape(str(s))


def document(title: str, body: str, subtitle: str = "") -> str:
    sub = f'<p class="meta">{esc(subtitle)}</p>' if subtitle else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body><h1>{esc(title)}</h1>{sub}{body}</body></html>\n')


LEGEND = ('<p class="legend"><span class="sw" style="background:rgba(220,40,40,.7)"></span> <b>harmful</b>: the '
          'highest scores — removing the example is predicted to lower the test loss &nbsp; '
          '<span class="sw" style="background:rgba(40,90,220,.7)"></span> <b>helpful</b>: the lowest (removal raises '
          'it). A token\'s colour is its share of its sequence\'s score (red: towards harmful).</p>')
LEGEND_GAIN = ('<p class="legend">The measurement is to be raised (a log-probability): '
               '<span class="sw" style="background:rgba(40,90,220,.7)"></span> <b>supporting</b>: the highest scores — '
               'removing the example is predicted to lower the measurement &nbsp; '
               '<span class="sw" style="background:rgba(220,40,40,.7)"></span> <b>opposing</b>: the lowest (removal '
               'raises it). A token\'s colour is its share of its sequence\'s score (blue: supporting).</p>')
