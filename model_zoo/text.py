"""Embedded English text and a small character-level language model for the PRESENCE experiments.

Corpus (no download): the docstrings of a fixed list of Python standard-library modules — real
English prose written by people, shipped with every Python installation. Out-of-domain text:
the *source code* of the same modules with docstrings and comments removed (same characters,
different "language"). Jumbled text: clean samples with their words randomly permuted (the
noise type of the PRESENCE paper's Figure 1).

Samples are fixed-length character windows (default 64 + 1 characters); the model predicts
every next character (causal dilated convolutions). Its first layer, ``embedding``, is the
natural layer set K for self-influence (the paper uses the first encoder / decoder layers).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re

import keras
import numpy as np

MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "difflib", "email.message", "fractions",
           "functools", "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging",
           "mailbox", "pathlib", "pickle", "random", "shutil", "smtplib", "statistics", "string", "subprocess",
           "tarfile", "textwrap", "threading", "unittest.case", "urllib.parse", "uuid", "zipfile", "typing",
           "asyncio.tasks", "calendar", "configparser", "contextlib", "dataclasses", "enum", "gettext")

#: The part of the standard library each module documents: the labels of the transformer LM's
#: downstream task (which domain does a window of documentation come from).
DOMAINS = {
    "text_and_cli": ("argparse", "textwrap", "string", "difflib", "configparser", "gettext", "csv"),
    "network_and_mail": ("email.message", "http.client", "mailbox", "smtplib", "urllib.parse", "ipaddress", "uuid"),
    "files_and_formats": ("pathlib", "shutil", "tarfile", "zipfile", "pickle", "json"),
    "concurrency": ("threading", "subprocess", "asyncio.tasks", "logging"),
    "language": ("inspect", "typing", "dataclasses", "enum", "functools", "itertools", "contextlib", "collections",
                 "unittest.case"),
    "numbers_and_time": ("decimal", "fractions", "statistics", "random", "heapq", "datetime", "calendar"),
}
_DOMAIN_OF = {m: i for i, ms in enumerate(DOMAINS.values()) for m in ms}
assert sorted(_DOMAIN_OF) == sorted(MODULES), "every corpus module has one domain"

VOCAB = [chr(c) for c in range(32, 127)]  # printable ASCII; index 0 = padding / unknown
CHAR_TO_ID = {c: i + 1 for i, c in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB) + 1


def _clean(text: str) -> str:
    text = text.replace("\t", " ").replace("\n", " ")
    text = "".join(ch for ch in text if ch in CHAR_TO_ID)
    return re.sub(r" {2,}", " ", text).strip()


def _docstrings(module) -> list:
    out = []
    objs = [module] + [obj for _, obj in sorted(vars(module).items())
                       if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None)
                       == module.__name__]
    for obj in objs:
        doc = inspect.getdoc(obj)
        if doc:
            for para in doc.split("\n\n"):
                para = _clean(para)
                # prose, not signatures / examples: mostly letters and spaces, several words
                if len(para.split()) >= 6 and not para.startswith(">>>") and sum(c.isalpha() for c in para) > 0.7 * len(
                        para):
                    out.append(para)
    return out


def _code(module) -> str:
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return ""
    for node in ast.walk(tree):  # drop docstrings: keep the code only
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return _clean(" ".join(line.split("#")[0] for line in ast.unparse(tree).splitlines()))


def load_corpus(with_domains: bool = False):
    """``(prose_paragraphs, code_text)`` from the standard library (deterministic order); with
    ``with_domains`` also each paragraph's :data:`DOMAINS` index."""
    prose, code, domains = [], [], []
    for name in MODULES:
        module = importlib.import_module(name)
        paras = _docstrings(module)
        prose.extend(paras)
        domains.extend([_DOMAIN_OF[name]] * len(paras))
        code.append(_code(module))
    if with_domains:
        return prose, " ".join(code), domains
    return prose, " ".join(code)


def windows(text: str, length: int) -> list:
    """Non-overlapping windows of ``length`` characters."""
    return [text[i:i + length] for i in range(0, len(text) - length + 1, length)]


def jumble(sample: str, rng) -> str:
    """Permute the words of a sample (keeps its characters, destroys its syntax)."""
    words = sample.split(" ")
    rng.shuffle(words)
    out = " ".join(words)
    return out[:len(sample)].ljust(len(sample))


def encode(samples) -> np.ndarray:
    return np.array([[CHAR_TO_ID.get(c, 0) for c in s] for s in samples], dtype=np.int32)


def lm_pairs(ids: np.ndarray):
    """``(inputs, targets)`` for next-character prediction."""
    return ids[:, :-1], ids[:, 1:]


def build_lm(seq_len: int = 64, embed: int = 24, channels: int = 64, seed: int = 0) -> keras.Model:
    """Causal dilated-convolution character LM: embedding (K) → 3 causal convs → logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((seq_len,), dtype="int32")
    h = keras.layers.Embedding(VOCAB_SIZE, embed, name="embedding")(inp)
    for i, d in enumerate((1, 2, 4)):
        h = keras.layers.Conv1D(channels, 3, padding="causal", dilation_rate=d, activation="relu", name=f"conv{i}")(h)
    out = keras.layers.Dense(VOCAB_SIZE, name="logits")(h)
    return keras.Model(inp, out, name="char_lm")


def lm_loss():
    """Per-position cross-entropy; :class:`~tf_influence.objective.Objective` and
    :class:`~tf_influence.presence.PresenceModel` average it to one value per sample."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def build_transformer_lm(vocab: int, seq_len: int, width: int = 64, heads: int = 2, blocks: int = 1, ffn: int = 128,
                         seed: int = 0) -> keras.Model:
    """Causal word-level transformer LM: token ``Embedding`` (``tok_emb``) + fixed sinusoidal
    positions → ``blocks`` × [causal ``MultiHeadAttention`` (``attention<i>``) + residual →
    ``LayerNormalization`` (``norm<i>a``) → ``Dense`` FFN (``ffn<i>_in`` gelu, ``ffn<i>_out``) +
    residual → ``LayerNormalization`` (``norm<i>b``)] → ``Dense`` logits (``logits``)."""
    keras.utils.set_random_seed(seed)
    tok = keras.Input((seq_len,), dtype="int32")
    h = keras.layers.Embedding(vocab, width, name="tok_emb")(tok)
    pos = np.arange(seq_len)[:, None] / np.power(10000.0, (2 * (np.arange(width)[None, :] // 2)) / width)
    h = h + np.where(np.arange(width)[None, :] % 2 == 0, np.sin(pos), np.cos(pos))[None].astype(np.float32)
    for i in range(blocks):
        a = keras.layers.MultiHeadAttention(heads, key_dim=width // heads, name=f"attention{i}")(
            h, h, use_causal_mask=True)
        h = keras.layers.LayerNormalization(name=f"norm{i}a")(h + a)
        f = keras.layers.Dense(ffn, activation="gelu", name=f"ffn{i}_in")(h)
        f = keras.layers.Dense(width, name=f"ffn{i}_out")(f)
        h = keras.layers.LayerNormalization(name=f"norm{i}b")(h + f)
    logits = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(tok, logits, name="transformer_lm")
