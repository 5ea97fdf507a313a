"""The EK-FAC eigendecomposition's LAPACK driver: NumPy's ``eigh`` against SciPy's divide-and-conquer
(``driver="evd"``, what :func:`tf_influence.kfac.statistics._eigh` uses), side by side in one process.

    python -m benchmarks.eigh --out docs/results/eigh.json

Matrices: covariances ``X Xᵀ / m`` of Gaussian ``X`` at the dense factor sides of GPT-2 small / BERT base
(769: attention and projection inputs with the bias row, 2,304: the fused QKV output, 3,073: the MLP's
wide side), in float32 (a float32 model's bases) and float64. Per size and dtype: the median seconds of
``--repeats`` runs of each, and each one's reconstruction error ``‖Q diag(e) Qᵀ − C‖ / ‖C‖`` and
orthogonality error ``‖QᵀQ − I‖_max`` — the faster driver must be as accurate. Then ``parallel``: four float32
sides of the largest size decomposed one after the other on every BLAS thread, one after the other on one
thread, and two at a time on one BLAS thread each — the library runs them one after the other on every thread
(:func:`tf_influence.kfac.statistics.eigenbases`), the fastest of the three on this machine.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class EighArgs:
    out: str = field(default="docs/results/eigh.json", metadata={"help": "the JSON file written"})
    sizes: list[int] = field(default_factory=lambda: [769, 2304, 3073], metadata={"help": "matrix sizes"})
    repeats: int = field(default=3, metadata={"help": "runs of each driver per size and dtype (median)"})


def _errors(C, e, Q):
    import numpy as np
    C64, Q64 = C.astype(np.float64), Q.astype(np.float64)
    rec = np.linalg.norm((Q64 * e) @ Q64.T - C64) / np.linalg.norm(C64)
    orth = np.max(np.abs(Q64.T @ Q64 - np.eye(len(e))))
    return float(rec), float(orth)


def run(args: EighArgs) -> dict:
    import numpy as np
    import scipy.linalg
    drivers = {"numpy": lambda C: np.linalg.eigh(C),
               "scipy_evd": lambda C: scipy.linalg.eigh(C, driver="evd", overwrite_a=True, check_finite=False)}
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        X = rng.standard_normal((n, 2 * n))
        C = X @ X.T / (2 * n)
        for dtype in ("float32", "float64"):
            Cd = C.astype(dtype)
            row = {"size": n, "dtype": dtype}
            for name, fn in drivers.items():
                times = []
                for _ in range(args.repeats):
                    work = Cd.copy()
                    t = time.perf_counter()
                    e, Q = fn(work)
                    times.append(time.perf_counter() - t)
                rec, orth = _errors(Cd, e, Q)
                row[name] = {"seconds": statistics.median(times), "reconstruction_error": rec,
                             "orthogonality_error": orth}
            row["speedup"] = row["numpy"]["seconds"] / row["scipy_evd"]["seconds"]
            print(f"{n:>5} {dtype}: numpy {row['numpy']['seconds']:.2f} s, scipy evd "
                  f"{row['scipy_evd']['seconds']:.2f} s ({row['speedup']:.2f}×); errors "
                  f"{row['numpy']['reconstruction_error']:.1e} / {row['scipy_evd']['reconstruction_error']:.1e}",
                  flush=True)
            rows.append(row)
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits
    from tf_influence.kfac.statistics import _eigh
    n = max(args.sizes)
    X = rng.standard_normal((n, 2 * n)).astype("float32")
    mats = [X @ X.T / (2 * n) + i * np.eye(n, dtype="float32") for i in range(4)]
    par = {"size": n, "matrices": len(mats)}
    t = time.perf_counter()
    _ = [_eigh(C, np.float32) for C in mats]
    par["sequential_seconds"] = time.perf_counter() - t
    with threadpool_limits(limits=1, user_api="blas"):
        t = time.perf_counter()
        _ = [_eigh(C, np.float32) for C in mats]
        par["sequential_one_thread_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            _ = list(ex.map(lambda C: _eigh(C, np.float32), mats))
        par["two_at_once_one_thread_each_seconds"] = time.perf_counter() - t
    print(f"{len(mats)} × {n} float32: one after the other {par['sequential_seconds']:.1f} s, on one thread "
          f"{par['sequential_one_thread_seconds']:.1f} s, two at once on one thread each "
          f"{par['two_at_once_one_thread_each_seconds']:.1f} s", flush=True)
    return {"machine": {"cpus": os.cpu_count()}, "rows": rows, "parallel": par}


def main(argv=None):
    import sys
    from benchmarks.real_size import _env
    env = _env()     # this CPU's OpenBLAS kernels, as the library's entry points set them: read when numpy loads
    if env.get("OPENBLAS_CORETYPE") != os.environ.get("OPENBLAS_CORETYPE"):
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.eigh", *argv], env)
    from benchmarks.common import parse_args, write_json
    args = parse_args(EighArgs, argv, __doc__)
    res = run(args)
    write_json(res, args.out)


if __name__ == "__main__":
    main()
