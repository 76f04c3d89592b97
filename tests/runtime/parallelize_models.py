"""The models, plans, data and worker functions of the ``parallelize`` tests (a user's own script, in pieces).

Two models a user might bring: :class:`SkipLM`, a hand-written language model whose head reads the
embedding directly (a skip across pipeline stages), and Hugging Face's ``LlamaForCausalLM`` from a
small config (2 layers, hidden 64, no download). Plans come from the planner
(``planner.api.evaluate`` on ``cpu-local``), data from a seeded generator sliced by dp rank as a
user's loader would, and the oracle is plain single-process PyTorch with the same optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.plan import ParallelConfig, Plan

VOCAB = 128
SEQ = 16
HIDDEN = 64
GLOBAL_BATCH = 8
LR = 1e-3
STEPS = 3
LOSS_TOL = 1e-5


class SkipLM(nn.Module):
    """Embedding, MLP blocks with residuals, and a head that reads the embedding again (not a chain)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = 4, wide: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(layers))
        if wide is not None:  # one block wider than planned: the mismatch test
            self.blocks[wide] = nn.Sequential(nn.Linear(hidden, 8 * hidden), nn.GELU(), nn.Linear(8 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        h = e
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h) + e)


class TiedLM(nn.Module):
    """A chain whose head is tied to the token embedding (``head.weight is embed.weight``), as GPT's is."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT's: unit-variance logits would put the loss near 60

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _hf(name: str) -> nn.Module:
    """Hugging Face models from small configs, every dropout off (their masks would differ from one process's)."""
    import transformers as T

    small = {"vocab_size": VOCAB}
    decoder = {**small, "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(**small, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**decoder))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**decoder))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(**small, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, max_position_embeddings=64,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if name == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(**small, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2,
                                                       num_decoder_layers=2, num_heads=4, dropout_rate=0.0))
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, image_size=32, patch_size=8,
                                                       num_labels=10, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0))
    raise ValueError(name)


HF_ZOO = ("gpt2", "mistral", "qwen2", "bert", "t5", "vit")


def build(name: str, *, device: str = "cpu", wide: int | None = None) -> nn.Module:
    """The model ``name`` with seed-0 weights (or on the meta device): the same on every rank."""
    torch.manual_seed(0)
    with torch.device(device):
        if name == "skip":
            model = SkipLM(wide=wide)
        elif name == "frozen":  # fine-tuning: the embedding and the first block stay as they are
            model = SkipLM()
            model.embed.requires_grad_(False)
            model.blocks[0].requires_grad_(False)
        elif name == "tied":
            model = TiedLM()
        elif name == "llama":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config())
        else:
            model = _hf(name)
    return model.train()


def sample_input(name: str):
    """What the plan was made with (batch 1)."""
    x, _ = global_batch(0, name)
    return {k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]


def loss_fn(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch; the output is logits or an object with ``.logits``."""
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def global_batch(step: int, name: str = "skip"):
    """``(inputs, targets)`` of step ``step``: tokens and next tokens, or the inputs a model of ``name`` takes."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    if name == "t5":
        decoder = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ // 2 + 1), generator=gen)
        return {"input_ids": tokens[:, :-1], "decoder_input_ids": decoder[:, :-1]}, decoder[:, 1:]
    if name == "vit":
        return {"pixel_values": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen)}, tokens[:, 0] % 10
    return tokens[:, :-1], tokens[:, 1:]


def my_loader(rank: int, world: int, steps: int = STEPS, name: str = "skip"):
    """A user's loader: this dp rank's rows of each global batch."""
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(steps):
        x, y = global_batch(step, name)
        yield ({k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]), y[rows]


CONFIGS: dict[str, ParallelConfig] = {  # global batch 8 in each
    "pp=2": ParallelConfig(pp=2, micro_batch_size=2, num_micro_batches=4),
    "dp=2": ParallelConfig(dp=2, micro_batch_size=2, num_micro_batches=2),
    "tp=2": ParallelConfig(tp=2, micro_batch_size=2, num_micro_batches=4),
    "dp=2 zero3": ParallelConfig(dp=2, zero_stage=3, micro_batch_size=2, num_micro_batches=2),
    "dp=2 zero3 recompute=op": ParallelConfig(dp=2, zero_stage=3, micro_batch_size=2, num_micro_batches=2,
                                              recompute="op"),
    "pp=2 x dp=2": ParallelConfig(pp=2, dp=2, micro_batch_size=2, num_micro_batches=2),
    "pp=2 x tp=2": ParallelConfig(pp=2, tp=2, micro_batch_size=2, num_micro_batches=4),
    "pp=2 x dp=2 zero3": ParallelConfig(pp=2, dp=2, zero_stage=3, micro_batch_size=2, num_micro_batches=2),
    "dp=2 zero1": ParallelConfig(dp=2, zero_stage=1, micro_batch_size=2, num_micro_batches=2),
    "dp=2 zero2": ParallelConfig(dp=2, zero_stage=2, micro_batch_size=2, num_micro_batches=2),
    "pp=2 zb-v": ParallelConfig(pp=2, virtual_stages=2, schedule="zb-v", micro_batch_size=2, num_micro_batches=4),
    "pp=2 zb-v x dp=2 zero1": ParallelConfig(pp=2, dp=2, zero_stage=1, virtual_stages=2, schedule="zb-v",
                                             micro_batch_size=2, num_micro_batches=2),
    "pp=2 zb-v x tp=2": ParallelConfig(pp=2, tp=2, virtual_stages=2, schedule="zb-v", micro_batch_size=2,
                                       num_micro_batches=4),
}


def plan_for(name: str, config: str) -> Plan:
    """The planner's plan for model ``name`` at ``config`` on ``cpu-local`` (one node of dp x tp x pp processes)."""
    from planner.api import evaluate

    cfg = CONFIGS[config]
    return evaluate(build(name, device="meta"), "cpu-local", cfg, sample_input=sample_input(name),
                    devices_per_node=cfg.world_size, dtype="fp32")


def reference_losses(name: str, steps: int = STEPS) -> list[float]:
    """Plain single-process PyTorch: the whole global batch, one forward and backward, AdamW."""
    torch.set_num_threads(1)
    model = build(name)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        x, y = global_batch(step, name)
        loss = loss_fn(model(**x) if isinstance(x, dict) else model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def references(names: list[str]) -> dict[str, list[float]]:
    """Worker entry point (a one-process world keeps pytest's own process from training)."""
    return {n: reference_losses(n) for n in names}


def train_case(name: str, plan: Plan, steps: int = STEPS) -> tuple[list[float], tuple[int, int], tuple[int, int]]:
    """The user's script: parallelize, a torch optimizer over the rank's parameters, the user's loop.

    Returns the losses; the parameter bytes the rank holds after ``parallelize`` next to what the plan
    gives it (``planned_parameter_bytes``): a model with real weights keeps only its shards too; and the
    bytes of the optimizer's state tensors after the last step, with how many tensors it updates."""
    import torch.distributed as dist

    from runtime import parallelize
    from runtime.materialize import planned_parameter_bytes, resident_parameter_bytes

    planned = planned_parameter_bytes(plan, build(name, device="meta"), dist.get_rank())
    pm = parallelize(build(name), plan, loss_fn=loss_fn, sample_input=sample_input(name))
    held = (resident_parameter_bytes(pm.stages), planned)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = []
    for inputs, targets in my_loader(rank=pm.data_rank, world=pm.data_world, steps=steps, name=name):
        losses.append(pm.step(inputs, targets))
        opt.step()
        opt.zero_grad()
    state = [getattr(v, "_local_tensor", v) for s in opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    return losses, held, (sum(v.numel() * v.element_size() for v in state), len(list(pm.parameters())))


def resume_elsewhere(save_plan: Plan, load_plan: Plan, folder: str) -> list[float]:
    """Train the skip model 1 step under ``save_plan`` and save (model and optimizer, DCP); then a fresh model
    under ``load_plan`` loads it and trains steps 2 and 3. Returns the 3 losses."""
    from runtime import parallelize

    pm = parallelize(build("skip"), save_plan, loss_fn=loss_fn, sample_input=sample_input("skip"))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    x, y = next(my_loader(pm.data_rank, pm.data_world))
    losses = [pm.step(x, y)]
    opt.step()
    opt.zero_grad()
    pm.save(folder, step=1, optimizer=opt)
    torch.manual_seed(123)  # the fresh model starts from other weights: only the checkpoint can bring it back
    pm = parallelize(build("skip").apply(lambda m: [p.data.normal_() for p in m.parameters(recurse=False)]),
                     load_plan, loss_fn=loss_fn, sample_input=sample_input("skip"))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    pm.load(folder, optimizer=opt)
    for step, (x, y) in enumerate(my_loader(pm.data_rank, pm.data_world)):
        if step == 0:
            continue
        losses.append(pm.step(x, y))
        opt.step()
        opt.zero_grad()
    return losses


def from_safetensors(plan: Plan, folder: str) -> list[float]:
    """Llama built on meta, materialised shard by shard and filled from Hugging Face safetensors files."""
    from runtime import parallelize

    model = build("llama", device="meta")
    pm = parallelize(model, plan, loss_fn=loss_fn, sample_input=sample_input("llama"), checkpoint=folder,
                     init_fn=lambda stage: stage.apply(model._init_weights))  # recomputes the rotary tables
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = []
    for inputs, targets in my_loader(rank=pm.data_rank, world=pm.data_world):
        losses.append(pm.step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return losses


def run_cases(cases: list[tuple[str, str, Plan]], refused: list[tuple[str, str, Plan, int | None]] = (),
              meta_plans: list[Plan] = (), loads: list[tuple[str, Plan, Plan | None, str]] = ()) -> dict:
    """Worker entry point: every rank trains every case; then the refusals (``(label, model, plan, wider block)``:
    ``parallelize`` must raise ``RunCheckError``), the meta materialisations and the
    loads (``(label, plan, second plan or None, folder)``: a DCP resume under the second plan, or safetensors).

    Returns ``{"losses": {(model, config): [...]}, "refused": {label: message}, "bytes": [(resident, planned,
    predicted, first loss)], "loads": {label: losses}}``."""
    import time

    import torch.distributed as dist

    from runtime import RunCheckError, parallelize
    from runtime.launch import init_distributed
    from runtime.materialize import planned_parameter_bytes, resident_parameter_bytes

    torch.set_num_threads(1)
    init_distributed(60.0)
    out: dict = {"losses": {}, "refused": {}, "bytes": [], "seconds": {}, "held": {}, "optimizer": {}}
    try:
        for name, config, plan in cases:
            start = time.perf_counter()
            key = (name, config)
            out["losses"][key], out["held"][key], out["optimizer"][key] = train_case(name, plan)
            out["seconds"][(name, config)] = time.perf_counter() - start
        for label, name, plan, wide in refused:
            try:
                parallelize(build(name, wide=wide), plan, loss_fn=loss_fn, sample_input=sample_input(name))
            except RunCheckError as exc:
                out["refused"][label] = str(exc)
        for plan in meta_plans:
            meta = build("skip", device="meta")
            planned = planned_parameter_bytes(plan, meta, dist.get_rank())
            pm = parallelize(meta, plan, loss_fn=loss_fn, sample_input=sample_input("skip"))
            resident = resident_parameter_bytes(pm.stages)
            stage = next(s for s in plan.stages if dist.get_rank() in s.ranks)
            predicted = plan.predicted.stages[stage.device_index]["memory_bytes"]["weights"] \
                if plan.predicted.stages else None
            x, y = next(my_loader(pm.data_rank, pm.data_world))
            first = pm.step(x, y)
            out["bytes"].append((resident, planned, predicted, first))
        out["loads"] = {}
        for label, plan, second, folder in loads:
            out["loads"][label] = resume_elsewhere(plan, second, folder) if second is not None else \
                from_safetensors(plan, folder)
    finally:
        dist.destroy_process_group()
    return out
