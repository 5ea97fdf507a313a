"""Entry point of the Bazel py_test targets: runs pytest on the test file given as argument."""

import os
import sys

import pytest

if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # the runfiles root, so `tests.helpers` imports
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
