"""megamoe: pretraining sparse (Mixture-of-Experts) language models with DeepSpeed and megatron-core."""

__version__ = "0.1.0"
