"""The evidence for a language model, end to end on the embedded corpus: a keras-hub GPT-2 (character
vocabulary) trained on windows of the corpus, its gradient index, and a report of which windows make it
complete a few prompts the way it does — each shown window's tokens coloured by their share of its score.

    python -m experiments.evidence_lm [--out reports/evidence/lm] [--sequences 1200] [--length 48] [--epochs 20]

Writes ``model.keras``, ``data/corpus-00000.tfrecord.gz`` (token_ids, padding_mask, key), ``index/`` and
``report.html`` under ``--out``, and prints the command that serves the index
(``python -m tf_influence.serve``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from tf_influence import console

#: (prompt, completion) pairs asked about in the report: code and prose of the corpus' kind
QUESTIONS = (("def ", "__init__(self"), ("    return ", "self."), ("The ", "module "))


@dataclass
class EvidenceArgs:
    out: str = field(default="reports/evidence/lm", metadata={"help": "output folder"})
    sequences: int = field(default=1200, metadata={"help": "windows of the corpus (pretraining sequences)"})
    length: int = field(default=48, metadata={"help": "characters per window"})
    width: int = field(default=64, metadata={"help": "GPT-2 width"})
    layers: int = field(default=2, metadata={"help": "GPT-2 layers"})
    epochs: int = field(default=20, metadata={"help": "training epochs"})
    top: int = field(default=4, metadata={"help": "examples shown per side"})
    seed: int = field(default=0, metadata={"help": "seed"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def corpus(n: int, length: int, seed: int = 0):
    """``[n, length]`` character ids of windows of the embedded corpus (prose and code), in corpus order."""
    import numpy as np

    from model_zoo import text
    prose, code = text.load_corpus()
    wins = text.windows(" ".join(prose) + " " + code, length)
    if len(wins) < n:
        raise ValueError(f"the embedded corpus has {len(wins)} windows of {length} characters, asked for {n}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(wins), size=n, replace=False))
    return text.encode([wins[i] for i in pick])


def build_lm(length: int, width: int, layers: int, seed: int = 0):
    import keras
    import keras_hub

    from model_zoo import text
    from tf_influence.lm import CausalLMLoss
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=text.VOCAB_SIZE, num_layers=layers, num_heads=2,
                                             hidden_dim=width, intermediate_dim=2 * width,
                                             max_sequence_length=length, name="backbone")
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.Adam(3e-3), loss=CausalLMLoss())
    return lm


def write_corpus(path: str, ids) -> list:
    """TFRecords of the windows (``token_ids``, ``padding_mask``, ``key`` = ``w00000``…); returns the keys."""
    import numpy as np
    import tensorflow as tf
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = [f"w{i:05d}".encode() for i in range(len(ids))]
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for k, row in zip(keys, ids):
            f = {"token_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=row.tolist())),
                 "padding_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=np.ones_like(row).tolist())),
                 "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[k]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    return keys


def questions(length: int, pairs=QUESTIONS):
    """``(x, y)`` of prompt + completion sequences (completion tokens labelled), padded to ``length``."""
    import numpy as np

    from model_zoo import text
    from tf_influence.lm import causal_lm_examples
    ids = np.zeros((len(pairs), length), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, c) in enumerate(pairs):
        row = text.encode([p + c])[0]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return causal_lm_examples(ids, mask, prompt_lengths=[len(p) for p, _ in pairs])


def run(args: EvidenceArgs) -> dict:
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from tf_influence.lm import causal_lm_examples, completion_log_probability, split_completion
    from tf_influence.report import Report, TextRenderer
    t0 = time.perf_counter()
    ids = corpus(args.sequences, args.length, args.seed)
    x, y = causal_lm_examples(ids)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    lm = build_lm(args.length, args.width, args.layers, args.seed)
    hist = lm.fit(ds.shuffle(64, seed=args.seed), epochs=args.epochs, verbose=0, shuffle=False)  # shuffled by tf.data
    print(f"trained GPT-2 ({lm.count_params():,} parameters) on {len(ids):,} windows of {args.length} characters: "
          f"loss {hist.history['loss'][0]:.3f} → {hist.history['loss'][-1]:.3f} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "model.keras")
    lm.save(model_path)
    data_path = os.path.join(args.out, "data", "corpus-00000.tfrecord.gz")
    keys = write_corpus(data_path, ids)
    obj = tfi.Objective(lm, include_model_losses=False)
    index = tfi.build_index(obj, ds, os.path.join(args.out, "index"), keys=keys)
    print(f"index: {index.count:,} examples × {index.dim} ({time.perf_counter() - t0:.0f} s)", flush=True)
    qx, qy = questions(args.length)
    test = tf.data.Dataset.from_tensor_slices((qx, qy)).batch(len(QUESTIONS))
    res = tfi.single_stage_influence(obj, ds, test, measurement=completion_log_probability(), test_target="each")
    rep = Report("Which windows of the corpus make the model complete these prompts",
                 renderer=TextRenderer(),
                 subtitle=f"keras-hub GPT-2, {lm.count_params():,} parameters, {len(ids):,} windows; the measurement "
                          "is log p(completion | prompt); supporting windows raise it, opposing ones lower it")
    # each completion token's share: one test point per completion token, the same solve (EK-FAC: a linear map)
    sx, sy, owner, pos = split_completion(qx, qy)
    split = tfi.single_stage_influence(obj, ds, tf.data.Dataset.from_tensor_slices((sx, sy)).batch(32),
                                       measurement=completion_log_probability(), test_target="each")
    completion_terms = {}
    for j in range(len(QUESTIONS)):
        terms = np.zeros((len(ids), args.length))
        for col in np.flatnonzero(owner == j):
            terms[:, pos[col]] = split.scores[:, col]
        completion_terms[j] = terms
    # relative to the column's largest score (the two solves refit the factors: float32 round-off apart)
    split_error = max(float(np.max(np.abs(completion_terms[j].sum(axis=1) - res.scores[:, j]))
                            / max(float(np.max(np.abs(res.scores[:, j]))), 1e-12)) for j in range(len(QUESTIONS)))
    shown = rep.add_influence(res, ds, test=test, model=lm, measurement=completion_log_probability(),
                              top_k=args.top, token_objective=obj, keys=keys, completion_terms=completion_terms,
                              test_names=[f"{p!r} → {c!r}" for p, c in QUESTIONS])
    page = rep.write(os.path.join(args.out, "report.html"))
    # relative to each column's largest score (float32 forward-mode terms against the float32 score)
    scale = np.max(np.abs(res.scores), axis=0)
    err = max(abs(v - res.scores[i, j]) / max(float(scale[j]), 1e-12)
              for j, col in enumerate(shown["columns"]) for i, v in col["token_sums"].items())
    print(f"per-token shares sum to the scores (largest difference over the largest score {err:.1e}); the completion tokens' "
          f"shares too ({split_error:.1e})")
    print(f"report: {page}")
    shot = screenshot(page, os.path.join("reports", "screenshots", "evidence_lm.png"))
    if shot:
        print(f"screenshot: {shot}")
    print(f"serve the index: python -m tf_influence.serve --index {args.out}/index --model {model_path} "
          f"--data '{data_path}' --key-feature key")
    return {"report": page, "model": model_path, "data": data_path, "index": os.path.join(args.out, "index"),
            "keys": keys, "result": res, "seconds": time.perf_counter() - t0, "token_sum_error": err,
            "completion_split_error": split_error}


def screenshot(page: str, out: str) -> str | None:
    """A headless-Chromium screenshot of the page's first test point (None, with a line saying why, when
    Debian's chromium / chromium-driver or Selenium are missing)."""
    import shutil
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        print("no screenshot: chromium and chromium-driver are not installed (make install installs them)")
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(a)
    opts.binary_location = browser
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        d.get("file://" + os.path.abspath(page))
        d.execute_script("document.querySelectorAll('section.test-point')[0].scrollIntoView()")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        d.save_screenshot(out)
    finally:
        d.quit()
    return out


def main(argv=None):
    console.quiet_for_cli(argv)
    from tf_influence.cli import add_arguments, from_args
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, EvidenceArgs)
    args = from_args(EvidenceArgs, ap.parse_args(argv), parser=ap)
    console.quiet(args.verbose)
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
