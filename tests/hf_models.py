"""Tiny random transformers models (BERT encoder, GPT-2 and Llama causal LMs, 2 layers) for the
export tests, saved as local Hugging Face folders with a word-level tokenizer, and a stand-in for
the layer walk: every Linear and transformers Conv1D quantized by hand (Conv1D weights are in×out;
the quantizer sees them out×in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lcpaq.model.graph import LayerInfo
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.state_keys import stores_transposed
from lcpaq.quant.weights import QuantizedWeight, dequantize_weight, quantize_weight

transformers = pytest.importorskip("transformers", reason="needs lcpaq[hf] (transformers)")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{index}" for index in range(59)]


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A 2-layer random model: ``bert`` (BertModel), ``gpt2`` (GPT2LMHeadModel, tied LM head,
    Conv1D layers) or ``llama`` (LlamaForCausalLM)."""
    torch.manual_seed(seed)
    vocab = len(VOCAB)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        return transformers.BertModel(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
            bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def save_model_folder(model: nn.Module, folder: Path) -> Path:
    """``model`` as a local Hugging Face folder: config, safetensors weights and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    )
    fast.save_pretrained(folder)
    return folder


def token_ids(count: int = 3, length: int = 8, seed: int = 1) -> torch.Tensor:
    """Random token ids [count, length] (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(VOCAB), (count, length), generator=generator)


def linear_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear and Conv1D of ``model`` as the layer walk would describe it (weights out×in)."""
    layers = []
    for index, (name, module) in enumerate(model.named_modules()):
        kind = type(module).__name__
        if not (isinstance(module, nn.Linear) or stores_transposed(kind)):
            continue
        weight = module.weight.t() if stores_transposed(kind) else module.weight
        layers.append(
            LayerInfo(
                name=name,
                weight_key=f"{name}.weight",
                kind=kind,
                weight_shape=tuple(weight.shape),
                num_params=weight.numel(),
                macs_per_sample=weight.numel(),
                execution_index=index,
                has_bias=module.bias is not None,
            )
        )
    return layers


def quantize_in_place(
    model: nn.Module, layers: list[LayerInfo], formats: dict[str, str], scheme: QuantScheme
) -> dict[str, QuantizedWeight]:
    """Quantize each named layer's weight (out×in view) in place; its codes by layer name."""
    codes = {}
    with torch.no_grad():
        for layer in layers:
            if layer.name not in formats:
                continue
            module = model.get_submodule(layer.name)
            weight = module.weight.t() if stores_transposed(layer.kind) else module.weight
            quantized = quantize_weight(weight, get_format(formats[layer.name]), scheme)
            weight.copy_(dequantize_weight(quantized, weight.dtype))
            codes[layer.name] = quantized
    return codes


class Wrapped(nn.Module):
    """A stand-in for `lcpaq.model.text.TextModel`: the Hugging Face model at attribute ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs[:, 0], attention_mask=inputs[:, 1])[0]
