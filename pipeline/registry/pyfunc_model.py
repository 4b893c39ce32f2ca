"""The model file of the logged pyfunc (MLflow's models from code).

MLflow runs this file, not a pickle, to build the model when it loads a logged version
(`mlflow.pyfunc.load_model`, `mlflow models serve`): the class comes from the `pipeline` package
that travels with the model, so a version loads with the code it was logged with and nothing is
deserialised from a pickle. The network, prototypes and thresholds are the model's artifacts,
read by `CxrDwmlModel.load_context`.
"""

import mlflow

from pipeline.serving.predictor import CxrDwmlModel

mlflow.models.set_model(CxrDwmlModel())
