"""Keys and shared spec entries of the components, as TFX's ``tfx.types.standard_component_specs`` keeps its own:
one constant per input, output and execution property, and the entries several components share declared once.

Component specs (``component.py``) and executors (``executor.py``) both read the keys from here, so a key is
spelled in one place::

    from tfx_components import component_specs as specs

    PARAMETERS = {**specs.example_parameters(), specs.SPLITS_KEY: ExecutionParameter(type=str, optional=True)}
    INPUTS = {**specs.examples_and_model(), **specs.transform_inputs()}
"""

from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

# -- inputs / outputs -------------------------------------------------------------------------------------------
EXAMPLES_KEY = "examples"
MODEL_KEY = "model"
SCHEMA_KEY = "schema"
TRANSFORM_GRAPH_KEY = "transform_graph"
PRETRAIN_EXAMPLES_KEY = "pretrain_examples"
FINETUNE_EXAMPLES_KEY = "finetune_examples"
PRETRAIN_MODEL_KEY = "pretrain_model"
FINETUNE_MODEL_KEY = "finetune_model"
PRETRAIN_FACTORS_KEY = "pretrain_factors"
INDEX_KEY = "index"
SCORES_KEY = "scores"
FACTORS_KEY = "factors"
FILTERED_EXAMPLES_KEY = "filtered_examples"
REPORT_KEY = "report"

# -- execution properties -----------------------------------------------------------------------------------------
FEATURE_SPEC_KEY = "feature_spec"
LABEL_KEY_KEY = "label_key"
KEY_FEATURE_KEY = "key_feature"
LOSS_KEY = "loss"
BATCH_SIZE_KEY = "batch_size"
SPLITS_KEY = "splits"
LAYERS_KEY = "layers"
EMBEDDING_KEY = "embedding"
INFLUENCE_ARGS_KEY = "influence_args"
FINETUNE_TRAIN_SPLIT_KEY = "finetune_train_split"
TEST_SPLIT_KEY = "test_split"
TEST_KEYS_KEY = "test_keys"
QUERY_ARGS_KEY = "query_args"
MODE_KEY = "mode"
VALUE_KEY = "value"
MAX_EXACT_BOUNDARY_KEY = "max_exact_boundary"
QUANTILE_EPSILON_KEY = "quantile_epsilon"
REPORT_ARGS_KEY = "report_args"

DEFAULT_BATCH_SIZE = 256


def example_parameters(key_feature: bool = True) -> dict:
    """How a component reads Examples: ``feature_spec`` (JSON; default derived from the model / Schema),
    ``label_key`` and (``key_feature``) the feature that names each example."""
    out = {FEATURE_SPEC_KEY: ExecutionParameter(type=str, optional=True),
           LABEL_KEY_KEY: ExecutionParameter(type=str, optional=True)}
    if key_feature:
        out[KEY_FEATURE_KEY] = ExecutionParameter(type=str, optional=True)
    return out


def scoring_parameters() -> dict:
    """``loss`` (a Keras loss config as JSON; default: the model's compiled loss) and ``batch_size``."""
    return {LOSS_KEY: ExecutionParameter(type=str, optional=True),
            BATCH_SIZE_KEY: ExecutionParameter(type=int, optional=True)}


def transform_inputs() -> dict:
    """The optional ``schema`` and ``transform_graph`` a feature spec can be derived from."""
    return {SCHEMA_KEY: ChannelParameter(type=standard_artifacts.Schema, optional=True),
            TRANSFORM_GRAPH_KEY: ChannelParameter(type=standard_artifacts.TransformGraph, optional=True)}


def examples_and_model() -> dict:
    """``examples`` and the ``model`` that reads them (with :func:`transform_inputs`)."""
    return {EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
            MODEL_KEY: ChannelParameter(type=standard_artifacts.Model), **transform_inputs()}


def batch_size(exec_properties: dict) -> int:
    """The ``batch_size`` execution property, :data:`DEFAULT_BATCH_SIZE` when unset."""
    return int(exec_properties.get(BATCH_SIZE_KEY) or DEFAULT_BATCH_SIZE)
