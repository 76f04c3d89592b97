"""The runtime: execute a plan exactly as planned with ``torch.distributed``, and survive faults.

It reads a :class:`planner.plan.Plan`, checks it against the launch and the model, builds the
``(pp, dp, tp)`` device mesh, cuts the model into the planned stages and applies tensor parallel,
recompute, DDP/FSDP2 and the planned pipeline schedule, in that order. It never imports a solver
and never re-decides what the plan decided. Python API::

    from runtime import RunOptions, train          # inside an initialised process group
    result = train(plan, RunOptions(steps=10), data=my_loader)

    python -m runtime run plan.json --nproc 2 --steps 5 --out metrics.json   # command line

    pm = parallelize(model, plan, loss_fn=my_loss)    # a user's own model and loop, under torchrun
    loss = pm.step(inputs, targets); opt.step()        # see docs/train-your-own-model.md

See docs/runtime.md.
"""

from runtime.errors import CheckpointError, RunCheckError
from runtime.parallelize import ParallelModel, parallelize
from runtime.train import RunOptions, RunResult, train

__all__ = ["CheckpointError", "ParallelModel", "RunCheckError", "RunOptions", "RunResult", "parallelize", "train"]
