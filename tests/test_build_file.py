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
    for path in (ROOT / "tests").glob("test_*.py"):
        assert f"tests/{path.name}" in listed, f"tests/{path.name} has no py_test in BUILD"


def test_build_names_only_existing_files():
    for rel in build_sources():
        assert (ROOT / rel).is_file(), f"BUILD names {rel}, which does not exist"
