"""Stacks of layers built from torch.nn's own containers (nn.TransformerEncoder, nn.Transformer) are layers.

torch.fx keeps every torch.nn module whole, so the encoder used to be one call whose costs landed on
the layer before it, and its layers were reported as never run: the model could not be pipelined.
"""

from __future__ import annotations

import torch
from torch import nn

from planner import ParallelConfig, evaluate
from planner.trace import trace_model


class Encoder(nn.Module):
    def __init__(self, depth: int = 3, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


def test_the_layers_of_an_nn_transformer_encoder_are_layers():
    ids = torch.zeros(1, 16, dtype=torch.long)
    graph = trace_model(Encoder(), (ids,), dtype="fp32")
    names = [layer.name for layer in graph.layers]
    assert names == ["emb", "enc.layers.0", "enc.layers.1", "enc.layers.2", "head"]
    assert not any("never ran" in note for note in graph.notes)
    blocks = [layer for layer in graph.layers if layer.name.startswith("enc.layers")]
    assert all(b.fwd_flops > 0 and b.param_count > 0 for b in blocks)
    assert blocks[0].fwd_flops > 10 * graph.layers[0].fwd_flops  # the encoder's work is its own, not emb's
    p = evaluate(Encoder(), "cpu-local", ParallelConfig(dp=1, pp=2, micro_batch_size=1, num_micro_batches=2),
                 devices_per_node=2, sample_input=ids)
    assert len(p.stages) == 2 and p.predicted.fits
