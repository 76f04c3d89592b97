"""Hugging Face ``transformers`` models built from their default configs on meta (no downloads).

``transformers`` is an optional dependency (the ``hf`` extra): it is imported only inside these
functions. Each entry builds the architecture's default config (``GPT2Config()`` is GPT-2 small,
``LlamaConfig()`` is Llama-7B, ``MixtralConfig()`` is Mixtral-8x7B, …) with ``use_cache`` and
every other default left as is, optionally with fewer layers for quick tests, under
``torch.device("meta")``, and a sample input of the right kind. These models exercise the
tracer's fallbacks: their forwards take ``**kwargs``, which ``torch.fx`` cannot bind, so they go
through ``torch.export`` or the module-level trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class HFModel:
    """A transformers architecture: config class, model class, layer-count field, sample input."""

    config_class: str
    model_class: str
    layers_field: str | tuple[str, ...]
    sample: Callable[[int], dict[str, torch.Tensor]]
    seq_len: int | None
    description: str


def _tokens(seq: int) -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda batch: {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta")}


HF_MODELS: dict[str, HFModel] = {
    "hf-gpt2": HFModel(config_class="GPT2Config", model_class="GPT2LMHeadModel", layers_field="n_layer",
                       sample=_tokens(1024), seq_len=1024, description="GPT-2 small (124M), 1024 tokens"),
    "hf-bert": HFModel(config_class="BertConfig", model_class="BertForMaskedLM",
                       layers_field="num_hidden_layers",
                       sample=_tokens(512), seq_len=512, description="BERT-base MLM (110M), 512 tokens"),
    "hf-t5": HFModel(config_class="T5Config", model_class="T5ForConditionalGeneration",
                     layers_field=("num_layers", "num_decoder_layers"),
                     sample=lambda b: {"input_ids": torch.zeros(b, 512, dtype=torch.long, device="meta"),
                                       "decoder_input_ids": torch.zeros(b, 128, dtype=torch.long,
                                                                        device="meta")},
                     seq_len=512, description="T5-small (60M), 512 encoder / 128 decoder tokens"),
    "hf-vit": HFModel(config_class="ViTConfig", model_class="ViTForImageClassification",
                      layers_field="num_hidden_layers",
                      sample=lambda b: {"pixel_values": torch.zeros(b, 3, 224, 224, device="meta")},
                      seq_len=197, description="ViT-Base/16 (86M), 224x224"),
    "hf-wav2vec2": HFModel(config_class="Wav2Vec2Config", model_class="Wav2Vec2ForCTC",
                           layers_field="num_hidden_layers",
                           sample=lambda b: {"input_values": torch.zeros(b, 250000, device="meta")},
                           seq_len=781, description="wav2vec 2.0 BASE + CTC head (94M), 15.6 s of audio"),
    "hf-llama": HFModel(config_class="LlamaConfig", model_class="LlamaForCausalLM",
                        layers_field="num_hidden_layers", sample=_tokens(4096), seq_len=4096,
                        description="Llama-7B default config (6.7B), 4096 tokens"),
    "hf-mixtral": HFModel(config_class="MixtralConfig", model_class="MixtralForCausalLM",
                          layers_field="num_hidden_layers", sample=_tokens(4096), seq_len=4096,
                          description="Mixtral-8x7B default config (46.7B), 4096 tokens"),
}


def build_hf(name: str, *, num_layers: int | None = None,
             **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model on meta, sample kwargs)`` for one of :data:`HF_MODELS`, from the default config.

    ``num_layers`` shortens the stack(s) for quick tests; ``overrides`` set other config fields.
    Raises ``ImportError`` when transformers is not installed.
    """
    import transformers

    if name not in HF_MODELS:
        raise ValueError(f"build_hf.name: got {name!r}; known: {sorted(HF_MODELS)}")
    spec = HF_MODELS[name]
    config = getattr(transformers, spec.config_class)()
    fields = (spec.layers_field,) if isinstance(spec.layers_field, str) else spec.layers_field
    if num_layers is not None:
        for f in fields:
            setattr(config, f, num_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = getattr(transformers, spec.model_class)(config)
    return model, spec.sample(1)
