"""Command-line tools ``dlrm-plan`` and ``dlrm-run``: thin shells over the Python API."""
