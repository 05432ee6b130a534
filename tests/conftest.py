"""Shared fixtures: tiny randomly initialised Llama models (MHA and GQA) built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(kv_heads: int = 2, layers: int = 4, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def gqa_model():
    return tiny_llama(kv_heads=2)


@pytest.fixture
def mha_model():
    return tiny_llama(kv_heads=4)


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (16, 32), generator=g)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the dense-metric cache of tests away from the user's; the embedded model cache is shared."""
    import os

    if "WORKBENCH_CACHE" not in os.environ:
        monkeypatch.setenv("WORKBENCH_DENSE_CACHE", str(tmp_path_factory.mktemp("dense")))
