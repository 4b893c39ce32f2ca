"""Serving: the logged model's predictor and the drift check it runs on every request.

`predictor` decodes request images, scores them, applies the thresholds and calibration and, on
request, explains them; `drift` builds the training-time reference and scores how far a request's
images lie from it. Both import torch and the network only when they score, so importing this
package is cheap.
"""
