"""Synthetic phantom generators and the training scripts of the demo models.

The demo bundles under ``pipeline/models/`` were produced by these scripts; see
each bundle's ``docs/README.md`` for the commands and the held-out scores.
"""
