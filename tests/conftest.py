import os
import warnings

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data dir with the embedded digits prepared once for the whole session."""
    from experiments import digits
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.load_split_arrays(data_dir=path)
    return path
