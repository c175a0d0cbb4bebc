"""The models-from-code script (tracking.MODEL_CODE): MLflow logs it with the model and runs it, when
logging and when loading the model, to build the pyfunc. The package never imports it."""

from wflw_pipeline.mlops.pyfunc import set_landmark_model

set_landmark_model()
