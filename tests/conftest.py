"""Shared fixtures: tiny randomly initialised models (Llama MHA/GQA, Mistral, Qwen2) built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(kv_heads: int = 2, layers: int = 4, seed: int = 0, tie: bool = False,
               intermediate: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


# A window shorter than the test sequences (32 tokens), so a lost sliding window would show.
TINY_SLIDING_WINDOW = 16
FAMILIES = ("llama", "mistral", "qwen2")


def tiny_model(family: str = "llama", kv_heads: int = 2, layers: int = 4, seed: int = 0, tie: bool = False):
    """A tiny random model of `family` with tiny_llama's shapes (4 heads of 16, MLP 128)."""
    if family == "llama":
        return tiny_llama(kv_heads=kv_heads, layers=layers, seed=seed, tie=tie)
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=256,
                  tie_word_embeddings=tie, rope_theta=50000.0)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=TINY_SLIDING_WINDOW, **shapes)).eval()
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shapes)).eval()
        # transformers initialises biases to zero; random ones make "the bias is kept" testable.
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0.0, 0.5)
        return model
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")


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


_WORDS = ("the cat dog runs fast slow red blue green house tree river stone light dark old new big small "
          "city field rain sun moon star sings reads writes falls rises").split()


def write_text_corpus(path, documents: int = 120, seed: int = 0) -> None:
    """Documents of pseudo-English separated by blank lines (a `.txt` dataset)."""
    import random

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 90))) + "." for _ in range(documents)]
    path.write_text("\n\n".join(docs))


def save_tiny_model(directory, kv_heads: int = 2, layers: int = 4, family: str = "llama", tie: bool = False):
    """A tiny random model (Llama unless `family` says) plus a BPE tokenizer trained on the corpus
    words, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(_WORDS)] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_model(family, kv_heads=kv_heads, layers=layers, tie=tie)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A saved tiny model and a text corpus, shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("workspace")
    save_tiny_model(root / "tiny-llama")
    write_text_corpus(root / "corpus.txt")
    return root


def tiny_profile(root, out, ratio=0.3, group_size=1, extra: str = "", *, samples: int = 8,
                 allocator: str | None = None, allocator_options: str = "", device: str = "cpu",
                 offload: str | None = None) -> str:
    """A profile of the tiny model in `root` (see tiny_workspace); `allocator_options` is TOML lines;
    `offload` left out, the profile's default applies."""
    chosen = f'allocator = "{allocator}"\n' if allocator else ""
    placement = f'device = "{device}"\n' + (f'offload = "{offload}"\n' if offload is not None else "")
    if allocator_options:
        chosen += f"[compression.allocator_options]\n{allocator_options}"
    return f"""
name = "tiny"
[model]
source = "{root / 'tiny-llama'}"
{placement}[calibration]
dataset = "{root / 'corpus.txt'}"
samples = {samples}
seq_len = 32
[compression]
ratio = {ratio}
group_size = {group_size}
{chosen}[[evaluate]]
evaluator = "perplexity"
dataset = "{root / 'corpus.txt'}"
seq_len = 32
max_windows = 4
[output]
dir = "{out}"
{extra}
"""
