"""Executors read like TFX's own: a short ``Do`` that reads its typed options once and calls named steps, and the
spec keys spelled once (``tfx_components.component_specs``)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXECUTORS = sorted((ROOT / "tfx_components").glob("*/executor.py"))
MAX_DO_LINES = 50


def _do_lengths(path) -> dict:
    tree = ast.parse(path.read_text())
    return {f"{cls.name}.Do": fn.end_lineno - fn.lineno + 1
            for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
            for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name == "Do"}


def test_every_component_has_an_executor_with_a_do():
    assert len(EXECUTORS) >= 6
    assert all(_do_lengths(p) for p in EXECUTORS), [p for p in EXECUTORS if not _do_lengths(p)]


@pytest.mark.parametrize("path", EXECUTORS, ids=lambda p: p.parent.name)
def test_do_is_short(path):
    long = {k: n for k, n in _do_lengths(path).items() if n > MAX_DO_LINES}
    assert not long, f"{path.relative_to(ROOT)}: {long} (at most {MAX_DO_LINES} lines: name the steps)"


@pytest.mark.parametrize("path", EXECUTORS, ids=lambda p: p.parent.name)
def test_artifact_keys_come_from_component_specs(path):
    """``input_dict[...]`` / ``output_dict[...]`` are indexed by the constants, not by string literals."""
    literal = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
               and node.value.id in ("input_dict", "output_dict") and isinstance(node.slice, ast.Constant)]
    assert not literal, f"{path.relative_to(ROOT)}: string keys at lines {literal}"


def test_the_shared_spec_entries_are_declared_once():
    """The four components that read Examples through a model share one declaration of their feature entries."""
    from tfx_components import component_specs as specs
    from tfx_components.factor_fitter.component import FactorFitterSpec
    from tfx_components.gradient_indexer.component import GradientIndexerSpec
    from tfx_components.influence_scorer.component import InfluenceScorerSpec
    from tfx_components.self_influence_scorer.component import SelfInfluenceScorerSpec
    for spec in (FactorFitterSpec, GradientIndexerSpec, InfluenceScorerSpec, SelfInfluenceScorerSpec):
        for key in (specs.FEATURE_SPEC_KEY, specs.LABEL_KEY_KEY, specs.LOSS_KEY, specs.BATCH_SIZE_KEY):
            assert spec.PARAMETERS[key].type is (int if key == specs.BATCH_SIZE_KEY else str), (spec, key)
        assert set(specs.transform_inputs()) <= set(spec.INPUTS), spec
