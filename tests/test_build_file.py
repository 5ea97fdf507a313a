"""BUILD stays consistent with the files: every module and test is a Bazel source, and every
source BUILD names exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_sources():
    return set(re.findall(r'"([\w/]+\.py)"', (ROOT / "BUILD").read_text()))


def test_every_library_module_is_in_build():
    listed = build_sources()
    for pkg in ("tf_influence", "experiments", "tfx_components", "pipelines", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            assert rel in listed, f"{rel} is missing from BUILD"


def test_every_test_is_in_build():
    listed = build_sources()
    tests = list((ROOT / "tests").rglob("test_*.py"))
    assert len(tests) > 35
    for path in tests:
        rel = path.relative_to(ROOT).as_posix()
        assert rel in listed, f"{rel} has no py_test in BUILD"


def test_tests_mirror_the_packages():
    """``tests/<package>/`` holds the tests of ``<package>``; only project-wide checks (BUILD, docs,
    doctests, the wheel) sit in ``tests/`` itself."""
    for path in (ROOT / "tests").rglob("test_*.py"):
        parts = path.relative_to(ROOT / "tests").parts
        if len(parts) == 1:
            assert parts[0] in ("test_build_file.py", "test_docs.py", "test_doctests.py", "test_import_graph.py", "test_install.py"), parts
        else:
            assert (ROOT / parts[0]).is_dir() and (ROOT / "tests" / parts[0] / "__init__.py").is_file(), parts


def test_build_names_only_existing_files():
    for rel in build_sources():
        assert (ROOT / rel).is_file(), f"BUILD names {rel}, which does not exist"
