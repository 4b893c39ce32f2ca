"""The model card: what a clinician or reviewer reads before a model version may be used.

`sections` reads a run's files and builds the card's sections, from intended use to the registry
decision; the card is rendered as Markdown (beside the reports) and as a self-contained HTML page
(in the registered model's run).
"""
