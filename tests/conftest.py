import os
import warnings

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `make test` runs three workers on two cores: one intra-op thread each (their subprocesses inherit it), so
# TensorFlow's thread pools do not spin against each other (measured: less system time, same results)
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
# TFX loads a component's module_file (the penguin tutorial's Transform and Trainers) from source instead of
# building and pip-installing a wheel of it on every run (~3 s each); TFX's own switch, and no tf-influence
# component reads user modules, so what the tests check is unchanged
os.environ.setdefault("UNSUPPORTED_DO_NOT_PACKAGE_USER_MODULES", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data dir with the embedded digits prepared once for the whole session."""
    from model_zoo import digits
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.load_split_arrays(data_dir=path)
    return path


#: Test modules by measured cost (wall seconds per module under `make test`, `TFI_TEST_CPU_LOG` below; remeasured
#: 2026-12-06), most expensive first. `make test` runs three workers with `--dist loadfile`, which hands out modules
#: in collection order: starting the long ones first keeps one worker from running a long module alone at the end.
#: Unlisted modules run last.
HEAVY_FIRST = ("test_hub_derivatives.py", "test_scorers.py", "test_dask_runner.py", "test_hub_models.py",
               "test_penguin_pipeline.py", "test_beam_scoring.py", "test_kfac.py", "test_pipelines.py",
               "test_large_vocab.py", "test_score_filter.py", "test_presence_distributed.py", "test_pages.py",
               "test_multistage_dense.py", "test_index.py", "test_analyzer.py", "test_example_io.py",
               "test_report.py", "test_products.py", "test_transformer.py", "test_presence_pipeline.py",
               "test_memory.py", "test_lds.py", "test_hvp.py", "test_provenance.py", "test_doctests.py",
               "test_convex_loo.py", "test_head_features.py", "test_cli.py", "test_kfac_distributed.py",
               "test_presence.py", "test_config.py", "test_solvers.py", "test_data.py", "test_loo.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))   # stable: in-file order kept


if os.environ.get("TFI_TEST_CPU_LOG"):       # per-test CPU seconds (this process + its children) for budgeting
    import resource
    import time

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        def cpu():
            s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
        c0, t0 = cpu(), time.perf_counter()
        yield
        with open(os.environ["TFI_TEST_CPU_LOG"], "a") as fh:
            fh.write(f"{cpu() - c0:.2f}\t{time.perf_counter() - t0:.2f}\t{item.nodeid}\n")
