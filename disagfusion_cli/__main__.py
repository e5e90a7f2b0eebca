"""``python -m disagfusion_cli``: the ``disagfusion`` command where its script is not installed
(the GPU check runs from a source tree with PYTHONPATH)."""

from disagfusion_cli import app

app()
