"""Model presets: JSON configs in ``datasets/models/`` built into ``nn.Module`` by family builders.

A preset names a *family* (the architecture code in this package) and its config. Building on
the meta device is free, so a 175B-parameter model is planned without allocating its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.errors import SpecError, read_json_file
from planner.paths import datasets_dir


@dataclass(frozen=True, kw_only=True)
class Family:
    """How to build a family's module, make a synthetic batch for it, and score its output."""

    build: Callable[[dict[str, Any]], nn.Module]
    sample_input: Callable[[dict[str, Any], int, int | None, torch.device | str], tuple[torch.Tensor, ...]]
    targets: Callable[[dict[str, Any], int, int | None, torch.Generator | None], torch.Tensor]
    # "lm-cross-entropy": logits [b, s, v] against targets [b, s] (also per-frame speech heads);
    # "cross-entropy": logits [b, classes] against targets [b].
    loss: str
    seq_len: Callable[[dict[str, Any]], int | None]
    # Whether the runtime lays this family's blocks out for sequence parallelism (norms on sequence
    # shards between the tensor-parallel regions: runtime.sequence_parallel_gpt, runtime.sequence_parallel_llama).
    # The search plans sequence parallelism only for these, so that every plan it writes can run.
    sequence_parallel: bool = False
    # Whether positions are computed, not a learned table (rotary: Llama), so the model runs at any
    # sequence length: the planner may stretch the preset beyond its own (``--seq-len``, long context).
    any_seq_len: bool = False


def _tokens(batch: int, seq: int, device: torch.device | str) -> torch.Tensor:
    return torch.zeros(batch, seq, dtype=torch.long, device=device)


def _token_targets(vocab: int, batch: int, seq: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _gpt_build(cfg: dict[str, Any]) -> nn.Module:
    from planner.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**cfg))


def _gpt_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    s = seq_len or cfg.get("seq_len", 2048)
    return (torch.zeros(batch, s, dtype=torch.long, device=device),)


def _gpt_targets(cfg: dict[str, Any], batch: int, seq_len: int | None, gen: torch.Generator | None):
    s = seq_len or cfg.get("seq_len", 2048)
    return torch.randint(0, cfg.get("vocab_size", 51200), (batch, s), generator=gen)


def _bert_config(cfg: dict[str, Any]):
    from planner.models.bert import BertConfig

    return BertConfig(**cfg)


def _t5_config(cfg: dict[str, Any]):
    from planner.models.t5 import T5Config

    return T5Config(**cfg)


def _vit_config(cfg: dict[str, Any]):
    from planner.models.vit import ViTConfig

    return ViTConfig(**cfg)


def _w2v_config(cfg: dict[str, Any]):
    from planner.models.wav2vec2 import Wav2Vec2Config

    return Wav2Vec2Config(**cfg)


def _ds2_config(cfg: dict[str, Any]):
    from planner.models.deepspeech2 import DeepSpeech2Config

    return DeepSpeech2Config(**cfg)


def _llama_config(cfg: dict[str, Any]):
    from planner.models.llama import LlamaConfig

    return LlamaConfig(**cfg)


def _resnet_config(cfg: dict[str, Any]):
    from planner.models.resnet import ResNetConfig

    return ResNetConfig(**cfg)


def _mlp_config(cfg: dict[str, Any]):
    from planner.models.mlp import MLPConfig

    return MLPConfig(**cfg)


def _cnn_config(cfg: dict[str, Any]):
    from planner.models.cnn import CNNConfig

    return CNNConfig(**cfg)


def _features(cfg: dict[str, Any], batch: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, _mlp_config(cfg).input_dim, device=device),)


def _cnn_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    c = _cnn_config(cfg)
    return (torch.randn(batch, c.channels, c.image_size, c.image_size, device=device),)


def _classes(num_classes: int, batch: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, num_classes, (batch,), generator=gen)


def _build(module: str, cls: str, make_config: Callable[[dict[str, Any]], Any]):
    def build(cfg: dict[str, Any]) -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"planner.models.{module}"), cls)(make_config(cfg))

    return build


def _images(cfg: dict[str, Any], batch: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    size, channels = cfg.get("image_size", 224), cfg.get("channels", 3)
    return (torch.randn(batch, channels, size, size, device=device),)


def _class_targets(cfg: dict[str, Any], batch: int, seq_len: int | None, gen: torch.Generator | None):
    return torch.randint(0, cfg.get("num_classes", 1000), (batch,), generator=gen)


def _lm_family(make_config: Callable[[dict[str, Any]], Any], module: str, cls: str, *,
               sequence_parallel: bool = False, any_seq_len: bool = False) -> Family:
    """Token ids in, per-token logits out (BERT's MLM, Llama, Mixtral)."""
    return Family(
        build=_build(module, cls, make_config),
        sample_input=lambda cfg, b, s, dev: (_tokens(b, s or make_config(cfg).seq_len, dev),),
        targets=lambda cfg, b, s, gen: _token_targets(make_config(cfg).vocab_size, b,
                                                      s or make_config(cfg).seq_len, gen),
        loss="lm-cross-entropy", seq_len=lambda cfg: make_config(cfg).seq_len, sequence_parallel=sequence_parallel,
        any_seq_len=any_seq_len)


def _t5_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    c = _t5_config(cfg)
    return (_tokens(batch, seq_len or c.seq_len, device), _tokens(batch, c.dec_seq_len, device))


def _w2v_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    c = _w2v_config(cfg)
    return (torch.randn(batch, c.samples_for(seq_len or c.seq_len), device=device),)


def _ds2_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    c = _ds2_config(cfg)
    return (torch.randn(batch, 1, c.freq_bins, seq_len or c.seq_len, device=device),)


def _ds2_targets(cfg: dict[str, Any], batch: int, seq_len: int | None, gen: torch.Generator | None):
    c = _ds2_config(cfg)
    frames = c.conv_out(c.freq_bins, seq_len or c.seq_len)[1]
    return _token_targets(c.vocab_size, batch, frames, gen)


FAMILIES: dict[str, Family] = {
    "gpt": Family(build=_gpt_build, sample_input=_gpt_sample, targets=_gpt_targets, loss="lm-cross-entropy",
                  seq_len=lambda cfg: cfg.get("seq_len", 2048), sequence_parallel=True),
    "bert": _lm_family(_bert_config, "bert", "Bert"),
    "llama": _lm_family(_llama_config, "llama", "Llama", sequence_parallel=True, any_seq_len=True),
    "t5": Family(build=_build("t5", "T5", _t5_config), sample_input=_t5_sample,
                 targets=lambda cfg, b, s, gen: _token_targets(_t5_config(cfg).vocab_size, b,
                                                               _t5_config(cfg).dec_seq_len, gen),
                 loss="lm-cross-entropy", seq_len=lambda cfg: _t5_config(cfg).seq_len),
    "vit": Family(build=_build("vit", "ViT", _vit_config),
                  sample_input=lambda cfg, b, s, dev: _images(cfg, b, dev),
                  targets=_class_targets, loss="cross-entropy", seq_len=lambda cfg: _vit_config(cfg).seq_len),
    "wav2vec2": Family(build=_build("wav2vec2", "Wav2Vec2", _w2v_config), sample_input=_w2v_sample,
                       targets=lambda cfg, b, s, gen: _token_targets(_w2v_config(cfg).vocab_size, b,
                                                                     s or _w2v_config(cfg).seq_len, gen),
                       loss="lm-cross-entropy", seq_len=lambda cfg: _w2v_config(cfg).seq_len),
    "deepspeech2": Family(build=_build("deepspeech2", "DeepSpeech2", _ds2_config), sample_input=_ds2_sample,
                          targets=_ds2_targets, loss="lm-cross-entropy",
                          seq_len=lambda cfg: _ds2_config(cfg).seq_len),
    "resnet": Family(build=_build("resnet", "ResNet", _resnet_config),
                     sample_input=lambda cfg, b, s, dev: _images(cfg, b, dev), targets=_class_targets,
                     loss="cross-entropy", seq_len=lambda cfg: None),
    # Small classifiers on synthetic data, for checking the runtime against one process (see mlp.py, cnn.py).
    "mlp": Family(build=_build("mlp", "MLP", _mlp_config),
                  sample_input=lambda cfg, b, s, dev: _features(cfg, b, dev),
                  targets=lambda cfg, b, s, gen: _classes(_mlp_config(cfg).num_classes, b, gen),
                  loss="cross-entropy", seq_len=lambda cfg: None),
    "cnn": Family(build=_build("cnn", "CNN", _cnn_config), sample_input=_cnn_sample,
                  targets=lambda cfg, b, s, gen: _classes(_cnn_config(cfg).num_classes, b, gen),
                  loss="cross-entropy", seq_len=lambda cfg: None),
}


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Weight initialisation is a no-op while building on meta (there are no values to fill).

    Each ``torch.nn.init`` call on a meta tensor still dispatches through Python decompositions
    (about a millisecond each), which was half of building GPT-3 175B.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """A named model config from ``datasets/models/<name>.json``."""

    name: str
    family: str
    config: dict[str, Any]
    description: str = ""
    source: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def seq_len(self) -> int | None:
        return self.spec.seq_len(self.config)

    def build(self, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
              seed: int | None = None) -> nn.Module:
        """The module, with weights on ``device`` (``meta`` allocates nothing)."""
        if seed is not None:
            torch.manual_seed(seed)
        on_meta = torch.device(device).type == "meta"
        with torch.device(device), (_no_init() if on_meta else contextlib.nullcontext()):
            model = self.spec.build(dict(self.config))
        return model.to(dtype=dtype)

    def sample_input(self, batch: int, seq_len: int | None = None,
                     device: str | torch.device = "meta") -> tuple[torch.Tensor, ...]:
        return self.spec.sample_input(self.config, batch, seq_len, device)

    def param_count(self) -> int:
        model = self.build(device="meta")
        return sum(p.numel() for p in model.parameters())


def list_presets() -> list[str]:
    return sorted(p.stem for p in (datasets_dir() / "models").glob("*.json"))


def load_preset(name: str) -> ModelPreset:
    """Read a preset by name; a bad name lists the close matches."""
    from planner.cluster import _edit_distance

    path = datasets_dir() / "models" / f"{name}.json"
    if not path.is_file() and (name.endswith(".py") or ":" in name):
        raise SpecError("model", name, "a model of your own is planned through the Python API: planner.plan(module, "
                        "cluster, global_batch=..., sample_input=...) (docs/train-your-own-model.md); --model takes "
                        "a preset name or a Hugging Face config.json")
    if not path.is_file():
        known = list_presets()
        close = sorted(known, key=lambda k: _edit_distance(k, name))[:3]
        raise SpecError("model", name, f"no such model preset; did you mean one of {close}? "
                        "`python -m planner models` lists them all")
    data = read_json_file(path, "model", what=f"the model preset {name}", damaged_fix="fix the syntax")
    if not isinstance(data, dict):
        raise SpecError("model", name, f"{path} holds no JSON object; a preset is an object with family and config")
    family = data.get("family")
    if family not in FAMILIES:
        raise SpecError("family", family, f"unknown model family in {path}; known: {sorted(FAMILIES)}")
    return ModelPreset(name=data.get("name", name), family=family, config=data.get("config", {}),
                       description=data.get("description", ""), source=data.get("source", ""),
                       tags=tuple(data.get("tags", ())))
