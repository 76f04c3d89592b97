"""Files the planner reads at run time, shipped inside the package (read with ``importlib.resources``).

The entries here are links into the repository's user-facing folders, so git holds each file once:
``datasets`` → ``datasets/`` (model and cluster presets, ``measured/``), ``plan.schema.json`` and
``cluster.schema.json`` → ``docs/``. An editable install reads them through the links; building a
wheel (``pip install .``) copies what they point to into ``planner/_data/`` (``pyproject.toml``'s
package data), so an installed planner needs no checkout. :mod:`planner.paths` is the only reader.
"""
