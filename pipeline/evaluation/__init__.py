"""Evaluation: scoring a split, calibration, subgroups, localisation maps and the plots of them all.

`scoring` scores validation and test and writes the evaluation's reports; `calibration` fits the
probability correction on validation; `subgroups` scores patient groups; `explain` computes
Grad-CAM and prototype maps and `heatmaps` the gallery and localisation figures; `plots` draws
every PNG the pipeline logs. Import the module you need: this package imports nothing itself, so
training and serving can use `plots` or `calibration` without loading the rest.
"""
