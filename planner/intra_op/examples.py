"""Hand-built op graphs of the layers the literature parallelises: a GPT block (attention + MLP,
as ``planner.models.gpt`` writes it), its two halves, and a GShard mixture-of-experts layer.

They need no tracing, so tests and benchmarks can use GPT-3 sizes (hidden 12288) instantly.
"""

from __future__ import annotations

from planner.intra_op.builder import GraphBuilder
from planner.intra_op.graph import OpGraph


def _attention(b: GraphBuilder, x: str, *, batch: int, seq: int, hidden: int, heads: int) -> str:
    hd = hidden // heads
    h = b.norm("ln1", x)
    qkv = b.linear("attn.qkv", h, 3 * hidden)
    heads_t = {}
    for part in "qkv":
        piece = b.chunk(f"{part}", qkv, 2, 3)
        view = b.reshape(f"{part}_view", piece, (batch, seq, heads, hd))
        heads_t[part] = b.transpose(f"{part}_heads", view, 1, 2)
    k_t = b.transpose("k_t", heads_t["k"], 2, 3)
    scores = b.matmul("scores", heads_t["q"], k_t)
    scaled = b.pointwise("scale", scores, kind="mul", linear=True, saved=False)
    masked = b.pointwise("causal_mask", scaled, kind="masked_fill", saved=False)
    probs = b.softmax("softmax", masked)
    dropped = b.dropout("attn_drop", probs)
    context = b.matmul("context", dropped, heads_t["v"])
    merged = b.reshape("context_view", b.transpose("context_t", context, 1, 2), (batch, seq, hidden))
    proj = b.linear("attn.proj", merged, hidden)
    return b.add("add1", x, b.dropout("resid_drop", proj))


def _mlp(b: GraphBuilder, x: str, *, hidden: int, ffn: int, suffix: str = "2") -> str:
    h = b.norm(f"ln{suffix}", x)
    h = b.pointwise("gelu", b.linear("mlp.fc1", h, ffn))
    h = b.dropout("mlp_drop", b.linear("mlp.fc2", h, hidden))
    return b.add(f"add{suffix}", x, h)


def gpt_block_graph(*, batch: int, seq: int, hidden: int, heads: int, ffn: int | None = None,
                    dtype: str = "bf16", name: str = "gpt_block") -> OpGraph:
    """One pre-norm GPT block: ``x + attn(ln1(x))`` then ``+ mlp(ln2(.))``, with dropouts."""
    if hidden % heads:
        raise ValueError(f"heads: {heads} does not divide hidden={hidden}")
    b = GraphBuilder(name, dtype=dtype)
    x = b.input("x", (batch, seq, hidden), roles=("batch", "seq", None))
    x = _attention(b, x, batch=batch, seq=seq, hidden=hidden, heads=heads)
    _mlp(b, x, hidden=hidden, ffn=ffn or 4 * hidden)
    return b.build()


def attention_graph(*, batch: int, seq: int, hidden: int, heads: int, dtype: str = "bf16",
                    name: str = "attention") -> OpGraph:
    """The attention half of a GPT block, residual included."""
    b = GraphBuilder(name, dtype=dtype)
    x = b.input("x", (batch, seq, hidden), roles=("batch", "seq", None))
    _attention(b, x, batch=batch, seq=seq, hidden=hidden, heads=heads)
    return b.build()


def mlp_graph(*, batch: int, seq: int, hidden: int, ffn: int | None = None, dtype: str = "bf16",
              name: str = "mlp") -> OpGraph:
    """The MLP half of a GPT block, residual included."""
    b = GraphBuilder(name, dtype=dtype)
    x = b.input("x", (batch, seq, hidden), roles=("batch", "seq", None))
    _mlp(b, x, hidden=hidden, ffn=ffn or 4 * hidden, suffix="")
    return b.build()


def moe_graph(*, groups: int, group_size: int, model: int, ffn: int, experts: int, capacity: int | None = None,
              dtype: str = "bf16", name: str = "moe") -> OpGraph:
    """A GShard MoE layer in GShard's own einsums (Lepikhin et al. 2020, Algorithm 2).

    ``g`` groups of ``s`` tokens are routed to ``e`` experts with ``c`` slots each; the dense
    dispatch/combine einsums move tokens between the group-major and the expert-major layout, so
    splitting groups before and experts after costs exactly an all-to-all.
    """
    c = capacity or max(1, 2 * group_size // experts)
    names = {"g": "group", "s": "token", "e": "expert", "c": "capacity", "m": "model", "f": "ffn"}
    b = GraphBuilder(name, dtype=dtype)
    x = b.input("x", (groups, group_size, model), roles=("batch", "seq", None))
    logits = b.einsum("router", "gsm,me->gse", [x], {"router.weight": (model, experts)}, names=names)
    mask = b.opaque("gating", [logits], (groups, group_size, experts, c), kind="top2_gating")
    dispatched = b.einsum("dispatch", "gsec,gsm->egcm", [mask, x], names=names)
    h = b.einsum("expert_fc1", "egcm,emf->egcf", [dispatched], {"experts.fc1.weight": (experts, model, ffn)},
                 names=names, kind="expert_linear")
    h = b.pointwise("expert_act", h)
    y = b.einsum("expert_fc2", "egcf,efm->egcm", [h], {"experts.fc2.weight": (experts, ffn, model)}, names=names,
                 kind="expert_linear")
    b.einsum("combine", "gsec,egcm->gsm", [mask, y], names=names)
    return b.build()
