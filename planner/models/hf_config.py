"""A Hugging Face ``config.json`` on disk (or a ``PretrainedConfig``) as a model the planner can trace.

``python -m planner plan --model path/to/config.json`` and ``plan(AutoConfig…, cluster, …)`` come here.
Nothing is downloaded: the ``config.json`` (a file, or the folder holding it) is read as JSON and handed to
``AutoConfig.for_model(model_type, **fields)``, which is what ``AutoConfig.from_pretrained`` does with a
local folder, with each failure worded here (:func:`load_config`); the model is built under
``torch.device("meta")`` (no memory, even at 70B), and a batch-1 sample input of the right kind is made
for the tracer:

* the class is the one the config's ``architectures`` names (what a checkpoint's ``config.json``
  records, e.g. ``LlamaForCausalLM``); without it, the head a training run most likely has, from
  transformers' own auto mappings: sequence-to-sequence LM, masked LM (encoders such as BERT), causal
  LM, image classification, CTC, else the bare model (speech-to-text first for a speech encoder-decoder);
* the sequence length is the config's positions (``max_position_embeddings``, ``n_positions``, …),
  capped by ``seq_len`` (``--seq-len``); a config without positions (T5's relative attention) needs
  ``seq_len``. A vision transformer's is its patches plus the class token;
* every field is left as the config has it (``use_cache`` included), so the model is the one
  ``AutoModelForCausalLM.from_config(config)`` (or the ``architectures`` class) builds in the user's
  script: the runtime retraces the user's model and refuses a plan whose fingerprint differs.

The runtime trains such a plan through the user's own factory (``python -m runtime run plan.json
--model pkg.module:factory``, :mod:`runtime.user_model`), which builds the same class from the same
config (docs/huggingface.md). :data:`TRACED_FAMILIES` lists the ``model_type`` values whose small
configs trace; ``tests/core/test_hf_config.py`` traces each and fails if the list is wrong.
``transformers`` is the optional ``hf`` extra, imported only inside these functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.errors import SpecError, raise_all, read_json_file

# model_type -> what it is. tests/core/test_hf_config.py traces a small config of every candidate family
# it knows and checks that this list is exactly those that trace (a candidate outside it does not).
TRACED_FAMILIES: dict[str, str] = {
    "bart": "BART encoder-decoder, seq2seq LM",
    "bert": "BERT encoder, masked LM head",
    "distilbert": "DistilBERT encoder, masked LM head",
    "falcon": "Falcon decoder, causal LM",
    "gemma": "Gemma decoder, causal LM",
    "gpt2": "GPT-2 decoder, causal LM (tied head)",
    "gpt_neo": "GPT-Neo decoder, causal LM",
    "gpt_neox": "GPT-NeoX / Pythia decoder, causal LM",
    "llama": "Llama 1/2/3 decoder, causal LM",
    "mistral": "Mistral decoder, causal LM",
    "mixtral": "Mixtral sparse mixture of experts, causal LM",
    "opt": "OPT decoder, causal LM",
    "phi3": "Phi-3 decoder, causal LM",
    "qwen2": "Qwen2 decoder, causal LM",
    "qwen3": "Qwen3 decoder, causal LM",
    "roberta": "RoBERTa encoder, masked LM head",
    "t5": "T5 encoder-decoder, seq2seq LM (needs --seq-len: no position table)",
    "vit": "Vision Transformer, image classification",
    "wav2vec2": "wav2vec 2.0 + CTC head (needs --seq-len in frames; module-level trace: LayerDrop)",
}

_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# transformers' auto mappings, most specific first (see the module docstring).
_HEADS = (("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
          ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
          ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
          ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
          ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
          ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC"),
          ("MODEL_MAPPING_NAMES", "AutoModel"))


@dataclass
class HFModel:
    """A transformers model built on meta from a config, with what the tracer needs."""

    module: nn.Module
    sample_input: dict[str, torch.Tensor]
    seq_len: int | None
    name: str
    note: str


def is_config_path(model: Any) -> bool:
    """Whether ``--model`` names a config on disk rather than a preset (presets never end in .json)."""
    return isinstance(model, (str, Path)) and (str(model).endswith(".json") or Path(model).is_dir())


def is_config(model: Any) -> bool:
    """Whether ``model`` is a transformers config (without importing transformers; transformers 5 calls the
    base class ``PreTrainedConfig``, 4 ``PretrainedConfig``)."""
    return any(c.__name__.lower() == "pretrainedconfig" for c in type(model).__mro__)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise SpecError("model", "config.json", "reading a Hugging Face config needs transformers: "
                        "pip install 'partition-planner[hf]' (or pip install transformers)") from exc
    return transformers


def load_config(path: str | Path) -> Any:
    """The ``PretrainedConfig`` of a ``config.json`` file, or of a folder that holds one (no download)."""
    transformers = _transformers()
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise SpecError("--model", str(path), "no such file; give a Hugging Face config.json (or the folder "
                        "holding it) on disk, or a preset name (`python -m planner models`)")
    data = read_json_file(file, "--model", what="the config", damaged_fix="fix the file")
    if not isinstance(data, dict) or "model_type" not in data:
        raise SpecError("model_type", None, "the config has no 'model_type' (e.g. \"llama\"); add it, as "
                        "transformers writes it", source=str(file))
    _check_dimensions(data, str(file))
    model_type = data.pop("model_type")
    auto = transformers.models.auto.configuration_auto
    if model_type not in auto.CONFIG_MAPPING_NAMES:
        close = _close(model_type, auto.CONFIG_MAPPING_NAMES)
        raise SpecError("model_type", model_type, f"transformers {transformers.__version__} does not know this "
                        f"model type; did you mean one of {close}? Families known to trace: "
                        f"{', '.join(TRACED_FAMILIES)}", source=str(file))
    _check_key_dimensions(data, model_type, str(file))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers validates fields in its own words
        raise SpecError("--model", str(path), f"transformers cannot read this {model_type} config "
                        f"({type(exc).__name__}: {_first_line(exc)}); fix the field it names") from None
    config.name_or_path = str(p if p.is_dir() else p.parent)
    return config


# Sizes a config states as whole numbers of at least 1, under the names transformers' families use.
_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "max_position_embeddings", "head_dim", "n_layer", "n_embd", "n_head", "n_inner", "d_model",
          "num_layers", "num_heads", "d_ff", "d_kv", "ffn_dim", "encoder_layers", "decoder_layers")


def _check_dimensions(data: dict[str, Any], source: str) -> None:
    """The config's sizes are whole numbers >= 1, the heads split the hidden size (unless ``head_dim`` sets
    it) and the key/value heads divide the query heads: what transformers would otherwise accept and the
    trace would price as a model that cannot exist (0 layers), or refuse in words that do not name the field."""
    for name in _SIZES:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SpecError(name, value, "expected a whole number >= 1", source=source)
    hidden, heads, kv = data.get("hidden_size"), data.get("num_attention_heads"), data.get("num_key_value_heads")
    if hidden and heads and data.get("head_dim") is None and hidden % heads:
        raise SpecError("num_attention_heads", heads, f"must divide hidden_size {hidden} (or set head_dim)",
                        source=source)
    if heads and kv and heads % kv:
        raise SpecError("num_key_value_heads", kv, f"must divide num_attention_heads {heads}", source=source)


# The dimensions that size a model, under transformers' standard names; a family may call them otherwise
# (GPT-2: n_embd, n_layer, n_head; T5: d_model, num_layers, num_heads), as its config class's attribute_map says.
_KEY_DIMENSIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def _check_key_dimensions(data: dict[str, Any], model_type: str, source: str) -> None:
    """A ``config.json`` states the model's width, depth and heads, under any name its family accepts.

    transformers fills a missing one with its class default (Llama's ``hidden_size`` 4096), so a config
    that lost a field would be planned as another model without a word. A dimension the class does not
    take (BART's depth is ``encoder_layers``, named through ``attribute_map``) is asked for under the
    name it does take; one it takes under no name is not asked for. A ``PretrainedConfig`` passed in
    Python is the user's object as built and is not checked here."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
        params = inspect.signature(config_class.__init__).parameters
    except Exception:  # transformers cannot load the class: AutoConfig.for_model then says why, in its words
        return
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    missing = []
    for standard in _KEY_DIMENSIONS:
        names = {standard, aliases.get(standard, standard)} | {k for k, v in aliases.items() if v == standard}
        taken = [n for n in (aliases.get(standard, standard), standard) if n in params]
        if not taken or names & data.keys():
            continue
        name = taken[0]
        default = params[name].default
        also = sorted(names - {name})
        missing.append(SpecError(name, None, f"missing: transformers would silently use {config_class.__name__}'s "
                                 f"default{'' if default is inspect.Parameter.empty else f' {default!r}'}, planning another "
                                 f"model; add the "
                                 f"model's {name}" + (f" (also read as {', '.join(also)})" if also else ""),
                                 source=source))
    raise_all(missing)


def model_class(config: Any) -> type[nn.Module]:
    """The class to build: the config's ``architectures[0]`` when transformers has it, else the auto head."""
    transformers = _transformers()
    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    from transformers.models.auto import modeling_auto

    model_type = config.model_type
    for mapping, _ in _HEADS:
        names = getattr(modeling_auto, mapping, {})
        if "SEQ" in mapping and not config.is_encoder_decoder:
            continue
        if mapping == "MODEL_FOR_MASKED_LM_MAPPING_NAMES" and getattr(config, "is_decoder", False):
            continue
        cls = getattr(transformers, _class_name(names.get(model_type)), None)
        if isinstance(cls, type):
            return cls
    raise SpecError("model_type", model_type, "transformers has no model class for this config; name one in "
                    "the config's \"architectures\" (e.g. [\"LlamaForCausalLM\"])")


def config_seq_len(config: Any, seq_len: int | None) -> int | None:
    """The positions the config allows, capped by ``seq_len``; a longer ``seq_len`` is an error."""
    if getattr(config, "image_size", None) and getattr(config, "patch_size", None):
        size, patch = _pair(config.image_size), _pair(config.patch_size)
        return (size[0] // patch[0]) * (size[1] // patch[1]) + 1  # patches + the class token
    positions = next((int(getattr(config, f)) for f in _POSITION_FIELDS
                      if isinstance(getattr(config, f, None), int) and getattr(config, f) > 0), None)
    if positions is None:
        if seq_len is None:
            raise SpecError("seq_len", None, f"this {config.model_type} config has no position table "
                            f"({' / '.join(_POSITION_FIELDS[:2])}); pass --seq-len (seq_len=) with the length "
                            "you train at")
        return seq_len
    if seq_len is not None and seq_len > positions:
        raise SpecError("seq_len", seq_len, f"the config has {positions} positions; use --seq-len <= {positions}")
    return seq_len or positions


def build(config: Any, *, seq_len: int | None = None) -> HFModel:
    """The config's model on the meta device and a batch-1 sample input (see the module docstring)."""
    from planner.models import _no_init

    cls = model_class(config)
    seq = config_seq_len(config, seq_len)
    try:
        with warnings.catch_warnings(), torch.device("meta"), _no_init():
            warnings.simplefilter("ignore")
            module = cls(config)
    except Exception as exc:
        raise SpecError("model", config.model_type, f"transformers cannot build {cls.__name__} from this config "
                        f"({type(exc).__name__}: {_first_line(exc)}); fix the field it names") from None
    module.train()
    sample = _sample(module, config, seq)
    source = config.name_or_path or ""
    label = Path(source).name if source else ""
    name = f"{label} ({cls.__name__})" if label else cls.__name__
    where = f"{source}/config.json" if source else "a PretrainedConfig"
    note = (f"Built from the Hugging Face config {where}: model_type {config.model_type}, {cls.__name__}, "
            f"sequence length {seq}.")
    return HFModel(module=module, sample_input=sample, seq_len=seq, name=name, note=note)


def _sample(module: nn.Module, config: Any, seq: int | None) -> dict[str, torch.Tensor]:
    kind = getattr(module, "main_input_name", "input_ids")
    meta = torch.device("meta")
    if kind == "input_ids":
        sample = {"input_ids": torch.zeros(1, seq, dtype=torch.long, device=meta)}
        if config.is_encoder_decoder:
            sample["decoder_input_ids"] = torch.zeros(1, seq, dtype=torch.long, device=meta)
        return sample
    if kind == "pixel_values":
        size = _pair(config.image_size)
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), *size, device=meta)}
    if kind == "input_values" and getattr(config, "conv_kernel", None):
        samples = seq  # the feature encoder's frames back to audio samples: (n - 1) * stride + kernel per conv
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
            samples = (samples - 1) * stride + kernel
        return {"input_values": torch.zeros(1, samples, device=meta)}
    raise SpecError("model", config.model_type, f"its input is {kind!r}, which the planner cannot make a sample "
                    "of; plan the module in Python with plan(module, cluster, sample_input=...)")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _class_name(entry: Any) -> str:
    if isinstance(entry, (tuple, list)):  # some mappings list several classes; the first is the default
        entry = entry[0] if entry else ""
    return entry or ""


def _close(word: str, known: Any) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, list(known), n=3, cutoff=0.5) or sorted(TRACED_FAMILIES)[:3]


def _first_line(exc: BaseException) -> str:
    """The message's first line, and the next one where the first only introduces it (ends with ':')."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]
