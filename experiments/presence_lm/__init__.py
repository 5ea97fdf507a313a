"""PRESENCE on a token-level transformer language model: where does reweighting help?

    python -m experiments.presence_lm [--quick] [--out reports/presence] [--seeds 3] [--parts main,side,corner]

Model: a causal word-level transformer LM (:func:`model_zoo.text.build_transformer_lm`; one
block, width 64, 2 heads) over a Keras ``TextVectorization`` vocabulary (1,000 words, fitted here
on the embedded English corpus — standard-library docstrings; nothing downloaded). Causal rather
than masked: held-out perplexity is then the model's own objective, exactly comparable across
variants, and PRESENCE's microbatch self-influence is computed from the same loss.

Data: the docstring paragraphs are split (fixed seed) into a pretraining stream (70 %), a
held-out stream (15 %: clean perplexity) and a downstream stream (15 %). The pretraining pool is
``n_train`` windows of ``seq_len + 1`` tokens (stride 8) of which ``noise_fraction`` are replaced
by noise of one kind:

* ``jumbled`` — a clean window with its words permuted (the paper's Figure 1 noise);
* ``code`` — windows of the same modules' source code (out of domain, many unknown words);
* ``duplicates`` — copies of 20 pool windows, repeated (exact duplicates);
* ``none`` — no injected noise.

Measured for every variant, over seeds (mean ± std): **held-out clean loss** (mean token
cross-entropy; perplexity = exp) and a **downstream task**: the pretrained LM's encoder (token
embedding + transformer blocks) with a mean-pooled linear head is finetuned (every weight,
``finetune_steps`` Adam steps) to tell which part of the standard library a window of the
downstream stream documents — six domains (:data:`model_zoo.text.DOMAINS`: text/CLI, network,
files, concurrency, language, numbers/time) — trained on one half of the downstream paragraphs,
accuracy on the other half. The same finetuning from a randomly initialised LM is the reference
(``lm_downstream_reference``): the task measures pretraining only as far as pretrained beats it.
(Two order-based tasks were tried first and dropped: original vs words-permuted windows and
"is the second half the continuation of the first" stayed at chance even for the uniformly
pretrained LM, finetuned or probed, so they could not rank variants.)

Variants (same number of optimizer steps each): ``uniform`` (plain ``fit``), ``presence`` with a τ
schedule — ``two_stage`` (the paper: τ = +1 for the first ``switch`` of the steps, then −1),
``negative`` (τ = −1 throughout: down-weight high self-influence), ``positive`` (τ = +1), and
the control ``zero`` (τ = 0: the reweighted training step with uniform weights) —
``num_microbatches`` microbatches, layer set K = ``si_layers``; and ``presence_sequential``
(drop the highest self-influence windows of the pool, scored by a model trained on the pool, keep
``keep`` of them, then uniform training). A side grid on 30 % jumbled noise varies the switch
point, the microbatch count and K, and trains on source-clustered microbatches (``batching =
"by_source"``: each microbatch all clean or all noise; 30 % jumbled and code). The corner
(:data:`CORNER`) trains ``corner_steps`` steps with ``corner_seeds``. :func:`weight_diagnostics`
traces where the microbatch weights go in the :data:`DIAGNOSED` settings.

Every run is cached (``<out>/lm_runs/<key>.json``): an interrupted command resumes, and
``--parts main,side,corner`` runs a subset into the cache (e.g. two processes). Writes
``lm_grid`` (rows of ``noise_kind``, ``noise_fraction``, ``method``, ``schedule``,
``heldout_loss_mean/std``, ``downstream_accuracy_mean/std``, ``n_seeds``, …), ``lm_side_grid``,
``lm_corner``, ``lm_weight_diagnostics``, ``lm_downstream_reference``, ``lm_config`` and
``chosen_default`` into ``<out>/results.json`` (other keys are kept), a
``lm_report.md`` table and ``lm_grid.png``.

Modules: :mod:`.config` (:class:`LMConfig`, the settings), :mod:`.data` (the corpus and the noisy
pool), :mod:`.train` (one run and its cache), :mod:`.grid` (the variants, :func:`run`),
:mod:`.report` (``lm_report.md``, ``lm_grid.png``), :mod:`.cli` (the command).
"""

from .cli import main  # noqa: E402
from .config import CORPUS_SEED, EARLY, NOISE_KINDS, SCHEDULES, SCORER_SEED, LMConfig  # noqa: E402
from .data import Corpus, corpus_for  # noqa: E402
from .grid import CORNER, DIAGNOSED, PARTS, choose_default, downstream_reference, run  # noqa: E402
from .report import beats  # noqa: E402
from .train import (_loss, evaluate, finetune_accuracy, sequential_kept, source_batched_order, train,  # noqa: E402
                    weight_diagnostics)

__all__ = ["CORNER", "CORPUS_SEED", "DIAGNOSED", "EARLY", "NOISE_KINDS", "PARTS", "SCHEDULES", "SCORER_SEED", "Corpus",
           "LMConfig", "beats", "choose_default", "corpus_for", "downstream_reference", "evaluate", "finetune_accuracy",
           "main", "run", "sequential_kept", "source_batched_order", "train", "weight_diagnostics"]
