"""Hugging Face conversion: export megamoe checkpoints (stock Llama / Mixtral when exact, else
the custom ``megamoe`` architecture) and import Llama / Mixtral checkpoints.

Importing this package registers the ``megamoe`` architecture with transformers' ``AutoConfig``
and ``AutoModelForCausalLM``, so exports load without ``trust_remote_code`` when megamoe is
installed. See the README section "Hugging Face export and import".
"""

from transformers import AutoConfig, AutoModelForCausalLM

from megamoe.hf.configuration_megamoe import MegamoeConfig
from megamoe.hf.modeling_megamoe import MegamoeForCausalLM

AutoConfig.register("megamoe", MegamoeConfig, exist_ok=True)
AutoModelForCausalLM.register(MegamoeConfig, MegamoeForCausalLM, exist_ok=True)

__all__ = ["MegamoeConfig", "MegamoeForCausalLM"]
