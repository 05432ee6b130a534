"""Configurations of a low-rank model exported by workbench.

Each is the standard transformers configuration of its family plus `low_rank`, the table of the
linear layers stored as two factors (see modeling_lowrank.py). The model type differs from the
standard one on purpose: without this code a loader must fail, not build a dense model with
missing weights. Needs only torch and transformers.
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


class LowRankLlamaConfig(LlamaConfig):
    model_type = "lowrank_llama"
    base_model_tp_plan = {}  # tensor-parallel plans name dense linears; these layers are factored


class LowRankMistralConfig(MistralConfig):
    model_type = "lowrank_mistral"
    base_model_tp_plan = {}


class LowRankQwen2Config(Qwen2Config):
    model_type = "lowrank_qwen2"
    base_model_tp_plan = {}
