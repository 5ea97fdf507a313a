"""The price of keeping a vocabulary-sized Kronecker factor side diagonal, at a vocabulary where the
exact (dense) side still fits.

    python -m benchmarks.vocab_side --out docs/results/vocab_side.json

A keras-hub GPT-2 (tied ``ReversibleEmbedding``, vocabulary ``--vocab`` = 4,096, ``--layers`` ×
``--width``) is trained on Zipf-distributed synthetic tokens; EK-FAC factors of its whole training
Hessian are fitted twice — the token table's vocabulary side dense (``dense_factor_max=None``: a
``[4096, 4096]`` covariance and its eigendecomposition) and diagonal (``dense_factor_max=4095``: what
every vocabulary above :data:`tf_influence.kfac.DENSE_FACTOR_MAX` gets) — and single-stage influence of
every training sequence on the completion log-probability of held-out sequences is computed with
each. Reported: Pearson / Spearman between the two sets of scores (per test point, then averaged),
the relative difference of the inverse-Hessian-vector products, and the seconds and plan memory of
each fit.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field


@dataclass
class VocabSideArgs:
    out: str = field(default="docs/results/vocab_side.json", metadata={"help": "the JSON file written"})
    vocab: int = field(default=4096, metadata={"help": "vocabulary (the exact block must fit)"})
    layers: int = field(default=2, metadata={"help": "transformer layers"})
    width: int = field(default=64, metadata={"help": "hidden width"})
    sequences: int = field(default=256, metadata={"help": "training sequences"})
    length: int = field(default=32, metadata={"help": "tokens per sequence"})
    test_points: int = field(default=4, metadata={"help": "held-out sequences measured"})
    epochs: int = field(default=3, metadata={"help": "training epochs before the influence computation"})
    damping: float = field(default=1e-5, metadata={
        "help": "damping of the EK-FAC solve (small against the curvature, so the Hessian matters: the identity "
                "baseline is reported beside)"})
    seed: int = field(default=0, metadata={"help": "seed of the model and data"})
    verbose: bool = field(default=False, metadata={"help": "TensorFlow's and the libraries' own logs"})


def main(argv=None):
    from benchmarks.common import parse_args
    args = parse_args(VocabSideArgs, argv, __doc__)
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf
    from scipy import stats

    import tf_influence as tfi
    from benchmarks.real_size import zipf_tokens
    from tf_influence import kfac
    from tf_influence.lm import CausalLMLoss, causal_lm_examples, completion_log_probability
    from tf_influence.memory import factor_plan

    keras.utils.set_random_seed(args.seed)
    bb = keras_hub.models.GPT2Backbone(vocabulary_size=args.vocab, num_layers=args.layers, num_heads=2,
                                       hidden_dim=args.width, intermediate_dim=4 * args.width,
                                       max_sequence_length=args.length)
    lm = keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)
    x, y = causal_lm_examples(zipf_tokens(args.sequences, args.length, args.vocab, args.seed + 1))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    tx, ty = causal_lm_examples(zipf_tokens(args.test_points, args.length, args.vocab, args.seed + 2),
                                prompt_lengths=[args.length // 2] * args.test_points)
    test = tf.data.Dataset.from_tensor_slices((tx, ty)).batch(args.test_points)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=CausalLMLoss())
    lm.fit(train, epochs=args.epochs, verbose=0)

    obj = tfi.Objective(lm, CausalLMLoss())
    group = tfi.ParameterGroup.from_model(lm)
    measure = tfi.influence.as_measurement(completion_log_probability(), lm)
    b = tfi.influence.test_gradients(measure, test, group, "each")            # [p, Q]
    H = tfi.HessianOperator(obj, train, group)
    out = {"vocab": args.vocab, "n_params": int(group.size), "sequences": args.sequences, "length": args.length}
    scores, solutions, factors_by = {}, {}, {}
    for label, limit in (("dense", None), ("diagonal", args.vocab - 1)):
        st = kfac.FactorStatistics(obj, group, dense_factor_max=limit)
        plan = factor_plan(st, train)
        t = time.perf_counter()
        factors = kfac.fit_factors(obj, train, group, dense_factor_max=limit)
        fit_s = time.perf_counter() - t
        factors_by[label] = factors
        res = tfi.solve(H, b, tfi.SolverConfig("ekfac", damping=args.damping,
                                               curvature_iterations=0, kronecker=tfi.KroneckerOptions(factors=factors)))
        s = -res.x
        solutions[label] = s.numpy()
        scores[label] = tfi.influence.score_examples(obj, train, group, s)
        out[label] = {"fit_seconds": fit_s, "plan_mb": plan.total / 2 ** 20,
                      "token_embedding_sides": st.sides()["token_embedding"]}
        print(f"{label:9s} fit {fit_s:6.1f} s, plan {plan.total / 2 ** 20:8.1f} MB, sides "
              f"{st.sides()['token_embedding']['in']}/{st.sides()['token_embedding']['out']}", flush=True)
    scores["identity"] = tfi.influence.score_examples(obj, train, group, -b)   # H⁻¹ ≈ I: what the solve adds
    a, d = scores["dense"], scores["diagonal"]
    out["spearman_identity_vs_dense"] = float(np.mean([stats.spearmanr(a[:, j], scores["identity"][:, j])[0]
                                                       for j in range(a.shape[1])]))
    out["lambda_max_dense"] = float(max(np.max(f["eig"]) for f in factors_by["dense"].blocks.values()))
    pear = [float(stats.pearsonr(a[:, j], d[:, j])[0]) for j in range(a.shape[1])]
    spear = [float(stats.spearmanr(a[:, j], d[:, j])[0]) for j in range(a.shape[1])]
    rel = float(np.linalg.norm(solutions["dense"] - solutions["diagonal"]) / np.linalg.norm(solutions["dense"]))
    out.update({"pearson_diagonal_vs_dense": float(np.mean(pear)), "spearman_diagonal_vs_dense": float(np.mean(spear)),
                "pearson_per_test_point": pear, "spearman_per_test_point": spear,
                "ihvp_relative_difference": rel})
    print(f"scores, diagonal vs dense vocabulary side: Pearson {np.mean(pear):.4f}, Spearman {np.mean(spear):.4f} "
          f"(per test point: {', '.join(f'{v:.3f}' for v in spear)}); inverse-HVP relative difference {rel:.3f}; "
          f"identity baseline vs dense: Spearman {out['spearman_identity_vs_dense']:.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
