"""Layer-level cost graph ⇄ JSON, so a plan file carries what the solvers saw.

``explain --what-if`` and ``evaluate --plan`` re-price a plan from this record without
retracing the model. Repeated blocks are stored once (by signature); the op-level graph is
not stored (it is large and the solvers do not read it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

import networkx as nx

from planner.trace.graph import CostGraph, ExpertRouting, Layer, OpCost, TiedParam

_PER_LAYER = ("index", "name", "param_count", "tied_params")
_PER_LAYER_IF_SET = ("frozen_count", "trained_tensors")  # written where not 0: a record without them reads as before


def graph_to_dict(graph: CostGraph) -> dict[str, Any]:
    bodies: dict[str, dict[str, Any]] = {}
    layers = []
    for layer in graph.layers:
        d = asdict(layer)
        if not layer.experts:  # a dense layer's record is as before expert routing was traced
            del d["experts"]
        for t in d["tied_params"]:
            if not t["frozen"]:
                del t["frozen"]
        if layer.signature not in bodies:
            bodies[layer.signature] = {k: v for k, v in d.items() if k not in _PER_LAYER + _PER_LAYER_IF_SET}
        layers.append({k: d[k] for k in _PER_LAYER} | {k: d[k] for k in _PER_LAYER_IF_SET if d[k]}
                      | {"signature": layer.signature})
    out = {
        "name": graph.name, "dtype": graph.dtype, "seq_len": graph.seq_len, "param_count": graph.param_count,
        "method": graph.method, "notes": list(graph.notes), "signatures": bodies, "layers": layers,
        "edges": [[u, v, d.get("bytes", 0.0)] for u, v, d in sorted(graph.layer_graph.edges(data=True))],
    }
    return json.loads(json.dumps(out))  # JSON-native (lists, not tuples): equal after a file round trip


def graph_from_dict(d: dict[str, Any]) -> CostGraph:
    known = {f.name for f in fields(Layer)}
    layers = []
    for entry in d["layers"]:
        body = dict(d["signatures"][entry["signature"]])
        body["op_costs"] = tuple(OpCost(**op) for op in body.get("op_costs", ()))
        body["experts"] = tuple(ExpertRouting(**e) for e in body.get("experts", ()))
        tied = tuple(TiedParam(**t) for t in entry.get("tied_params", ()))
        merged = {k: v for k, v in (body | entry).items() if k in known}
        merged["tied_params"] = tied
        layers.append(Layer(**merged))
    lg = nx.DiGraph()
    lg.add_nodes_from(range(len(layers)))
    for u, v, nbytes in d.get("edges", ()):
        lg.add_edge(int(u), int(v), bytes=float(nbytes))
    return CostGraph(name=d["name"], ops=nx.DiGraph(), layers=layers, layer_graph=lg, dtype=d["dtype"],
                     seq_len=d.get("seq_len"), param_count=int(d["param_count"]), method=d.get("method", "plan"),
                     notes=list(d.get("notes", ())))
