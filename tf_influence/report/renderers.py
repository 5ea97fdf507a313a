"""Renderers: one example ``(x, y)`` as HTML a person reads — text with per-token highlights, an image
thumbnail, a feature table.

A renderer is any object with ``html(x, y, highlights=None) -> str`` (``x``, ``y``: one example's
features and label as numpy, no batch axis; ``highlights``: per-position weights for text, or None)
and ``label(y) -> str``. The HTML is self-contained (images as ``data:`` URIs), escaped, and uses the
page's CSS classes (:mod:`tf_influence.report.page`).

>>> r = TextRenderer()                                  # the embedded corpus' character vocabulary
>>> r.tokens([41, 70, 77, 77, 80])
['H', 'e', 'l', 'l', 'o']
>>> '<span class="tok"' in r.html({"token_ids": [41, 70]}, None, highlights=[0.5, -1.0])
True
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

#: The embedded corpus' character vocabulary (``model_zoo.text``): id ``i ≥ 1`` is ``PRINTABLE_ASCII[i - 1]``,
#: id 0 is padding / unknown.
PRINTABLE_ASCII = [chr(c) for c in range(32, 127)]


def _first(x, names):
    if isinstance(x, dict):
        for n in names:
            if n in x:
                return x[n]
        if len(x) == 1:
            return next(iter(x.values()))
        raise KeyError(f"none of the features {list(names)} in the example's features {sorted(x)}")
    return x


def _scalar(y):
    a = np.asarray(y)
    return a.item() if a.size == 1 else a


def _class_label(y, class_names) -> str:
    """A one-value label as escaped text (its class name when ``class_names`` has it), else ``""``."""
    if y is None or np.asarray(y).size != 1:
        return ""
    v = _scalar(y)
    if class_names is not None and float(v).is_integer() and 0 <= int(v) < len(class_names):
        return html.escape(str(class_names[int(v)]))
    return html.escape(str(v))


def _colour(w: float, scale: float) -> str:
    """Red for a positive weight (harmful: removal lowers the test loss), blue for a negative one."""
    if scale <= 0 or not np.isfinite(w) or w == 0:
        return "transparent"
    a = min(1.0, abs(w) / scale)
    return f"rgba(220,40,40,{a:.3f})" if w > 0 else f"rgba(40,90,220,{a:.3f})"


class TextRenderer:
    """Token ids as text, each token a ``<span class="tok">`` (highlighted by its weight when given).

    Exactly one way to turn ids into strings, in this order: ``tokenizer`` (a keras-hub tokenizer or any
    object with ``id_to_token``), ``vocabulary`` (a list of token strings, or a path to a file with one
    token per line), ``decode`` (a function ``ids -> str``, called per token), else the embedded corpus'
    character vocabulary (:data:`PRINTABLE_ASCII`). ``feature``: the features' key holding the ids
    (``"token_ids"``); ``padding_id``: ids equal to it (and positions the ``padding_mask`` marks 0) are not
    shown. Byte-level BPE markers (``Ġ``, ``Ċ``) are shown as a space / newline.
    """

    kind = "text"

    def __init__(self, tokenizer=None, vocabulary=None, decode=None, feature: str = "token_ids",
                 padding_id: int | None = 0, max_tokens: int = 512):
        given = [n for n, v in (("tokenizer", tokenizer), ("vocabulary", vocabulary), ("decode", decode))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of tokenizer / vocabulary / decode, got {given}")
        if isinstance(vocabulary, str):
            with open(vocabulary, encoding="utf-8") as fh:
                vocabulary = [line.rstrip("\n") for line in fh]
        if tokenizer is None and vocabulary is None and decode is None:
            vocabulary = [""] + PRINTABLE_ASCII
        self.tokenizer, self.vocabulary, self.decode = tokenizer, vocabulary, decode
        self.feature, self.padding_id, self.max_tokens = feature, padding_id, int(max_tokens)

    def token(self, i: int) -> str:
        i = int(i)
        if self.tokenizer is not None:
            t = self.tokenizer.id_to_token(i)
        elif self.vocabulary is not None:
            t = self.vocabulary[i] if 0 <= i < len(self.vocabulary) else f"[{i}]"
        else:
            t = self.decode([i])
        t = t if isinstance(t, str) else bytes(t).decode("utf-8", "replace")
        return t.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")

    def tokens(self, ids) -> list:
        return [self.token(i) for i in np.asarray(ids).reshape(-1)]

    def ids_and_mask(self, x):
        ids = np.asarray(_first(x, (self.feature, "token_ids", "input_ids"))).reshape(-1)
        keep = np.ones(ids.shape, bool)
        if isinstance(x, dict) and "padding_mask" in x:
            keep &= np.asarray(x["padding_mask"]).reshape(-1).astype(bool)
        if self.padding_id is not None:
            keep &= ids != self.padding_id
        return ids, keep

    def text(self, x) -> str:
        ids, keep = self.ids_and_mask(x)
        return "".join(self.tokens(ids[keep]))

    def html(self, x, y=None, highlights=None) -> str:
        """``highlights[t]``: the weight of position ``t`` (for a causal LM, the term of label ``t``, i.e.
        of predicting token ``t + 1``: it is drawn on token ``t + 1``, the token being predicted)."""
        ids, keep = self.ids_and_mask(x)
        w = None
        if highlights is not None:
            h = np.asarray(highlights, np.float64).reshape(-1)
            w = np.zeros(ids.shape, np.float64)
            n = min(len(h), len(ids) - 1)
            w[1:n + 1] = h[:n]                     # label t predicts token t + 1
        scale = float(np.max(np.abs(w[keep]))) if w is not None and keep.any() else 0.0
        parts = []
        shown = 0
        for t, (i, k) in enumerate(zip(ids, keep)):
            if not k:
                continue
            shown += 1
            if shown > self.max_tokens:
                parts.append('<span class="more">…</span>')
                break
            tok = html.escape(self.token(i)).replace("\n", "↵<br>")
            if w is None:
                parts.append(f'<span class="tok">{tok}</span>')
            else:
                parts.append(f'<span class="tok{" hl" if w[t] != 0 else ""}" style="background:{_colour(w[t], scale)}" '
                             f'title="{w[t]:+.3g}" data-weight="{w[t]:.6g}">{tok}</span>')
        return f'<div class="text">{"".join(parts)}</div>'

    def label(self, y) -> str:
        return _class_label(y, None)       # a language model's labels are a sequence: nothing to show


class ImageRenderer:
    """An image array (``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or flat ``H·W`` with ``shape``) as a PNG
    thumbnail, scaled to ``size`` pixels (nearest neighbour: an 8×8 digit stays crisp); ``feature``: the
    features' key when ``x`` is a dict; ``class_names`` label the classes."""

    kind = "image"

    def __init__(self, shape=None, size: int = 64, feature: str | None = None, class_names=None):
        self.shape, self.size, self.feature = shape, int(size), feature
        self.class_names = list(class_names) if class_names is not None else None

    def png(self, x) -> bytes:
        from PIL import Image
        a = np.asarray(_first(x, (self.feature,) if self.feature else ("image", "pixels", "x")), np.float64)
        if self.shape is not None:
            a = a.reshape(self.shape)
        elif a.ndim == 1:
            side = int(round(math.sqrt(a.size)))
            if side * side != a.size:
                raise ValueError(f"a flat image of {a.size} values: give ImageRenderer(shape=...)")
            a = a.reshape(side, side)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        lo, hi = float(np.min(a)), float(np.max(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        img = Image.fromarray(np.uint8(np.round(255 * a)))
        scale = max(1, self.size // max(img.size))
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def html(self, x, y=None, highlights=None) -> str:
        data = base64.b64encode(self.png(x)).decode("ascii")
        return f'<img class="thumb" alt="example" src="data:image/png;base64,{data}">'

    def label(self, y) -> str:
        return _class_label(y, self.class_names)


class TableRenderer:
    """A tabular example (a dict of features, or a vector with ``feature_names``) as a one-row table."""

    kind = "table"

    def __init__(self, feature_names=None, class_names=None, digits: int = 3):
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.digits = int(digits)

    def _items(self, x):
        if isinstance(x, dict):
            return [(k, x[k]) for k in (self.feature_names or sorted(x))]
        v = np.asarray(x).reshape(-1)
        names = self.feature_names or [f"x{i}" for i in range(len(v))]
        if len(names) != len(v):
            raise ValueError(f"{len(v)} features, {len(names)} feature_names")
        return list(zip(names, v))

    def _fmt(self, v) -> str:
        a = np.asarray(v)
        if a.dtype.kind in "SO":
            a = np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b)(a)
        v = a.item() if a.size == 1 else a.tolist()
        if isinstance(v, float):
            return f"{v:.{self.digits}g}"
        return str(v)

    def html(self, x, y=None, highlights=None) -> str:
        items = self._items(x)
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k, _ in items)
        row = "".join(f"<td>{html.escape(self._fmt(v))}</td>" for _, v in items)
        return f'<table class="features"><tr>{head}</tr><tr>{row}</tr></table>'

    def label(self, y) -> str:
        return _class_label(y, self.class_names)


def renderer_for(x) -> object:
    """A renderer chosen from one example's features: token ids → text, an image-shaped array → image,
    else a table."""
    if isinstance(x, dict) and any(k in x for k in ("token_ids", "input_ids")):
        return TextRenderer()
    a = None if isinstance(x, dict) else np.asarray(x)
    if a is not None and (a.ndim >= 2 or (a.ndim == 1 and a.size >= 16 and math.isqrt(a.size) ** 2 == a.size
                                          and a.dtype.kind == "f")):
        return ImageRenderer()
    return TableRenderer()


__all__ = ["PRINTABLE_ASCII", "TextRenderer", "ImageRenderer", "TableRenderer", "renderer_for"]
