"""Every path of the library on language models of the sizes users bring, with peak memory.

    python -m benchmarks.real_size --out docs/results/real_size.json --models gpt2-mid gpt2-small

Models (keras-hub, built from configs with random weights — presets would download; Zipf-distributed
synthetic tokens, ``numpy.random.default_rng().zipf(1.1)`` clipped to the vocabulary, as real text
is Zipfian; ``--length`` tokens per sequence):

* ``gpt2-mid``   — GPT-2's vocabulary 50,257 (tied ``ReversibleEmbedding``), 4 layers × 256: quick iteration;
* ``gpt2-small`` — GPT-2 small's configuration: 50,257, 12 × 768, 12 heads (124 M parameters);
* ``bert-base``  — BERT base: 30,522, 12 × 768, with an untied masked-LM head ``Dense(vocab)`` (110 M + head);
* ``llama-100m`` — a Llama-style untied model: 32,000, 8 × 768, 12 heads, MLP 2,048 (≥ 100 M).

The finetuning model is a 3-way classifier (mean-pooled sequence → ``Dense(3)``) over the pretrained
backbone, frozen (case 1, ``influence``) or a moved copy of it (case 2, ``influence_updated``).

Each path runs in a fresh process (so its peak RSS is its own, and a process the kernel kills is
recorded, not fatal): the first process trains the pretraining LM for one epoch over the sequences
(``train_epoch_seconds``, Adam, the batch size of every path) and the classifier's head, and saves
the weights; each path process rebuilds the models, loads the weights, then runs the call exactly as
the README shows it, with every default. Per path: ``ok``, ``seconds``, ``over_epoch`` (seconds over
``train_epoch_seconds``; with ``--paired-epochs``, over the mean of ``paired_epoch_seconds``, two epochs timed in
their own processes right before and after the path, and ``over_stored_epoch`` the ratio over the stored one), ``peak_rss_mb`` (the process's ``ru_maxrss``), ``estimated_mb`` (the RSS
before the call plus the library's memory plan, :mod:`tf_influence.memory`: the whole call's for influence
and ``fit_factors``, else the largest plan the library checked during the call) and ``error``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

MODELS = {
    "gpt2-mid": dict(kind="gpt2", vocab=50257, layers=4, width=256, heads=4, intermediate=1024),
    "gpt2-small": dict(kind="gpt2", vocab=50257, layers=12, width=768, heads=12, intermediate=3072),
    "bert-base": dict(kind="bert", vocab=30522, layers=12, width=768, heads=12, intermediate=3072),
    "llama-100m": dict(kind="llama", vocab=32000, layers=8, width=768, heads=12, intermediate=2048),
    "bert-mid": dict(kind="bert", vocab=30522, layers=4, width=256, heads=4, intermediate=1024),
    "llama-mid": dict(kind="llama", vocab=32000, layers=4, width=256, heads=4, intermediate=1024),
}
PATHS = ("influence", "influence_updated", "single_stage", "fit_factors", "self_influence",
         "self_influence_per_example", "index_build", "index_query", "presence_step", "beam_scoring")


#: The paths whose memory plan is the whole call's, made before it runs (:func:`_path_plan`; the others report the
#: largest plan the library checked during the call).
PLANNED = ("influence", "influence_updated", "fit_factors", "index_build", "self_influence", "self_influence_per_example")


@dataclass
class RealSizeArgs:
    out: str = field(default="docs/results/real_size.json", metadata={"help": "the JSON file written"})
    models: list[str] = field(default_factory=lambda: ["gpt2-mid"], metadata={
        "help": f"models to measure, of {sorted(MODELS)}"})
    paths: list[str] = field(default_factory=lambda: list(PATHS), metadata={"help": f"paths, of {list(PATHS)}"})
    sequences: int = field(default=256, metadata={"help": "pretraining sequences"})
    length: int = field(default=128, metadata={"help": "tokens per sequence"})
    batch: int = field(default=8, metadata={"help": "batch size of training and of every path"})
    finetune_examples: int = field(default=64, metadata={"help": "finetuning examples"})
    test_points: int = field(default=4, metadata={"help": "test points"})
    workdir: str = field(default="reports/real_size", metadata={"help": "weights and results of the run"})
    timeout: int = field(default=7200, metadata={"help": "seconds one path may run"})
    reuse: bool = field(default=False, metadata={
        "help": "reuse the trained weights and epoch time of an earlier run in --workdir (same sequences), and add "
                "the paths to that model's entry in --out"})
    verbose: bool = field(default=False, metadata={"help": "TensorFlow's and the libraries' own logs"})
    replan: bool = field(default=False, metadata={
        "help": f"recompute the memory plan of the stored runs of --paths (of {list(PLANNED)}) in --out without running "
                "them: estimated_mb becomes the RSS the run measured before its call plus the current plan, the run's own "
                "figure kept as estimated_mb_at_run"})
    paired_epochs: bool = field(default=False, metadata={
        "help": "time a training epoch in its own process right before and right after each path, and divide the "
                "path's seconds by their mean (this machine's speed varies by a third between runs: a ratio over an "
                "epoch timed minutes or sessions away is not the path's cost); costs two epochs per path"})


# -- models and data (rebuilt identically in every process) -----------------------------------------------
def build(name: str, args: RealSizeArgs, seed: int = 0):
    """``(pretrain LM, finetune classifier over the same backbone, backbone)``."""
    import keras
    import keras_hub
    cfg = MODELS[name]
    keras.utils.set_random_seed(seed)
    common = dict(vocabulary_size=cfg["vocab"], num_layers=cfg["layers"], hidden_dim=cfg["width"],
                  intermediate_dim=cfg["intermediate"], name="backbone")
    kind = cfg["kind"]
    if kind == "gpt2":
        bb = keras_hub.models.GPT2Backbone(num_heads=cfg["heads"], max_sequence_length=1024, **common)
        pre = keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)
    elif kind == "llama":
        bb = keras_hub.models.LlamaBackbone(num_query_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                                            tie_word_embeddings=False, **common)
        pre = keras_hub.models.LlamaCausalLM(backbone=bb, preprocessor=None)
    else:
        bb = keras_hub.models.BertBackbone(num_heads=cfg["heads"], max_sequence_length=512, **common)
        inp = _inputs(kind)
        seq = bb(inp)["sequence_output"]
        pre = keras.Model(inp, keras.layers.Dense(cfg["vocab"], name="lm_head")(seq), name="bert_mlm")
    return pre, bb


def _inputs(kind):
    import keras
    names = ["token_ids", "padding_mask"] + (["segment_ids"] if kind == "bert" else [])
    return {n: keras.Input((None,), dtype="int32", name=n) for n in names}


def classifier(name: str, bb):
    import keras
    kind = MODELS[name]["kind"]
    inp = _inputs(kind)
    out = bb(inp)
    seq = out["sequence_output"] if isinstance(out, dict) else out
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(seq)
    return keras.Model(inp, keras.layers.Dense(3, name="classifier")(pooled), name=f"{kind}_classifier")


def zipf_tokens(n: int, length: int, vocab: int, seed: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    return np.clip(rng.zipf(1.1, size=(n, length)), 1, vocab - 1).astype(np.int32)


def datasets(name: str, args: RealSizeArgs):
    """``(pretrain, finetune, test, lm_test)`` batched datasets; ``lm_test``: prompt / completion pairs
    for the single-stage completion measurement (first half of each sequence is the prompt)."""
    import numpy as np
    import tensorflow as tf
    from tf_influence.lm import IGNORE, causal_lm_examples
    cfg = MODELS[name]
    kind, vocab = cfg["kind"], cfg["vocab"]
    ids = zipf_tokens(args.sequences, args.length, vocab, 1)

    def x_of(i):
        x = {"token_ids": i, "padding_mask": np.ones_like(i)}
        if kind == "bert":
            x["segment_ids"] = np.zeros_like(i)
        return x
    if kind == "bert":   # masked-LM style: predict every token from the full sequence
        x, labels = x_of(ids), ids.copy()
    else:
        x, labels = causal_lm_examples(ids)
    pre = tf.data.Dataset.from_tensor_slices((x, labels)).batch(args.batch)
    n_ft = args.finetune_examples + args.test_points
    fid = zipf_tokens(n_ft, args.length, vocab, 2)
    fy = (np.arange(n_ft) % 3).astype(np.int32)
    fx = x_of(fid)
    ft = tf.data.Dataset.from_tensor_slices(({k: v[:args.finetune_examples] for k, v in fx.items()},
                                             fy[:args.finetune_examples])).batch(args.batch)
    te = tf.data.Dataset.from_tensor_slices(({k: v[args.finetune_examples:] for k, v in fx.items()},
                                             fy[args.finetune_examples:])).batch(args.batch)
    tid = zipf_tokens(args.test_points, args.length, vocab, 3)
    if kind == "bert":
        tl = np.where(np.arange(args.length)[None, :] >= args.length // 2, tid, IGNORE).astype(np.int32)
        lm_test = tf.data.Dataset.from_tensor_slices((x_of(tid), tl)).batch(args.batch)
    else:
        tx, tl = causal_lm_examples(tid, prompt_lengths=[args.length // 2] * args.test_points)
        lm_test = tf.data.Dataset.from_tensor_slices((tx, tl)).batch(args.batch)
    return pre, ft, te, lm_test


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _tf_mb(which: str = "current"):
    """MB that TensorFlow's CPU allocator has handed out (``"current"``) or at most had (``"peak"``); None where it
    does not count. What it freed it keeps for reuse (oneDNN's allocator): RSS minus this is host memory (NumPy,
    the Python heap) plus TensorFlow's free pool."""
    try:
        import tensorflow as tf
        return round(tf.config.experimental.get_memory_info("CPU:0")[which] / 2 ** 20)
    except Exception:   # noqa: BLE001 — an allocator without statistics
        return None


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- the worker processes --------------------------------------------------------------------------------
def _paths_dir(args, name):
    return os.path.join(args.workdir, name)


def train_epoch(name: str, args: RealSizeArgs) -> tuple:
    """``(LM, backbone, seconds)``: the LM built and trained one epoch over the sequences (Adam, the batch size of
    every path), the first batch traced outside the timing."""
    import keras
    from tf_influence.lm import CausalLMLoss
    pre, bb = build(name, args)
    ds, _, _, _ = datasets(name, args)
    pre.compile(optimizer=keras.optimizers.Adam(1e-4), loss=CausalLMLoss())
    pre.fit(ds.take(1), epochs=1, verbose=0)          # trace outside the timing
    t = time.perf_counter()
    pre.fit(ds, epochs=1, verbose=0)
    return pre, bb, time.perf_counter() - t


def prepare(name: str, args: RealSizeArgs) -> dict:
    """Train the LM one epoch (timed) and the classifier head; save the weights."""
    import keras
    pre, bb, epoch = train_epoch(name, args)
    _, ft, _, _ = datasets(name, args)
    bb.trainable = False
    clf = classifier(name, bb)
    clf.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(ft, epochs=1, verbose=0)
    d = _paths_dir(args, name)
    os.makedirs(d, exist_ok=True)
    pre.save_weights(os.path.join(d, "pretrain.weights.h5"))
    import numpy as np
    np.savez(os.path.join(d, "classifier.npz"), *clf.get_layer("classifier").get_weights())
    n_params = int(sum(int(v.numpy().size) for v in pre.weights))
    return {"n_params": n_params, "train_epoch_seconds": epoch, "peak_rss_mb_train": _peak_mb()}


def _load(name, args):
    import keras
    pre, bb = build(name, args)
    d = _paths_dir(args, name)
    pre.load_weights(os.path.join(d, "pretrain.weights.h5"))
    bb.trainable = False
    clf = classifier(name, bb)
    _load_head(clf, d)
    return pre, bb, clf


def _load_head(clf, d):
    import numpy as np
    with np.load(os.path.join(d, "classifier.npz")) as z:
        clf.get_layer("classifier").set_weights([z[f"arr_{i}"] for i in range(len(z.files))])


def _updated_classifier(name, args, bb):
    """Case 2: a classifier over its own copy of the backbone, moved a little from the pretrained one."""
    import numpy as np
    pre2, bb2 = build(name, args, seed=1)
    rng = np.random.default_rng(7)
    bb2.set_weights([w + 0.01 * (np.std(w) + 1e-8) * rng.standard_normal(w.shape).astype(w.dtype)
                     for w in bb.get_weights()])
    clf = classifier(name, bb2)
    _load_head(clf, _paths_dir(args, name))
    del pre2
    return clf


def run_path(name: str, path: str, args: RealSizeArgs) -> dict:
    import keras
    import numpy as np
    import tf_influence as tfi
    from tf_influence.lm import CausalLMLoss, completion_log_probability
    from tf_influence.memory import MemoryPlan
    pre, bb, an = _analyzer(name, path, args)
    ds, ft, te, lm_test = datasets(name, args)
    out_dir = an.output_dir
    plan = MemoryPlan("none")
    checked = _record_checked_plans()      # every plan the library checks during the call (paths without one of
    before = _rss_mb()                     # their own below: the largest of those is their estimate)
    t = time.perf_counter()
    extra = {}
    if path in ("influence", "influence_updated"):
        iargs = tfi.InfluenceArgs(case="fixed" if path == "influence" else "updated")
        plan = _path_plan(path, an, ds, ft, te)
        t = time.perf_counter()
        res = an.influence(path, ds, ft, te, args=iargs, overwrite=True)
        extra = {"solves": {k: {kk: v.get(kk) for kk in ("method", "auto", "converged", "iterations")}
                            for k, v in res.solves.items()}}
    elif path == "single_stage":
        obj = tfi.Objective(pre, CausalLMLoss())
        res = tfi.single_stage_influence(obj, ds, lm_test, measurement=completion_log_probability())
        extra = {"solves": {k: {kk: v.get(kk) for kk in ("method", "auto")} for k, v in res.solves.items()}}
    elif path == "fit_factors":
        plan = _path_plan(path, an, ds, ft, te)
        t = time.perf_counter()
        f = an.fit_factors("f", ds, overwrite=True)
        extra = {"blocks": len(f.blocks)}
    elif path in ("self_influence", "self_influence_per_example"):
        method = "ghost" if path == "self_influence" else "per_example"
        si = an.self_influence(path, ds, method=method, overwrite=True)
        extra = {"n": int(len(si))}
    elif path in ("index_build", "index_query"):
        ix = an.build_index("ix", ds, overwrite=path == "index_build")
        extra = {"dim": int(ix.dim), "count": int(ix.count)}
        if path == "index_query":
            saved = os.path.join(out_dir, "scores", "influence")
            if not os.path.exists(os.path.join(saved, "result.json")):
                raise RuntimeError("index_query needs the influence path's saved result (run 'influence' first)")
            result = an.load_scores("influence")
            t = time.perf_counter()
            an.query_index("ix", result, tfi.QueryArgs(top_k=10))   # the first query also builds the projector
            extra["cold_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            top = an.query_index("ix", result, tfi.QueryArgs(top_k=10))
            extra["queries"] = int(np.asarray(result.test_vector).reshape(result.test_vector.shape[0], -1).shape[1])
            extra["top_harmful"] = np.asarray(top.harmful_keys).reshape(-1)[:3].tolist()
    elif path == "presence_step":
        pre.trainable = True
        bb.trainable = True
        pm = tfi.PresenceModel(pre, num_microbatches=4, si_layers=None, tau=1.0)
        pm.compile(optimizer=keras.optimizers.Adam(1e-5), loss=CausalLMLoss())
        steps = max(1, args.sequences // args.batch // 4)
        pm.fit(ds.take(1), epochs=1, verbose=0)
        t = time.perf_counter()
        pm.fit(ds.take(steps), epochs=1, verbose=0)
        extra = {"steps": steps, "epoch_fraction": steps * args.batch / args.sequences}
    elif path == "beam_scoring":
        t, extra = _beam_scoring(name, args, pre, ds, out_dir)
    else:
        raise ValueError(path)
    seconds = time.perf_counter() - t
    if path == "presence_step":   # per-step cost, scaled to one epoch of steps
        seconds = seconds / extra["epoch_fraction"]
    if not plan.items and checked:
        plan = max(checked, key=lambda p: p.total)
        extra["plan_source"] = "the largest plan the library checked during the call"
    return {"ok": True, "seconds": seconds, "peak_rss_mb": _peak_mb(), "rss_before_mb": before,
            "estimated_mb": (before + plan.total / 2 ** 20) if plan.items else None,
            "plan": plan.summary() if plan.items else None, "error": None, **extra}


def _analyzer(name: str, path: str, args: RealSizeArgs) -> tuple:
    """``(LM, backbone, Analyzer)`` of ``path``: the saved weights loaded, the classifier over the frozen backbone
    (case 2, ``influence_updated``: over a moved copy of it)."""
    import keras
    import tf_influence as tfi
    from tf_influence.lm import CausalLMLoss
    pre, bb, clf = _load(name, args)
    if path == "influence_updated":
        clf = _updated_classifier(name, args, bb)
    task = tfi.Task(pre, clf, CausalLMLoss(), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    embedding=["backbone"])
    return pre, bb, tfi.Analyzer(task, os.path.join(_paths_dir(args, name), "analyzer"), progress=False)


def _path_plan(path, an, ds, ft, te):
    """The memory plan of the call ``path`` makes (one of :data:`PLANNED`): what :func:`run_path` records, and what
    ``--replan`` recomputes for a stored run."""
    import tf_influence as tfi
    from tf_influence.kfac import DENSE_FACTOR_MAX, FactorStatistics
    from tf_influence.memory import factor_plan
    if path == "fit_factors":
        return factor_plan(FactorStatistics(an.pretrain_objective, an.pretrain_group(),
                                            dense_factor_max=DENSE_FACTOR_MAX), ds)
    if path == "index_build":          # the projector build_index makes (the calibration reads a few examples)
        from tf_influence.memory import index_plan
        from tf_influence.projection import GradientProjector, calibrate
        group = an.pretrain_group()
        return index_plan(GradientProjector(an.pretrain_objective, group,
                                            calibrate(an.pretrain_objective, ds, group, None)), ds)
    if path == "self_influence":       # the ghost-norm pass (self_influence's default method) over the whole model
        from tf_influence.ghost_norms import GhostNorms
        from tf_influence.memory import ghost_plan
        return ghost_plan(GhostNorms(an.pretrain_objective, tfi.ParameterGroup.from_model(an.task.pretrain_model)), ds)
    if path == "self_influence_per_example":   # the chunk per_example_gradients picks (self_influence's default)
        from tf_influence.gradients import dataset_chunk
        from tf_influence.memory import per_example_plan
        group = an.pretrain_group()
        return per_example_plan(group.size, dataset_chunk(ds, group), group.dtype.size)
    iargs = tfi.InfluenceArgs(case="fixed" if path == "influence" else "updated")
    return an._influence(ds, ft, iargs).memory_plan(te, iargs.test_target)   # the object Analyzer.influence builds


def replan(name: str, path: str, args: RealSizeArgs) -> dict:
    """The current memory plan of a stored path's call, without running it (``--replan``): the plan is a function of
    the models and the arguments only, so a change to the planning code is checked against the peak the stored run
    measured (the computation the plan describes is the same)."""
    _, _, an = _analyzer(name, path, args)
    ds, ft, te, _ = datasets(name, args)
    plan = _path_plan(path, an, ds, ft, te)
    return {"ok": True, "plan_mb": plan.total / 2 ** 20, "plan": plan.summary()}


def _record_checked_plans() -> list:
    """A list that fills with every :class:`~tf_influence.memory.MemoryPlan` the library checks from now on (a
    benchmark-side wrapper of ``MemoryPlan.check``; the library is not changed for it)."""
    from tf_influence.memory import MemoryPlan
    seen, check = [], MemoryPlan.check

    def recording(self, *a, **k):
        seen.append(self)
        return check(self, *a, **k)
    MemoryPlan.check = recording
    return seen


def _beam_scoring(name, args, pre, ds, out_dir):
    """The standalone Beam job (DirectRunner, in process) scoring one shard — every sequence in one
    GZIP TFRecord file of ``tf.train.Example`` — by the influence path's saved test vector; the
    scores are checked against the in-process library call on a few sequences."""
    import numpy as np
    import tensorflow as tf
    from tf_influence.lm import CausalLMLoss
    from tf_influence import scores_io
    from tfx_components import beam_scoring
    saved = os.path.join(out_dir, "scores", "influence")
    if not os.path.exists(os.path.join(saved, "result.json")):
        raise RuntimeError("beam_scoring needs the influence path's saved result (run 'influence' first)")
    root = os.path.join(_paths_dir(args, name), "beam")
    os.makedirs(os.path.join(root, "Split-train"), exist_ok=True)
    pre.compile(loss=CausalLMLoss())
    model_path = os.path.join(root, "model.keras")
    pre.save(model_path)
    shard = os.path.join(root, "Split-train", "data_tfrecord-00000-of-00001.gz")
    with tf.io.TFRecordWriter(shard, options="GZIP") as w:
        for x, y in ds.unbatch():
            feats = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=v.numpy().tolist())) for k, v in x.items()}
            feats["labels"] = tf.train.Feature(int64_list=tf.train.Int64List(value=y.numpy().tolist()))
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    out = os.path.join(root, "scores")
    t = time.perf_counter()
    beam_scoring.main(["--examples", shard, "--model", model_path, "--output", out, "--kind", "influence",
                       "--result", saved, "--batch-size", str(args.batch), "--runner", "DirectRunner",
                       "--direct_running_mode=in_memory", "--direct_num_workers=1"])
    seconds_start = t
    got = scores_io.read_scores(out)
    ref = np.load(os.path.join(saved, "scores.npy"))
    keys = sorted(got)
    vals = np.array([got[k] for k in keys])
    return seconds_start, {"n_scored": len(got), "max_rel_diff_vs_library": float(
        np.max(np.abs(np.sort(vals) - np.sort(ref))) / (np.max(np.abs(ref)) + 1e-30))}


class _Timeline:
    """The worker's resident memory every ``interval`` seconds and the library phase it was in, so a result says
    *where* its peak was, not only how high: ``{"peak_phase", "phases": {phase: peak MB}, "tensorflow_in_use_mb":
    {phase: peak MB that TensorFlow had handed out}, "samples": [[s, MB, phase, TensorFlow MB], …]}`` (at most
    ~400 samples). Phases are marked by wrapping the factor fit's steps, the solves and the scoring (a
    benchmark-side wrapper: the library is not changed for it)."""

    def __init__(self, interval: float = 0.5):
        import threading
        self.interval, self.phase, self.samples = interval, "setup", []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((round(time.perf_counter() - self.t0, 2), round(_rss_mb()), self.phase, _tf_mb()))
            self._stop.wait(self.interval)

    def wrap(self, owner, attr: str, phase: str):
        fn = getattr(owner, attr)
        tl = self

        def wrapped(*a, **k):
            before, tl.phase = tl.phase, phase if isinstance(phase, str) else phase(*a, **k)
            try:
                return fn(*a, **k)
            finally:
                tl.phase = before
        setattr(owner, attr, wrapped)

    def __enter__(self):
        from tf_influence import influence
        from tf_influence.kfac import inverse, statistics
        self.wrap(statistics.FactorStatistics, "add", lambda self_, what, *a, **k: f"factors: {what} pass")
        self.wrap(statistics.FactorStatistics, "take", "factors: take sums")
        self.wrap(statistics, "eigenbases", "factors: eigendecomposition")
        self.wrap(inverse.KFACInverse, "__init__", "solve: inverse set-up")
        self.wrap(inverse.KFACInverse, "__call__", "solve: ekfac apply")
        self.wrap(influence, "_solve", lambda op, b, config, desc, *a, **k: f"solve: {desc}")
        self.wrap(influence, "score_examples", "scoring")
        self.wrap(influence, "test_gradients", "test gradients")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        phases, tf_phases = {}, {}
        for _, mb, ph, tf_mb in self.samples:
            phases[ph] = max(phases.get(ph, 0), mb)
            tf_phases[ph] = max(tf_phases.get(ph, 0), tf_mb or 0)
        step = max(1, len(self.samples) // 400)
        peak = max(self.samples, key=lambda s: s[1])
        return {"peak_phase": peak[2], "peak_sampled_mb": peak[1], "phases": phases,
                "tensorflow_in_use_mb": tf_phases, "tensorflow_peak_mb": _tf_mb("peak"),
                "samples": [list(s) for s in self.samples[::step]]}


def _worker(argv):
    """``--_worker NAME PATH JSON_ARGS OUT``: one process, one path."""
    name, path, raw, out = argv
    from tf_influence import console
    console.tune_openblas()      # before numpy loads OpenBLAS (see console.openblas_coretype)
    args = RealSizeArgs(**json.loads(raw))
    console.quiet(args.verbose)
    timeline = _Timeline()
    try:
        if path == "prepare":
            res = prepare(name, args)
        elif path == "epoch":
            res = {"ok": True, "seconds": train_epoch(name, args)[2]}
        elif path.startswith("replan:"):
            res = replan(name, path.split(":", 1)[1], args)
        else:
            with timeline:
                res = run_path(name, path, args)
            res["timeline"] = timeline.summary()
    except Exception as err:   # noqa: BLE001 — recorded in the result, the run goes on with the next path
        res = {"ok": False, "seconds": None, "peak_rss_mb": _peak_mb(), "error": f"{type(err).__name__}: {err}"[:2000],
               "timeline": timeline.summary()}
    with open(out, "w") as fh:
        json.dump(res, fh, default=str)


def _env() -> dict:
    """The worker's environment: numpy's OpenBLAS told this CPU's kernel set where it misdetects it (as the
    library's entry points do, :func:`tf_influence.console.tune_openblas`) — else the factor fits'
    eigendecompositions run generic kernels, 2.8× slower, and the epochs measured are the BLAS's, not the
    library's."""
    from tf_influence.console import openblas_coretype
    env = dict(os.environ)
    core = openblas_coretype()
    if core and "OPENBLAS_CORETYPE" not in env:
        env["OPENBLAS_CORETYPE"] = core
    return env


def _spawn(name, path, args) -> dict:
    import dataclasses
    out = os.path.join(_paths_dir(args, name), f"{path}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", "benchmarks.real_size", "--_worker", name, path,
           json.dumps(dataclasses.asdict(args)), out]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.timeout, capture_output=not args.verbose, text=True, env=_env())
        rc = proc.returncode
        tail = (proc.stderr or "")[-1500:] if not args.verbose else ""
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": None, "error": f"timed out after {args.timeout} s"}
    if os.path.exists(out):
        with open(out) as fh:
            return json.load(fh)
    how = "killed by the kernel (SIGKILL: out of memory?)" if rc == -9 else f"exited with {rc}"
    return {"ok": False, "seconds": time.perf_counter() - t, "peak_rss_mb": None, "error": f"process {how}: {tail}"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return _worker(argv[1:])
    from benchmarks.common import parse_args
    args = parse_args(RealSizeArgs, argv, __doc__)
    unknown = [m for m in args.models if m not in MODELS] + [p for p in args.paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown model(s) / path(s): {unknown}")
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh).get("models", {})
    from benchmarks.common import code_version
    version = code_version()      # stored with each path's numbers: the page says which code measured them
    if args.replan:
        for name in args.models:
            if not os.path.exists(os.path.join(_paths_dir(args, name), "pretrain.weights.h5")):
                print(f"   {name}: no trained weights in --workdir; training them first (one epoch)", flush=True)
                prep = _spawn(name, "prepare", args)
                if not prep.get("ok", True) or "train_epoch_seconds" not in prep:
                    print(f"   {name}: prepare failed: {prep.get('error')}", flush=True)
                    continue
            for path in [p for p in args.paths if p in PLANNED]:
                stored = results.get(name, {}).get("paths", {}).get(path)
                if not stored or stored.get("rss_before_mb") is None:
                    print(f"   {name} {path}: no stored run to replan", flush=True)
                    continue
                r = _spawn(name, f"replan:{path}", args)
                if not r.get("ok"):
                    print(f"   {name} {path}: replan failed: {r.get('error')}", flush=True)
                    continue
                stored.setdefault("estimated_mb_at_run", stored.get("estimated_mb"))
                stored["estimated_mb"] = stored["rss_before_mb"] + r["plan_mb"]
                stored["plan"] = r["plan"]
                stored["replanned"] = version
                at_run = stored["estimated_mb_at_run"]
                print(f"   {name} {path}: plan {stored['estimated_mb']:.0f} MB (at the run: "
                      f"{'none' if at_run is None else f'{at_run:.0f}'}); measured peak {stored['peak_rss_mb']:.0f} MB",
                      flush=True)
            _write(args.out, results)
        return results
    for name in args.models:
        cfg = MODELS[name]
        print(f"== {name}: vocabulary {cfg['vocab']:,}, {cfg['layers']} × {cfg['width']}, "
              f"{args.sequences} sequences of {args.length} tokens", flush=True)
        saved = os.path.join(_paths_dir(args, name), "prepared.json")
        prep = None
        if args.reuse and os.path.exists(saved):
            with open(saved) as fh:
                prep = json.load(fh)
            if prep.get("sequences") != args.sequences or prep.get("length") != args.length:
                prep = None
        if prep is None:
            prep = _spawn(name, "prepare", args)
            if "train_epoch_seconds" in prep:
                with open(saved, "w") as fh:
                    json.dump({**prep, "sequences": args.sequences, "length": args.length}, fh)
        if not prep.get("ok", True) or "train_epoch_seconds" not in prep:
            print(f"   prepare failed: {prep.get('error')}", flush=True)
            results[name] = {"error": prep.get("error")}
            continue
        entry = results.get(name) if args.reuse and "paths" in results.get(name, {}) else None
        entry = entry or {"n_params": prep["n_params"], "vocab": cfg["vocab"], "n_sequences": args.sequences,
                 "length": args.length, "batch": args.batch, "train_epoch_seconds": prep["train_epoch_seconds"],
                 "layers": cfg["layers"], "width": cfg["width"], "paths": {}}
        print(f"   {prep['n_params']:,} parameters; one training epoch {prep['train_epoch_seconds']:.1f} s, "
              f"peak {prep['peak_rss_mb_train']:.0f} MB", flush=True)
        for path in args.paths:
            paired = [_spawn(name, "epoch", args)] if args.paired_epochs else []
            r = _spawn(name, path, args)
            r["measured"] = version
            paired += [_spawn(name, "epoch", args)] if args.paired_epochs else []
            epoch = prep["train_epoch_seconds"]
            if paired:
                r["paired_epoch_seconds"] = [e.get("seconds") for e in paired]
                if all(e.get("ok") for e in paired):
                    epoch = sum(e["seconds"] for e in paired) / len(paired)
                    r["over_stored_epoch"] = (r["seconds"] / prep["train_epoch_seconds"]
                                              if r.get("ok") and r.get("seconds") is not None else None)
            if r.get("seconds") is not None and r.get("ok"):
                r["over_epoch"] = r["seconds"] / epoch
            else:
                r["over_epoch"] = None
            entry["paths"][path] = r
            if r.get("ok"):
                est = f", plan {r['estimated_mb']:.0f} MB" if r.get("estimated_mb") else ""
                around = (f" (epochs around it: {', '.join(f'{e:.1f}' for e in r['paired_epoch_seconds'] if e)} s)"
                          if r.get("paired_epoch_seconds") else "")
                print(f"   {path:28s} {r['seconds']:8.1f} s  {r['over_epoch']:6.2f} epochs  peak "
                      f"{r['peak_rss_mb']:7.0f} MB{est}{around}", flush=True)
            else:
                print(f"   {path:28s} FAILED: {str(r.get('error'))[:300]}", flush=True)
            results[name] = entry
            _write(args.out, results)
        results[name] = entry
        _write(args.out, results)
    return results


def _write(path, results):
    import platform
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = {}
    if os.path.exists(path):              # the results page's notes, written by hand, stay
        with open(path) as fh:
            kept = {k: v for k, v in json.load(fh).items() if k not in ("machine", "models")}
    with open(path, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPU cores, {platform.machine()}", "models": results, **kept}, fh,
                  indent=1, default=str)


if __name__ == "__main__":
    main()
