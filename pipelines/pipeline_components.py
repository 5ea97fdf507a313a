"""Pipeline glue components (Python-function components): random scores for the random-drop
control, and the accuracy comparison that closes ``influence_pipeline``."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from tf_influence import scores_io
from tfx_components import beam_scoring, common
from tfx_components.artifacts import InfluenceScores, set_scores_metadata


def _predict(model_artifact, x):
    """Outputs of the Keras model of a Model artifact (``Format-Serving/model.keras``)."""
    return beam_scoring.load_keras_model(common.model_path(model_artifact)).predict(x, verbose=0)


def _save_report(report, out: dict):
    with tf.io.gfile.GFile(os.path.join(report.uri, "comparison.json"), "w") as fh:
        fh.write(json.dumps(out, indent=1))
    report.set_string_custom_property("comparison", json.dumps(out, sort_keys=True))


@component
def RandomScores(examples: InputArtifact[standard_artifacts.Examples], scores: OutputArtifact[InfluenceScores],
                 seed: Parameter[int] = 0, key_feature: Parameter[str] = ""):
    """Uniform random scores for every example (the "drop a random 10 %" control), keyed like the
    scorers key them: by ``key_feature``, or (empty) by file and position."""
    from tfx_components import example_io
    splits = artifact_utils.decode_split_names(examples.split_names)
    rng = np.random.default_rng(seed)
    for split in splits:
        keys = []
        for f in common.split_files(examples, split):
            keys += example_io.batch_keys(common.read_records([f], f), key_feature or None, f, file=f)
        scores_io.write_scores(os.path.join(scores.uri, f"Split-{split}"), keys, rng.random(len(keys)))
    set_scores_metadata(scores, splits, "random", key_feature=key_feature or None)


def refinetuned_heads(model, x_train, y_train, x_test, y_test, seeds: int, steps: int, batch: int = 64,
                      learning_rate: float = 1e-2, l2: float = 1e-4) -> list:
    """``[(test loss, test accuracy)]`` of ``seeds`` new finetuning heads on ``model``'s frozen embedding
    (case 'fixed'), each initialised and shuffled from its own seed and trained as the pipeline's Trainer
    trains one (Adam, ``steps`` batches of ``batch``) — on the embedding's features, computed once."""
    from model_zoo import cnn
    from pipelines.trainer_module import FINETUNE_HEAD_SEED_OFFSET
    emb = model.get_layer("embedding")
    f_train = emb.predict(x_train, verbose=0)
    f_test = emb.predict(x_test, verbose=0)
    n_classes = int(model.output_shape[-1])
    out = []
    for seed in range(seeds):
        keras.utils.set_random_seed(seed + FINETUNE_HEAD_SEED_OFFSET)
        head = cnn.build_head(f_train.shape[1], n_classes, l2=l2, name="finetune_head")
        head.compile(optimizer=keras.optimizers.Adam(learning_rate),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ds = tf.data.Dataset.from_tensor_slices((f_train, y_train)).shuffle(len(f_train), seed=seed).repeat().batch(
            batch, drop_remainder=True)
        head.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
        logits = head.predict(f_test, verbose=0)
        loss = keras.losses.sparse_categorical_crossentropy(y_test, logits, from_logits=True)
        out.append((float(np.mean(loss)), float(np.mean(np.argmax(logits, 1) == y_test))))
    return out


def comparison_page(out: dict, path: str) -> str:
    """The comparison as a page (``tf_influence.report``): test loss — what the scores predict — and accuracy
    of each arm over the finetuning seeds, as points with their mean, and the table."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from tf_influence.report import Report
    arms = [a for a in ("original", "drop_top", "drop_random") if a in out]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, metric, label in ((axes[0], "losses", "finetuning test loss"), (axes[1], "accuracies", "test accuracy")):
        for i, a in enumerate(arms):
            v = np.asarray(out[a][metric])
            ax.scatter(np.full(len(v), i) + np.linspace(-0.08, 0.08, len(v)), v, s=14, color="#555")
            ax.errorbar(i + 0.22, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="o", color="#d33")
        ax.set_xticks(range(len(arms)), arms)
        ax.set_ylabel(label)
    rep = Report("What dropping the most harmful pretraining examples did",
                 subtitle=f"{out['n_test']} test digits; {out['seeds']} finetuning seeds per arm")
    rep.add_figure("Test loss (what the scores predict) and accuracy, per finetuning seed", fig,
                   "Grey: one finetuning head per seed on the arm's pretrained embedding; red: mean ± standard "
                   "deviation. The influence scores predict the change of the test loss.")
    rep.add_table("Per arm", [{"arm": a, "test loss (mean ± sd)": f"{out[a]['loss_mean']:.4f} ± {out[a]['loss_std']:.4f}",
                               "accuracy (mean ± sd)": f"{100 * out[a]['accuracy_mean']:.2f} ± "
                                                       f"{100 * out[a]['accuracy_std']:.2f} %",
                               "pipeline's own model: loss / accuracy": f"{out[a]['loss']:.4f} / "
                                                                        f"{100 * out[a]['accuracy']:.2f} %"}
                              for a in arms])
    return rep.write(path)


@component
def CompareModels(test_examples: InputArtifact[standard_artifacts.Examples],
                  original: InputArtifact[standard_artifacts.Model],
                  dropped_top: InputArtifact[standard_artifacts.Model],
                  dropped_random: InputArtifact[standard_artifacts.Model],
                  report: OutputArtifact[standard_artifacts.ModelEvaluation],
                  feature_spec: Parameter[str], test_split: Parameter[str] = "test", train_split: Parameter[str] = "train",
                  seeds: Parameter[int] = 5, finetune_steps: Parameter[int] = 400):
    """Finetuning test loss (what the influence scores predict) and accuracy of the three arms: the
    pipeline's finetuned model of each, and ``seeds`` new finetuning heads on each arm's frozen pretrained
    embedding (:func:`refinetuned_heads`), with their mean and spread; ``comparison.html`` shows them."""
    spec = beam_scoring.parse_feature_spec(feature_spec)
    desc = f"Examples artifact {test_examples.uri}"
    _, x, y = beam_scoring.decode_batch(common.read_split(test_examples, test_split), spec, desc)
    _, xt, yt = beam_scoring.decode_batch(common.read_split(test_examples, train_split), spec, desc)
    out = {}
    for name, m in (("original", original), ("drop_top", dropped_top), ("drop_random", dropped_random)):
        model = beam_scoring.load_keras_model(common.model_path(m))
        logits = model.predict(x, verbose=0)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        runs = refinetuned_heads(model, xt, yt, x, y, seeds, finetune_steps)
        losses, accs = [r[0] for r in runs], [r[1] for r in runs]
        out[name] = {"accuracy": float(np.mean(np.argmax(logits, 1) == y)), "loss": float(np.mean(loss)),
                     "loss_mean": float(np.mean(losses)), "loss_std": float(np.std(losses, ddof=1)) if seeds > 1 else 0.0,
                     "accuracy_mean": float(np.mean(accs)),
                     "accuracy_std": float(np.std(accs, ddof=1)) if seeds > 1 else 0.0,
                     "losses": losses, "accuracies": accs}
    out["n_test"] = int(len(y))
    out["seeds"] = int(seeds)
    page = comparison_page(out, os.path.join(report.uri, "comparison.html"))
    report.set_string_custom_property("report_path", page)
    _save_report(report, out)


@component
def CompareLMs(examples: InputArtifact[standard_artifacts.Examples],
               uniform: InputArtifact[standard_artifacts.Model],
               presence_sequential: InputArtifact[standard_artifacts.Model],
               presence: InputArtifact[standard_artifacts.Model],
               filtered: InputArtifact[standard_artifacts.Examples],
               report: OutputArtifact[standard_artifacts.ModelEvaluation],
               feature_spec: Parameter[str], test_split: Parameter[str] = "test"):
    """Held-out clean loss of the three language models, and how much injected noise the filter kept."""
    spec = beam_scoring.parse_feature_spec(feature_spec)
    _, x, y = beam_scoring.decode_batch(common.read_split(examples, test_split), spec,
                                        f"Examples artifact {examples.uri}")
    out = {}
    for name, m in (("uniform", uniform), ("presence_sequential", presence_sequential), ("presence", presence)):
        loss = keras.losses.sparse_categorical_crossentropy(y, _predict(m, x), from_logits=True)
        out[name] = {"heldout_loss": float(np.mean(loss))}
    keys_all, _, _ = beam_scoring.decode_batch(common.read_split(examples, "train"), spec, "pool")
    keys_kept, _, _ = beam_scoring.decode_batch(common.read_split(filtered, "train"), spec, "kept")
    noise = lambda ks: sum(k.startswith(b"noise-") for k in ks)  # noqa: E731
    out["filter"] = {"pool": len(keys_all), "kept": len(keys_kept), "noise_in_pool": noise(keys_all),
                     "noise_kept": noise(keys_kept)}
    _save_report(report, out)
