"""EK-FAC with its covariances fitted on fewer examples (``FactorArgs(covariance_max_examples=N)``) against the
full fit, at a real size: each fit's time in training epochs of the same model (an epoch timed in the same
process before and after the fits), and how far the multi-stage influence scores move when each factor set
inverts the pretraining Hessian (Pearson, Spearman, and the overlap of the 10 most harmful / helpful
examples, against the full fit's scores; full fits with other label-sampling seeds give the Monte Carlo noise
floor) — with the default damping, and with a damping relative to each
block's spectrum (``KroneckerOptions(relative_damping=0.1)``, kronfluence's default): a briefly trained
model's Hessian can lie below the default damping, where ``(H + λ)⁻¹ ≈ I/λ`` whatever the factors.

    python -m benchmarks.covariance_cap --model llama-100m --caps 128 64 --out docs/results/covariance_cap.json

The models, data and trained weights are :mod:`benchmarks.real_size`'s (its ``--workdir``; they are trained
there first when missing). The eigenvalue correction sees every sequence in each fit; only the eigenbases
(and the Fisher diagonal of the variables no block covers) come from the first ``N``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field


@dataclass
class CovarianceCapArgs:
    out: str = field(default="docs/results/covariance_cap.json", metadata={"help": "the JSON file written"})
    model: str = field(default="llama-100m", metadata={"help": "a benchmarks.real_size model"})
    caps: list[int] = field(default_factory=lambda: [128, 64], metadata={
        "help": "covariance_max_examples values compared with the full fit"})
    product_dtypes: list[str] = field(default_factory=list, metadata={
        "help": "also full fits with these FactorArgs.product_dtype values ('model', 'bfloat16'), against the default "
                "fit ('auto')"})
    reference_seeds: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "full fits with these label-sampling seeds (the true Fisher samples labels): how far the scores "
                "move by Monte Carlo noise alone, the yardstick for the caps"})
    workdir: str = field(default="reports/real_size/w", metadata={"help": "benchmarks.real_size's --workdir"})
    sequences: int = field(default=256, metadata={"help": "pretraining sequences"})
    top: int = field(default=10, metadata={"help": "the top-k lists compared"})
    reuse: bool = field(default=False, metadata={
        "help": "keep the fits already in --out whose scores are saved in the workdir's Analyzer (their times and "
                "the epochs timed around them too); fit and time only the others"})


def _agreement(ref, got, top: int) -> dict:
    import numpy as np
    from scipy import stats
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    hi = lambda s: set(np.argsort(-s)[:top].tolist())   # noqa: E731
    lo = lambda s: set(np.argsort(s)[:top].tolist())    # noqa: E731
    return {"pearson": float(stats.pearsonr(ref, got)[0]), "spearman": float(stats.spearmanr(ref, got)[0]),
            f"top{top}_harmful_overlap": len(hi(ref) & hi(got)) / top,
            f"top{top}_helpful_overlap": len(lo(ref) & lo(got)) / top,
            "relative_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def run(args: CovarianceCapArgs) -> dict:
    from benchmarks import real_size as rs
    import tf_influence as tfi
    from tf_influence.memory import release_memory
    rargs = rs.RealSizeArgs(models=[args.model], workdir=args.workdir, sequences=args.sequences)
    if not os.path.exists(os.path.join(rs._paths_dir(rargs, args.model), "pretrain.weights.h5")):
        print(f"training {args.model} one epoch first (benchmarks.real_size's prepare)", flush=True)
        rs.prepare(args.model, rargs)
    ds, ft, te, _ = rs.datasets(args.model, rargs)
    _, _, an = rs._analyzer(args.model, "influence", rargs)
    # the default damping, and one relative to each block's spectrum: where the Hessian of a briefly trained
    # model is below the default damping, (H + λ)⁻¹ ≈ I/λ and any factors give the same scores
    dampings = {"default damping": tfi.InfluenceArgs(),
                "relative_damping 0.1": tfi.InfluenceArgs(pretrain_solver=tfi.SolverConfig(
                    "ekfac", damping=0.0, kronecker=tfi.KroneckerOptions(relative_damping=0.1)))}
    plan = ([("full", "cap_None", tfi.FactorArgs())]
            + [(f"covariance_max_examples={c}", f"cap_{c}", tfi.FactorArgs(covariance_max_examples=c)) for c in args.caps]
            + [(f"full, product_dtype={d}", f"products_{d}", tfi.FactorArgs(product_dtype=d))
               for d in args.product_dtypes]
            + [(f"full, seed {s}", f"seed_{s}", tfi.FactorArgs(seed=s)) for s in args.reference_seeds])
    previous = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out) as fh:
            previous = json.load(fh).get("fits", {})
    fits, scores, new, epochs = {}, {}, [], []
    for key, name, fargs in plan:
        saved = [f"{name}_{d.split()[0]}" for d in dampings]
        if key in previous and all(os.path.exists(os.path.join(an._dir("scores", n), "result.json")) for n in saved):
            fits[key] = previous[key]
            for d, n in zip(dampings, saved):
                scores[(key, d)] = an.load_scores(n).scores
            print(f"  {key:32s} kept from {args.out}", flush=True)
            continue
        if not epochs:
            epochs.append(rs.train_epoch(args.model, rargs)[2])
            print(f"{args.model}: training epoch {epochs[0]:.1f} s", flush=True)
        t = time.perf_counter()
        low = an.fit_factors(name, ds, fargs, overwrite=True).summary()["bfloat16_products"]
        fits[key] = {"seconds": time.perf_counter() - t, "product_dtype": fargs.product_dtype,
                     "bfloat16_products": len(low)}
        new.append(key)
        release_memory()
        print(f"  {key:32s} fit {fits[key]['seconds']:7.1f} s", flush=True)
        for d, n in zip(dampings, saved):
            scores[(key, d)] = an.influence(n, ds, ft, te, dampings[d], factors_name=name, overwrite=True).scores
            release_memory()
    if new:
        epochs.append(rs.train_epoch(args.model, rargs)[2])
    for key in new:
        fits[key]["epoch_seconds"] = epochs
        fits[key]["over_epoch"] = fits[key]["seconds"] / (sum(epochs) / len(epochs))
    for key, f in fits.items():
        if key != "full":
            f["scores_vs_full"] = {d: _agreement(scores[("full", d)], scores[(key, d)], args.top) for d in dampings}
        print(f"  {key:32s} {f['over_epoch']:5.2f} epochs" + "".join(
            f"; {d}: Spearman {a['spearman']:.4f}, Pearson {a['pearson']:.4f}"
            for d, a in f.get("scores_vs_full", {}).items()), flush=True)
    from tf_influence.kfac.products import native_bfloat16
    out = {"model": args.model, "n_sequences": args.sequences, "native_bfloat16": native_bfloat16(), "fits": fits}
    from benchmarks.common import dump_json
    dump_json(out, args.out)
    return out


def main(argv=None):
    from benchmarks.common import parse_args
    from tf_influence import console
    console.tune_openblas()
    args = parse_args(CovarianceCapArgs, sys.argv[1:] if argv is None else argv, __doc__)
    console.quiet(False)
    run(args)


if __name__ == "__main__":
    main()
