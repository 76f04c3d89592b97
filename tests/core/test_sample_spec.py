"""A module's sample input as the plan file records it (planner.sample_spec): structure, shapes and dtypes."""

import pytest
import torch
from torch import nn

from planner import ParallelConfig, Plan, evaluate
from planner.errors import SpecError
from planner.sample_spec import describe_sample, sample_from_spec


def test_round_trip_keeps_structure_shapes_and_dtypes():
    sample = {"input_ids": torch.ones(1, 8, dtype=torch.long), "pixels": (torch.ones(1, 3, 4, 4), None),
              "use_cache": False, "scale": 0.5}
    back = sample_from_spec(describe_sample(sample))
    assert set(back) == set(sample)
    assert back["input_ids"].shape == (1, 8) and back["input_ids"].dtype == torch.long
    assert back["pixels"][0].shape == (1, 3, 4, 4) and back["pixels"][0].dtype == torch.float32
    assert back["pixels"][1] is None and back["use_cache"] is False and back["scale"] == 0.5
    assert not back["input_ids"].any()  # zeros: the plan keeps no values


def test_what_a_file_cannot_hold_is_not_described():
    assert describe_sample((torch.zeros(1), object())) is None
    assert describe_sample({1: torch.zeros(1)}) is None


@pytest.mark.parametrize("spec", [{}, {"tensor": {"shape": [1], "dtype": "nope"}}, {"matrix": []}, "x"])
def test_a_bad_record_names_the_field(spec):
    with pytest.raises(SpecError, match="model.sample_input"):
        sample_from_spec(spec)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * mask)


def test_a_module_plan_records_its_sample_and_a_preset_plan_does_not(tmp_path):
    cfg = ParallelConfig(dp=2, micro_batch_size=1, num_micro_batches=1)
    p = evaluate(TwoInputs(), "cpu-local", cfg, sample_input=(torch.zeros(1, 4), torch.ones(1, 4)),
                 devices_per_node=2, dtype="fp32")
    p.to_json(str(tmp_path / "m.json"))
    back = Plan.from_json(str(tmp_path / "m.json"))
    assert back.model.sample_input == {"tuple": [{"tensor": {"shape": [1, 4], "dtype": "float32"}}] * 2}
    preset = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2)
    assert "sample_input" not in preset.to_dict()["model"]  # a preset's file is as before
