"""Reading ``tf.train.Example``s as a Keras model's inputs: feature specs, decoding, example
identity, model and loss loading — the I/O every component, Beam job and CLI of tf-influence shares.

A **feature spec** says how one example becomes the model's ``(x, y)`` and which feature, if any, is
its key. It is a JSON-able dict in one of two forms:

* ``{"x": {"name", "shape", "dtype"="float32"}, "y": {"name", "shape"=[], "dtype"="int64"}, "key"}``
  — a single-input model (the hand-written form);
* ``{"inputs": {<model input name>: {"name", "shape", "dtype"}, ...}, "y": {...}, "key",
  "transform_graph"}`` — every named input of a multi-input / dict-input model (TFX tutorial models,
  keras-hub's ``token_ids`` + ``padding_mask``), usually **derived** by :func:`derive_feature_spec`
  from the model's own inputs and the pipeline's Schema or Transform graph rather than written by
  hand. With ``"transform_graph"`` (a Transform output directory) the examples are raw and pass
  through that graph first, as they do at serving time.

``"key"`` names the example's identity feature (bytes, or int64 such as a CSV ID column). Without
one (``None``, the default) an example is identified by its file and position,
``b"<file name>:<record index>"`` (:func:`record_key`) — stable for a given Examples artifact, and
what ScoreFilter matches when it reads the same artifact.

Example (a two-input model, features derived from the first example of the data)::

    >>> import keras, numpy as np, tensorflow as tf
    >>> from tfx_components import example_io
    >>> a, b = keras.Input((1,), name="a"), keras.Input((2,), name="b")
    >>> model = keras.Model([a, b], keras.layers.Dense(3)(keras.layers.concatenate([a, b])))
    >>> f = lambda **kw: tf.train.Example(features=tf.train.Features(feature={
    ...     k: tf.train.Feature(float_list=tf.train.FloatList(value=v)) if isinstance(v[0], float)
    ...     else tf.train.Feature(int64_list=tf.train.Int64List(value=v)) for k, v in kw.items()})).SerializeToString()
    >>> records = [f(a=[0.5], b=[1.0, 2.0], label=[2]), f(a=[1.5], b=[3.0, 4.0], label=[0])]
    >>> spec = example_io.derive_feature_spec(model, sample_record=records[0])
    >>> spec["y"]["name"], sorted(spec["inputs"])
    ('label', ['a', 'b'])
    >>> keys, x, y = example_io.decode_batch(records, spec, "demo", file="/data/part-0.gz")
    >>> keys, x["b"].tolist(), y.tolist()
    ([b'part-0.gz:0', b'part-0.gz:1'], [[1.0, 2.0], [3.0, 4.0]], [2, 0])
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

#: The feature spec form with every named input of the model.
INPUTS = "inputs"


# --------------------------------------------------------------------------- the hand-written form

def parse_feature_spec(spec) -> dict:
    """A feature spec (dict or JSON string, either form above) → validated dict with defaults.

    ``"key"`` absent or ``None`` means the file-and-position identity (:func:`record_key`)."""
    if spec is None:
        raise ValueError("no feature spec: give one, or derive it from the model and a Schema / Transform graph "
                         "(derive_feature_spec)")
    spec = json.loads(spec) if isinstance(spec, str) else json.loads(json.dumps(spec))
    if not isinstance(spec, dict):
        raise ValueError(f"a feature spec is a JSON object, got {spec!r}")
    unknown = sorted(set(spec) - {"x", INPUTS, "y", "key", "transform_graph"})
    if unknown:
        raise ValueError(f"feature spec: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown} (known: x or "
                         f"inputs, y, key, transform_graph)")
    if ("x" in spec) == (INPUTS in spec):
        raise ValueError(f"feature spec needs exactly one of 'x' (one input) or 'inputs' (named inputs); got {spec}")
    if "y" not in spec or "name" not in spec["y"]:
        raise ValueError(f"feature spec needs 'y': {{'name': ...}}; got {spec}")
    parts = [spec["x"]] if "x" in spec else list(spec[INPUTS].values())
    if INPUTS in spec and not spec[INPUTS]:
        raise ValueError("feature spec: 'inputs' is empty")
    for part in parts:
        if "name" not in part:
            raise ValueError(f"feature spec: an input needs its feature 'name'; got {part}")
        part.setdefault("dtype", "float32")
        part.setdefault("shape", [])
    spec["y"].setdefault("dtype", "int64")
    spec["y"].setdefault("shape", [])
    spec.setdefault("key", None)
    spec.setdefault("transform_graph", None)
    return spec


def record_key(path: str, index: int) -> bytes:
    """The identity of the ``index``-th record of file ``path`` when examples have no key feature:
    ``b"<file name>:<index>"`` (the file's name within its split folder)."""
    return f"{os.path.basename(path)}:{int(index)}".encode()


def example_key(feats, key_feature: str, desc: str = "examples") -> bytes:
    """The identity of one example: its ``key_feature`` as bytes — a bytes feature as is, an int64
    feature (e.g. a CSV ID column) as its decimal digits. Anything else fails naming the feature and
    ``desc`` (the file or artifact)."""
    feat = feats.get(key_feature)
    if feat is None:
        raise ValueError(f"{desc}: an example has no key feature '{key_feature}' (it has {sorted(feats)}); "
                         "name the example's identity with key_feature, or leave it unset to identify examples "
                         "by file and position")
    if feat.bytes_list.value:
        return feat.bytes_list.value[0]
    if feat.int64_list.value:
        return str(int(feat.int64_list.value[0])).encode()
    kind = "float" if feat.float_list.value else "empty"
    raise ValueError(f"{desc}: the key feature '{key_feature}' of an example is {kind}; a key is a bytes or "
                     "int64 feature with one value")


def batch_keys(records, key_feature: str | None, desc: str, file: str | None = None, start: int = 0) -> list:
    """Keys of serialized examples: their ``key_feature``, or — ``None`` — :func:`record_key` of ``file``
    (records ``start``, ``start + 1``, … of it; ``file=None``: ``desc`` stands for the file)."""
    if key_feature:
        import tensorflow as tf
        return [example_key(tf.train.Example.FromString(r).features.feature, key_feature, desc) for r in records]
    return [record_key(file or desc, start + i) for i in range(len(records))]


def record_batches(path, batch_size, threads=None):
    """Batches of a TFRecord file's serialized records (TensorFlow's C++ reader; GZIP by the
    ``.gz`` / ``.gzip`` extension); a corrupt or truncated file fails naming the file.
    ``threads``: the size of tf.data's own thread pool (which intra-op settings do not limit)."""
    import tensorflow as tf
    gz = path.endswith((".gz", ".gzip"))
    try:
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if gz else "").batch(batch_size)
        if threads:
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = int(threads)
            opts.threading.max_intra_op_parallelism = 1
            ds = ds.with_options(opts)
        for batch in ds.as_numpy_iterator():
            yield list(batch)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
        raise IOError(f"reading {path}: corrupt or truncated TFRecord file ({e.message.splitlines()[0]})") from None


def keyed_batches(path: str, key_feature: str | None, desc: str, batch_size: int = 1024):
    """``(keys, records)`` of each batch of a TFRecord file, in order (:func:`record_batches`), the keys
    as :func:`batch_keys` gives them: the key feature, or the file-and-position identity."""
    start = 0
    for records in record_batches(path, batch_size):
        yield batch_keys(records, key_feature, desc, file=path, start=start), records
        start += len(records)


# --------------------------------------------------------------------------- decoding

def decode_batch(records, spec, desc: str = "examples", file: str | None = None, start: int = 0):
    """Serialized ``tf.Example``s → ``(keys, x, y)`` numpy values: ``x`` one array (``"x"`` form) or
    a dict by model input name (``"inputs"`` form). Raises naming ``desc`` and the feature when a
    feature is missing or has the wrong number of values. ``file`` / ``start``: where the records
    come from, for the file-and-position keys."""
    spec = spec if isinstance(spec, dict) and "transform_graph" in spec else parse_feature_spec(spec)
    records = list(records)
    keys = batch_keys(records, spec.get("key"), desc, file, start)
    if "x" in spec:
        return (keys, *_decode_single(records, spec, desc))
    x, y = _decode_inputs(records, spec, desc)
    return keys, {k: v.numpy() for k, v in x.items()}, y.numpy()


def _decode_single(records, spec, desc):
    import tensorflow as tf
    xs, ys = [], []
    for rec in records:
        feats = tf.train.Example.FromString(rec).features.feature
        for name in (spec["x"]["name"], spec["y"]["name"]):
            if name not in feats:
                raise ValueError(f"{desc}: an example has no feature '{name}' (it has {sorted(feats)})")
        xs.append(_values(feats[spec["x"]["name"]]))
        ys.append(_values(feats[spec["y"]["name"]]))
    return _stack(xs, spec["x"], desc), _stack(ys, spec["y"], desc)


def _stack(values, part: dict, desc: str):
    """One feature of every example as ``[n, *shape]``; names the feature when its size is wrong."""
    shape = [int(d) for d in part["shape"]]
    want = int(np.prod(shape)) if shape else 1
    sizes = {len(v) for v in values}
    if sizes != {want}:
        raise ValueError(f"{desc}: feature '{part['name']}' has {sorted(sizes)} value(s) per example but the feature "
                         f"spec's shape {shape} needs {want}")
    return np.asarray(values, dtype=part["dtype"]).reshape([len(values)] + shape)


def _values(feature):
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


_TRANSFORMS: dict = {}


def transform_output(uri: str):
    """The ``tft.TFTransformOutput`` of a Transform graph directory (loaded once per process)."""
    if uri not in _TRANSFORMS:
        import tensorflow_transform as tft
        _TRANSFORMS[uri] = tft.TFTransformOutput(uri)
    return _TRANSFORMS[uri]


def _parsing_kind(dtype: str):
    import tensorflow as tf
    d = np.dtype(dtype) if dtype not in ("string", "bytes") else None
    if d is None:
        return tf.string
    return tf.float32 if np.issubdtype(d, np.floating) else tf.int64


def parse_fn(spec: dict):
    """A TensorFlow function ``records [n] → (x, y)`` for the ``"inputs"`` form (usable eagerly and
    inside ``tf.data``): ``tf.io.parse_example`` with the spec's shapes — through the Transform
    graph first when the spec names one — then the model's dtypes."""
    import tensorflow as tf
    names = [p["name"] for p in spec[INPUTS].values()] + [spec["y"]["name"]]
    if spec.get("transform_graph"):
        tft_out = transform_output(spec["transform_graph"])
        raw_spec = tft_out.raw_feature_spec()
        layer = tft_out.transform_features_layer()

        def features(records):
            return layer(tf.io.parse_example(records, raw_spec))
    else:
        parsing = {}
        for p in list(spec[INPUTS].values()) + [spec["y"]]:
            parsing[p["name"]] = tf.io.FixedLenFeature([int(d) for d in p["shape"]], _parsing_kind(p["dtype"]))

        def features(records):
            return tf.io.parse_example(records, parsing)

    def parse(records):
        f = features(records)
        missing = [n for n in names if n not in f]
        if missing:
            raise ValueError(f"the Transform graph's outputs have no feature(s) {missing} (it has {sorted(f)})")
        x = {k: _as(f[p["name"]], p) for k, p in spec[INPUTS].items()}
        return x, _as(f[spec["y"]["name"]], spec["y"])
    return parse


def _as(t, part):
    import tensorflow as tf
    if isinstance(t, tf.SparseTensor):
        t = tf.sparse.to_dense(t)
    shape = [int(d) for d in part["shape"]]
    if part["dtype"] not in ("string", "bytes"):
        t = tf.cast(t, part["dtype"])
    return tf.reshape(t, [-1, *shape])


_PARSERS: dict = {}


def _decode_inputs(records, spec, desc):
    import tensorflow as tf
    key = json.dumps(spec, sort_keys=True)
    if key not in _PARSERS:
        _PARSERS[key] = parse_fn(spec)
    try:
        return _PARSERS[key](tf.constant(records, tf.string))
    except tf.errors.InvalidArgumentError as err:   # e.g. "Feature: x (data type: float) is required but could not be found"
        raise ValueError(f"{desc}: {err.message.splitlines()[0]}") from None


def dataset(records_ds, spec):
    """``tf.data`` of batched serialized records → batched ``(x, y)``, either form."""
    import tensorflow as tf
    if "x" in spec:
        parsing = {p["name"]: tf.io.FixedLenFeature([int(d) for d in p["shape"]], _parsing_kind(p["dtype"]))
                   for p in (spec["x"], spec["y"])}

        def single(records):
            f = tf.io.parse_example(records, parsing)
            return (tf.cast(f[spec["x"]["name"]], spec["x"]["dtype"]), tf.cast(f[spec["y"]["name"]], spec["y"]["dtype"]))
        return records_ds.map(single)
    return records_ds.map(parse_fn(spec))


# --------------------------------------------------------------------------- deriving the spec

def model_inputs(model) -> dict:
    """``{input name: (shape without the batch axis, dtype)}`` of a Keras model's inputs."""
    out = {}
    for t in model.inputs:
        out[t.name] = ([d for d in t.shape[1:]], str(getattr(t.dtype, "name", t.dtype)))
    return out


def _kinds_from_record(record: bytes) -> dict:
    """``{feature: (dtype, number of values)}`` of one serialized example."""
    import tensorflow as tf
    out = {}
    for name, feat in tf.train.Example.FromString(record).features.feature.items():
        kind = feat.WhichOneof("kind")
        dtype = {"float_list": "float32", "int64_list": "int64", "bytes_list": "string"}.get(kind, "float32")
        out[name] = (dtype, len(getattr(feat, kind).value) if kind else 0)
    return out


def _kinds_from_parsing_spec(parsing: dict) -> dict:
    import tensorflow as tf
    out = {}
    for name, f in parsing.items():
        dtype = "string" if f.dtype == tf.string else ("int64" if f.dtype.is_integer else "float32")
        shape = list(f.shape) if isinstance(f, tf.io.FixedLenFeature) else None
        out[name] = (dtype, int(np.prod(shape)) if shape is not None else None, shape)
    return out


def load_schema(uri: str):
    """The ``Schema`` proto of a SchemaGen / ImportSchemaGen artifact directory (or a ``schema.pbtxt`` path)."""
    import tensorflow as tf
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx.utils import io_utils
    path = uri if uri.endswith(".pbtxt") else os.path.join(uri, "schema.pbtxt")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Schema artifact {uri}: no schema.pbtxt")
    return io_utils.parse_pbtxt_file(path, schema_pb2.Schema())


def derive_feature_spec(model, *, schema=None, transform_graph: str | None = None, sample_record: bytes | None = None,
                        label_key: str | None = None, key_feature: str | None = None, desc: str = "examples") -> dict:
    """The ``"inputs"`` feature spec of ``model`` — every named input — from what the pipeline
    already knows, the way TFX's Trainer reads its data:

    * ``transform_graph`` (a Transform output directory): features and label are the graph's
      *transformed* features. If ``sample_record`` (one example of the data to be read) lacks the
      model's inputs, the examples are raw and the spec sends them through the graph;
    * else ``schema`` (a ``Schema`` proto, or a SchemaGen artifact directory): its parsing spec;
    * else the features of ``sample_record`` itself.

    Each model input is the feature of the same name; its shape is the model's (a
    ``[seq_len]`` sequence feature included) where known, else the schema's. The label is
    ``label_key``, or — when not given — the one feature left over once the model's inputs and
    ``key_feature`` are taken (an error lists the candidates when there are several)."""
    available, source = None, None
    if transform_graph:
        tft_out = transform_output(transform_graph)
        available = _kinds_from_parsing_spec(tft_out.transformed_feature_spec())
        source = f"the Transform graph {transform_graph} (transformed features)"
    elif schema is not None:
        from tensorflow_transform.tf_metadata import schema_utils
        schema = load_schema(schema) if isinstance(schema, str) else schema
        available = _kinds_from_parsing_spec(schema_utils.schema_as_feature_spec(schema).feature_spec)
        source = "the Schema"
    elif sample_record is not None:
        available = {k: (d, n, [n] if n != 1 else []) for k, (d, n) in _kinds_from_record(sample_record).items()}
        source = f"the first example of {desc}"
    else:
        raise ValueError("derive_feature_spec needs a Schema, a Transform graph or an example to read the features from")
    inputs = model_inputs(model)
    missing = [n for n in inputs if n not in available]
    if missing:
        raise ValueError(f"model '{model.name}' has input(s) {missing} that {source} does not have as features "
                         f"(features: {sorted(available)}); name the model's Input layers after the features")
    spec_inputs = {}
    for name, (shape, dtype) in inputs.items():
        fdtype, count, fshape = available[name]
        if all(d is not None for d in shape):
            want = int(np.prod(shape)) if shape else 1
            if count is not None and count != want:
                raise ValueError(f"{source}: feature '{name}' has {count} value(s) per example but model "
                                 f"'{model.name}' takes shape {shape}")
        elif fshape is not None:
            shape = fshape
        else:
            raise ValueError(f"model '{model.name}' input '{name}' has an unknown shape {shape} and {source} gives no "
                             "fixed shape for it; build the model with a fixed sequence length")
        out_dtype = dtype if fdtype != "string" else "string"
        spec_inputs[name] = {"name": name, "shape": [int(d) for d in shape], "dtype": out_dtype}
    taken = set(inputs) | ({key_feature} if key_feature else set())
    if label_key is None:
        left = sorted(set(available) - taken)
        if len(left) != 1:
            raise ValueError(f"{source}: cannot tell the label of model '{model.name}': "
                             f"{'no feature is' if not left else f'features {left} are'} left besides the model's "
                             f"inputs{' and the key' if key_feature else ''}; name it with label_key")
        label_key = left[0]
    if label_key not in available:
        raise ValueError(f"{source} has no label feature '{label_key}' (features: {sorted(available)})")
    ldtype, _, lshape = available[label_key]
    y = {"name": label_key, "shape": [int(d) for d in (lshape if lshape is not None else [])],
         "dtype": "int64" if ldtype == "int64" else ("string" if ldtype == "string" else "float32")}
    spec = {INPUTS: spec_inputs, "y": y, "key": key_feature, "transform_graph": None}
    if transform_graph and sample_record is not None:
        have = _kinds_from_record(sample_record)
        if not all(p["name"] in have for p in spec_inputs.values()):
            spec["transform_graph"] = transform_graph    # raw examples: through the graph, as at serving time
    return parse_feature_spec(spec)


def resolve_feature_spec(model, feature_spec=None, *, schema=None, transform_graph=None, sample_record=None,
                         label_key=None, key_feature=None, desc="examples") -> dict:
    """The feature spec a component uses: the hand-written ``feature_spec`` if given (its ``key``
    defaulting to ``key_feature``), else :func:`derive_feature_spec`."""
    if feature_spec:
        spec = parse_feature_spec(feature_spec)
        if key_feature and spec.get("key") not in (None, key_feature):
            raise ValueError(f"key_feature '{key_feature}' disagrees with the feature spec's key '{spec['key']}'")
        if key_feature:
            spec["key"] = key_feature
        return spec
    return derive_feature_spec(model, schema=schema, transform_graph=transform_graph, sample_record=sample_record,
                               label_key=label_key, key_feature=key_feature, desc=desc)


# --------------------------------------------------------------------------- models and losses

def load_keras_model(path: str):
    """A Keras model from a ``.keras`` file, or from a directory holding ``model.keras``
    (e.g. a TFX Model artifact's ``Format-Serving`` directory)."""
    import keras
    import tensorflow as tf
    candidates = [path] if path.endswith(".keras") else [os.path.join(path, "model.keras"),
                                                         os.path.join(path, "Format-Serving", "model.keras")]
    for c in candidates:
        if tf.io.gfile.exists(c):
            import tf_influence.lm  # noqa: F401 — registers CausalLMLoss, so a saved LM's loss deserialises
            with warnings.catch_warnings():
                # scoring never uses the optimizer: a saved optimizer whose slots were not built is harmless
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                # a keras-hub Task (GPT2CausalLM, …) overrides compile(): Keras does not restore its compile
                # configuration and the constructor's default loss stands — we restore the saved loss below
                warnings.filterwarnings("ignore", message=r"`compile\(\)` was not called as part of model loading")
                model = keras.models.load_model(c, compile=True)
            _restore_saved_loss(model, c)
            return model
    raise FileNotFoundError(f"no Keras model file at {path} (looked for {candidates}); add "
                            "`tfx_components.saving.save_for_influence(model, fn_args)` to the Trainer's run_fn "
                            "(Keras 3 cannot rebuild trainable layers from the SavedModel alone)")


def saved_loss(path: str):
    """The loss a ``.keras`` archive was compiled with (its ``config.json``'s ``compile_config``), or None."""
    import zipfile

    import keras
    import tensorflow as tf
    try:
        with tf.io.gfile.GFile(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            cfg = json.loads(zf.read("config.json"))
    except (KeyError, OSError, zipfile.BadZipFile, ValueError):
        return None
    loss = (cfg.get("compile_config") or {}).get("loss")
    if loss is None:
        return None
    return keras.losses.deserialize(loss) if isinstance(loss, dict) else keras.losses.get(loss)


def _restore_saved_loss(model, path: str):
    """Re-attach the saved loss where loading replaced it (keras-hub's ``CausalLM`` compiles itself with
    ``SparseCategoricalCrossentropy`` and Keras skips the saved compile configuration of a model whose
    ``compile()`` is custom): scoring a causal LM saved with ``CausalLMLoss`` must use that loss, not a
    default one that fails on its ignored positions (or silently counts them)."""
    want = saved_loss(path)
    have = getattr(model, "loss", None)
    if want is None or (have is not None and type(have) is type(want) and
                        getattr(have, "get_config", dict)() == getattr(want, "get_config", dict)()):
        return
    model.compile(loss=want)


def set_worker_threads(threads: int | None):
    """TensorFlow's intra- and inter-op pools of a worker process at ``threads`` (one process per core,
    as Dataflow's Python workers: one thread each); no-op for None, or once TensorFlow has started in
    this process (in-process runners)."""
    if not threads:
        return
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    except RuntimeError:
        pass


def resolve_loss(model, loss_config):
    """The loss to differentiate: ``loss_config`` (a Keras loss name or config, JSON) or the model's compiled loss."""
    import keras
    if loss_config:
        cfg = json.loads(loss_config) if isinstance(loss_config, str) else loss_config
        return keras.losses.deserialize(cfg) if isinstance(cfg, dict) else keras.losses.get(cfg)
    loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(f"model '{model.name}' was saved without a compiled loss; pass the loss explicitly")
    return loss


@dataclass(frozen=True)
class ExampleSource:
    """Which examples and model a Beam job reads, and how an example becomes the model's ``(x, y)``
    (the flags the scoring and index jobs share, generated by :mod:`tf_influence.cli`)."""

    examples: str = field(metadata={
        "help": "file pattern of GZIP TFRecord tf.train.Examples (e.g. 'artifact/Split-train/*'); one worker "
                "task per file, so write large corpora in shards"})
    model: str = field(metadata={
        "help": "a .keras file, or a directory holding model.keras (a TFX Model artifact or its Format-Serving "
                "folder; see tfx_components.saving.save_for_influence)"})
    feature_spec: Optional[str] = field(default=None, metadata={
        "help": "hand-written spec, JSON: {\"x\": {\"name\", \"shape\", \"dtype\"}, \"y\": {...}, \"key\"} for one "
                "input, or {\"inputs\": {<input name>: {...}}, \"y\": {...}} for named inputs; None: derived from "
                "--transform-graph / --schema / the first example and the model's named inputs"})
    schema: Optional[str] = field(default=None, metadata={
        "help": "a Schema (schema.pbtxt, or a SchemaGen artifact folder): the features' types and shapes"})
    transform_graph: Optional[str] = field(default=None, metadata={
        "help": "a Transform graph folder: the model's inputs are its transformed features; raw examples pass "
                "through the graph first"})
    label_key: Optional[str] = field(default=None, metadata={
        "help": "the label feature (None: the one feature that is neither a model input nor the key)"})
    key_feature: Optional[str] = field(default=None, metadata={
        "help": "a bytes or int64 feature identifying each example (None: examples are identified as "
                "'<file name>:<record index>')"})
    loss: Optional[str] = field(default=None, metadata={
        "help": "Keras loss config JSON (None: the model's compiled loss)"})
    batch_size: int = field(default=256, metadata={"help": "examples per library call"})
    worker_threads: Optional[int] = field(default=None, metadata={
        "help": "TensorFlow threads per worker process (None: all cores; 1 with one worker per core)"})

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"ExampleSource.batch_size must be ≥ 1, got {self.batch_size}")
        if self.worker_threads is not None and int(self.worker_threads) < 1:
            raise ValueError(f"ExampleSource.worker_threads must be ≥ 1 or None, got {self.worker_threads}")
