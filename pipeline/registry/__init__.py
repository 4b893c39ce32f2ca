"""The model registry: which version is promoted, and the MLflow calls that record it.

`client` logs the pyfunc, registers versions and moves the `challenger` and `champion` aliases;
`pyfunc_model` is the file MLflow runs to rebuild a logged model (models from code, no pickle).
"""
