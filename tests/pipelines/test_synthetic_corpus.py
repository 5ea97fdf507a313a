"""Synthetic corpora in the pipelines' formats: readable by the scorers' decoder with the returned
feature spec, unique keys, every example written once, identical on a rerun."""

import hashlib

import numpy as np
import pytest

from pipelines import synthetic_corpus as sc
from tfx_components import beam_scoring, common


@pytest.mark.parametrize("kind,n,shards", [("digits", 50, 3), ("tokens", 30, 2)])
def test_corpus_reads_back_with_its_feature_spec(tmp_path, kind, n, shards):
    out = sc.write_corpus(str(tmp_path / kind), n, kind, shards=shards, seq_len=16, vocab=40)
    assert out["examples"] == n and len(out["files"]) == shards
    spec = beam_scoring.parse_feature_spec(out["feature_spec"])
    keys, x, y = beam_scoring.decode_batch(common.read_records(out["files"], kind), spec, kind)
    assert sorted(keys) == [f"{kind}-{i:09d}".encode() for i in range(n)]  # each example exactly once
    if kind == "digits":
        assert x.shape == (n, 8, 8, 1) and 0 <= x.min() and x.max() <= 1 and set(y) <= {0, 1, 2, 3}
    else:
        assert x.shape == (n, 16) and y.shape == (n, 16) and np.array_equal(x[:, 1:], y[:, :-1])
        assert 0 <= x.min() and y.max() < 40
    digest = [hashlib.sha1(open(f, "rb").read()).hexdigest() for f in out["files"]]
    again = sc.write_corpus(str(tmp_path / kind), n, kind, shards=shards, seq_len=16, vocab=40)
    assert [hashlib.sha1(open(f, "rb").read()).hexdigest() for f in again["files"]] == digest


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus kind 'images'"):
        sc.write_corpus(str(tmp_path), 5, "images")
    with pytest.raises(ValueError, match="n ≥ 1"):
        sc.write_corpus(str(tmp_path), 0)
