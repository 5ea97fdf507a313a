"""The TFDS digits builder and the two-stage split (through the same code path as mnist / cifar10)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from model_zoo import digits as data


@pytest.fixture(scope="module")
def data_dir(tfds_dir):
    return tfds_dir


def test_builder_serves_sklearn_digits(data_dir):
    x, y, ids = data.load_split_arrays("sklearn_digits", "train", data_dir)
    xt, yt, idt = data.load_split_arrays("sklearn_digits", "test", data_dir)
    digits = load_digits()
    assert len(x) + len(xt) == len(digits.target) == 1797
    assert set(idt.tolist()) == set(range(0, 1797, 5))
    np.testing.assert_array_equal(y, digits.target[ids])
    np.testing.assert_allclose(x[..., 0], digits.images[ids] / 16.0, atol=0.5 / 255)
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32


def test_two_stage_protocol(data_dir):
    d = data.load_two_stage(data_dir=data_dir)
    digits = load_digits()
    assert set(np.unique(digits.target[d.ids["pretrain"]])) == {0, 1, 2, 3}
    assert set(np.unique(digits.target[d.ids["finetune"]])) == {4, 5, 6, 7, 8, 9}
    assert set(d.ids["test"]) <= set(range(0, 1797, 5))
    # labels re-indexed from 0 within each stage
    np.testing.assert_array_equal(d.y_pre, digits.target[d.ids["pretrain"]])
    np.testing.assert_array_equal(d.y_ft, digits.target[d.ids["finetune"]] - 4)
    assert len(d.x_pre) == np.sum(np.isin(digits.target[[i for i in range(1797) if i % 5]], [0, 1, 2, 3]))
    sub = data.load_two_stage(data_dir=data_dir, n_finetune=100, n_test=50, seed=3)
    assert len(sub.x_ft) == 100 and len(sub.x_test) == 50
    assert set(sub.ids["finetune"]) <= set(d.ids["finetune"])


def test_same_task_split_is_disjoint(data_dir):
    d = data.load_two_stage(pretrain_classes=(0, 1, 2, 3), finetune_classes=(0, 1, 2, 3), data_dir=data_dir)
    assert not set(d.ids["pretrain"]) & set(d.ids["finetune"])
    assert abs(len(d.x_pre) - len(d.x_ft)) <= 4


def test_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(ValueError, match="only"):
        data.load_two_stage(data_dir=data_dir, n_finetune=10_000)
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load_split_arrays("sklearn_digits", "validation", data_dir)
    with pytest.raises(ValueError, match="no training examples of classes \\[12\\]"):
        data.load_two_stage(data_dir=data_dir, finetune_classes=(4, 12))
    # the mnist path: not prepared in an empty data dir and no download → a clear error, no network
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared"):
        data.load_two_stage("mnist", data_dir=str(tmp_path))
