"""megamoe: pretraining sparse (Mixture-of-Experts) language models with DeepSpeed and megatron-core."""

from megamoe.utils import filter_dependency_warnings as _filter_dependency_warnings

__version__ = "0.1.0"

_filter_dependency_warnings()  # before any megamoe module imports megatron-core / DeepSpeed
