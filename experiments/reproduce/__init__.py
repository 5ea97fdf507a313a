"""Reproduction of the multi-stage paper's experiments on the embedded digits data.

    python -m experiments.reproduce [--quick] [--only case1_fixed,cleansing,...] [--out reports/reproduction]

Writes ``<out>/results.json`` (one object per experiment; keys below), ``<out>/report.md``
(paper value vs ours, with wall times) and one PNG per figure. Leave-one-out results are
cached in ``<out>/loo_cache.json`` so a rerun only recomputes what changed.

Experiments (keys of results.json):

* ``case1_fixed`` — Section 4.1, embedding fixed: Pearson / Spearman between predicted and
  leave-one-out loss differences over the 100 largest-|score| pretraining examples (Figure 2a).
* ``case2_updated`` — the same with the embedding finetuned, α = 0.01 (Figure 2b).
* ``identity_baseline`` — every inverse Hessian replaced by I, on case 1's examples (Figure 2c).
* ``loss_baseline`` — pretraining loss as the score, on case 1's examples (rebuttal).
* ``cleansing`` — Section 4.2: drop the top 10 % positive-score pretraining examples, retrain
  both stages; finetune test accuracy vs the original and vs dropping a random 10 % (seeds).
* ``task_similarity`` — Section 4.3: mean |score| with the finetuning task equal to the
  pretraining task vs a different task.
* ``finetune_size`` — Section 4.4: mean |score| with n vs 3n finetuning examples and steps.
* ``cross_task`` — rebuttal: scores computed for finetune task (4, 5, 6), correlated with the
  leave-one-out loss differences of finetune task (7, 8, 9).
* ``figure3`` — misclassified finetune test images next to the pretraining image with the
  largest positive score (Figure 3/4 of the paper).
* ``lds`` — the linear datamodeling score of every method (:mod:`tf_influence.evaluation.lds`):
  random halves of the pretraining set (of the finetuning set for single-stage influence), both
  stages retrained on each — ``methods``: **from scratch** with several seeds (TRAK's protocol),
  with the noise floor of that ground truth (seed-to-seed LDS); ``methods_continue``: the
  leave-one-out rows' warm-started gradient-descent continuation (deterministic) — Spearman per
  test point with a 95 % CI; retrains run as a Beam job (``lds.png``).

Every correlation row carries ``noise_floor``: its protocol is deterministic (no seed noise), so
the floor is the leave-one-out difference of random pretraining examples next to that of the
top-scored ones (``random_over_top``).
* ``text_multistage`` — the paper's setting in miniature on text (:mod:`experiments.text_multistage`):
  a transformer character LM pretrained on English prose and code, finetuned (frozen features) to
  tell prose from code; leave-one-out correlation of case-1 scores with CG, EK-FAC and the identity baseline
  (one entry per method: ``cg``, ``ekfac``, ``identity``).

The leave-one-out protocol and why it uses gradient-descent continuation are documented in
:class:`ReproConfig`.

Modules: :mod:`.config` (the experiments, the paper's values, :class:`ReproConfig`, the run's
:class:`Context`), :mod:`.train` (data and both stages' models), :mod:`.analyse` (the experiments),
:mod:`.datamodels` (the LDS experiment), :mod:`.report` (``report.md``), :mod:`.cli` (the command).
"""


from tf_influence import console

console.quiet_for_cli()  # before TensorFlow is imported; --verbose keeps every log line

from .analyse import (case1_fixed, case1_fixed_ekfac, case2_updated, case2_updated_ekfac,  # noqa: E402
                      cleansing, cross_task, figure3, finetune_size, identity_baseline, loss_baseline,
                      task_similarity, text_multistage)
from .cli import EXPERIMENT_FUNCTIONS, _apply_overrides, main  # noqa: E402,F401 (_apply_overrides: tests)
from .config import (EXPERIMENTS, FINETUNE_HEAD_SEED_OFFSET, NO_FIGURE, PAPER, RANDOM_DROP_SEED_OFFSET,  # noqa: E402
                     Context, ReproConfig)
from .datamodels import DigitsRetrain, lds  # noqa: E402
from .report import write_report  # noqa: E402

__all__ = ["EXPERIMENTS", "EXPERIMENT_FUNCTIONS", "NO_FIGURE", "PAPER", "FINETUNE_HEAD_SEED_OFFSET",
           "RANDOM_DROP_SEED_OFFSET", "Context", "DigitsRetrain", "ReproConfig", "case1_fixed", "case1_fixed_ekfac",
           "case2_updated", "case2_updated_ekfac", "cleansing", "cross_task", "figure3", "finetune_size",
           "identity_baseline", "lds", "loss_baseline", "main", "task_similarity", "text_multistage", "write_report"]
