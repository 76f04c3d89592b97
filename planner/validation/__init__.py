"""``python -m planner validate``: the cost model's predictions against measured training runs.

:mod:`planner.validation.cases` turns the measured data in ``datasets/measured/`` into cases
(model, cluster, configuration, measurement) or skips with reasons; :mod:`planner.validation.price`
prices them with the cost model; :mod:`planner.validation.metrics` holds the metrics;
:mod:`planner.validation.report` prints the tables; :mod:`planner.validation.command` is the CLI.
``docs/validation.md`` explains every rule.

Nothing is imported here, so that ``python -m planner --help`` (which registers the command)
stays as cheap as before.
"""
