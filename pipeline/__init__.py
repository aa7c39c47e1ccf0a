"""The inference pipeline: bundles, engine, tasks, explainability and artifacts.

It takes file paths or datasets in and gives artifacts out, and imports neither
``rest`` nor the DIMSE code, so it runs the same in the server, in a worker on
another machine and in ``dicom-node infer FILE``.
"""
