"""Hugging Face configs planned without a download: ``--model path/to/config.json`` and ``plan(PretrainedConfig)``.

Each config here is small (hidden 64, 2 layers, vocabulary 128) and written to a temporary
``config.json`` the way transformers writes one. The family sweep traces every candidate ``model_type``
and checks :data:`planner.models.hf_config.TRACED_FAMILIES` is exactly the set that traces.
"""

from __future__ import annotations

import json
import warnings

import pytest

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

from planner.api import plan  # noqa: E402
from planner.cli import main  # noqa: E402
from planner.errors import SpecError  # noqa: E402
from planner.models import hf_config  # noqa: E402
from planner.trace import trace_model  # noqa: E402
from planner.trace.meter import ATTENTION_KERNELS  # noqa: E402

VOCAB, HIDDEN, LAYERS = 128, 64, 2
DECODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
ENCODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
           "num_attention_heads": 4, "max_position_embeddings": 64}
# model_type -> a small config of it (what a user's config.json holds, less the sizes).
SMALL: dict[str, dict] = {
    "llama": {**DECODER, "architectures": ["LlamaForCausalLM"]},
    "mistral": DECODER,
    "mixtral": {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": DECODER,
    "gemma": {**DECODER, "head_dim": 16},
    "phi3": {**DECODER, "pad_token_id": 0},
    "gpt_neox": ENCODER,
    "opt": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "ffn_dim": 128, "num_hidden_layers": LAYERS,
            "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": HIDDEN, "pad_token_id": 1},
    "gpt2": {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 64},
    "bert": ENCODER,
    "roberta": {**ENCODER, "pad_token_id": 1},
    "t5": {"vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": 16, "d_ff": 128, "num_layers": LAYERS,
           "num_decoder_layers": LAYERS, "num_heads": 4},
    "vit": {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "intermediate_size": 128,
            "image_size": 32, "patch_size": 8},
    "qwen3": {**DECODER, "head_dim": 16},
    "falcon": {k: v for k, v in ENCODER.items() if k != "intermediate_size"},
    "gpt_neo": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": 4,
                "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 64},
    "distilbert": {"vocab_size": VOCAB, "dim": HIDDEN, "hidden_dim": 128, "n_layers": LAYERS, "n_heads": 4,
                   "max_position_embeddings": 64},
    "bart": {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
             "decoder_ffn_dim": 128, "max_position_embeddings": 64},
    # module-level trace: its training-mode LayerDrop is data-dependent, so torch.export fails
    "wav2vec2": {"vocab_size": 32, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                 "intermediate_size": 128, "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2],
                 "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
    # A candidate that does not trace: its input is log-mel features, which no sample is made of.
    "whisper": {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
                "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                "decoder_ffn_dim": 128, "num_mel_bins": 16, "max_source_positions": 32, "max_target_positions": 32,
                "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1},
}
SEQ_LEN = {"t5": 32, "wav2vec2": 50, "whisper": 32}


def write_config(folder, model_type: str, **extra) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **SMALL[model_type], **extra}))
    return str(path)


def traces(model_type: str, tmp_path) -> tuple[bool, str]:
    """Whether the family's small config builds and traces with every parameter counted, and why not."""
    try:
        built = hf_config.build(hf_config.load_config(write_config(tmp_path / model_type, model_type)),
                                seq_len=SEQ_LEN.get(model_type))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = trace_model(built.module, built.sample_input, name=model_type, dtype="bf16",
                                seq_len=built.seq_len)
    except Exception as exc:  # a family that does not trace: the sweep records it
        return False, f"{type(exc).__name__}: {exc}"[:200]
    unique = sum(p.numel() for p in built.module.parameters())
    ok = graph.param_count == unique and graph.fwd_flops > 0 and graph.num_layers > LAYERS
    return ok, f"method {graph.method}, {graph.num_layers} layers, {graph.param_count} of {unique} parameters"


@pytest.mark.slow
def test_traced_families_are_exactly_those_that_trace(tmp_path):
    found = {t: traces(t, tmp_path) for t in SMALL}
    tracing = {t for t, (ok, _) in found.items() if ok}
    assert tracing == set(hf_config.TRACED_FAMILIES), found
    assert not found["whisper"][0] and "input_features" in found["whisper"][1]


def test_llama_config_plans_from_the_cli(tmp_path, capsys):
    config = write_config(tmp_path / "tiny-llama", "llama")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", config, "--cluster", "cpu-local", "--devices-per-node", "2",
                 "--global-batch", "8", "--seq-len", "32", "-o", str(out), "--no-progress", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny-llama (LlamaForCausalLM)"
    saved = json.loads(out.read_text())["model"]
    # embedding 128x64, two decoder layers (q 64x64, k/v 64x32 with 2 of 4 kv heads, o 64x64, SwiGLU 3x64x128,
    # two norms of 64), the final norm, the untied head 64x128
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert saved["param_count"] == 128 * 64 + 2 * layer + 64 + 64 * 128
    assert saved["seq_len"] == 32 and saved["preset"] is None


def test_seq_len_defaults_to_the_config_positions_and_is_capped():
    config = transformers.AutoConfig.for_model("llama", **DECODER)
    assert hf_config.config_seq_len(config, None) == 64
    assert hf_config.config_seq_len(config, 16) == 16
    with pytest.raises(SpecError, match="use --seq-len <= 64"):
        hf_config.config_seq_len(config, 128)
    with pytest.raises(SpecError, match="pass --seq-len"):
        hf_config.config_seq_len(transformers.AutoConfig.for_model("t5", **SMALL["t5"]), None)
    vit = transformers.AutoConfig.for_model("vit", **SMALL["vit"])
    assert hf_config.config_seq_len(vit, None) == (32 // 8) ** 2 + 1


def test_python_api_takes_a_pretrained_config():
    config = transformers.GPT2Config(**SMALL["gpt2"])
    p = plan(config, "cpu-local", devices_per_node=2, global_batch=4, seq_len=16, baselines=False)
    assert p.model.name == "GPT2LMHeadModel" and p.model.seq_len == 16
    # tied head: the embedding 128x64 counted once, positions 64x64, two blocks, final norm
    block = 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
    assert p.model.param_count == 128 * 64 + 64 * 64 + 2 * block + 2 * 64


def test_head_follows_architectures_else_the_auto_mappings():
    bert = transformers.AutoConfig.for_model("bert", **ENCODER)
    assert hf_config.model_class(bert).__name__ == "BertForMaskedLM"
    t5 = transformers.AutoConfig.for_model("t5", **SMALL["t5"])
    assert hf_config.model_class(t5).__name__ == "T5ForConditionalGeneration"
    bert.architectures = ["BertForSequenceClassification"]
    assert hf_config.model_class(bert).__name__ == "BertForSequenceClassification"


@pytest.mark.parametrize("content, field, words", [
    ({"model_type": "lama", **DECODER}, "model_type", "did you mean one of ['llama'"),
    (dict(DECODER), "model_type", "has no 'model_type'"),
    ("{not json", "--model", "not valid JSON"),
    ({"model_type": "llama", **DECODER, "num_hidden_layers": 0}, "num_hidden_layers", "whole number >= 1"),
    ({"model_type": "llama", **DECODER, "vocab_size": 2.5}, "vocab_size", "whole number >= 1"),
    ({"model_type": "llama", **DECODER, "num_attention_heads": 5}, "num_attention_heads", "must divide hidden_size"),
    ({"model_type": "llama", **DECODER, "num_key_value_heads": 3}, "num_key_value_heads",
     "must divide num_attention_heads"),
])
def test_bad_configs_name_the_field(tmp_path, capsys, content, field, words):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SpecError) as info:
        hf_config.load_config(path)
    assert info.value.field == field and words in str(info.value)
    assert main(["plan", "--model", str(path), "--cluster", "cpu-local", "--global-batch", "8"]) == 2
    assert words in capsys.readouterr().err


def test_a_config_transformers_cannot_read_is_a_spec_error_with_its_reason(tmp_path):
    path = write_config(tmp_path / "bad", "llama", head_dim=7)  # RoPE rotates pairs: an odd head size is refused
    with pytest.raises(SpecError, match="cannot (read|build)") as info:
        hf_config.build(hf_config.load_config(path))
    assert "RoPE" in str(info.value)  # transformers' reason, not only its validator's name


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        hf_config.load_config(tmp_path / "nowhere" / "config.json")



@pytest.mark.multiprocess
def test_the_runtime_trains_a_plan_made_from_a_config(tmp_path):
    """The user's own code builds the model from the same config (``from_config``, tests/fixtures/hf_user_llama.py);
    the runtime retraces it, finds the plan's fingerprint, cuts two stages at the plan's layer names and trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = write_config(tmp_path / "tiny-llama", "llama")
    plan_path, out = tmp_path / "plan.json", tmp_path / "metrics.json"
    assert main(["plan", "--model", config, "--cluster", "cpu-local", "--devices-per-node", "2", "--pp", "2",
                 "--global-batch", "8", "--seq-len", "32", "-o", str(plan_path), "--no-progress"]) == 0
    run = subprocess.run([sys.executable, "-m", "runtime", "run", str(plan_path), "--nproc", "2", "--steps", "2",
                          "--model", "hf_user_llama:model", "--data", "hf_user_llama:batches", "--out", str(out),
                          "--quiet"], cwd=Path(__file__).parents[1] / "fixtures", env={**os.environ, "HF_CONFIG": config},
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["run"]["path"] == "runtime.parallelize" and len(metrics["steps"]) == 2
    assert all(4.0 < s["loss"] < 6.0 for s in metrics["steps"])  # random tokens: about ln(128) = 4.85


def test_hf_sdpa_attention_is_priced_as_the_fused_kernel_under_export(tmp_path):
    """transformers' Llama calls SDPA; torch.export traces it with fake tensors, which must take the fused
    kernel as plain meta tensors do: no s x s score tensor in the trace, and the graph says 'fused'."""
    built = hf_config.build(hf_config.load_config(write_config(tmp_path / "llama", "llama")), seq_len=64)
    graph = trace_model(built.module, built.sample_input, name="llama", dtype="bf16", seq_len=built.seq_len)
    assert graph.attention == "fused"
    # Its causal mask (built because tracing hides padding) is priced as causal FlashAttention, which the
    # module runs on unpadded batches: the kernel skips the masked half and reads no s x s bias.
    kernels = [op for layer in graph.layers for op in layer.op_costs if op.kind in ATTENTION_KERNELS]
    assert kernels and all(op.kind == "_scaled_dot_product_flash_attention" and op.causal for op in kernels)
    assert any("is_causal=True" in note for note in graph.notes)
