"""Worker update transforms and their receiving-side decode (see ``base``)."""

from fedbus.transforms.base import LocalUpdate, Pipeline, TrainPlan, Transform, UpdateContext
from fedbus.transforms.factory import build_worker_pipeline, decode_received, decode_update

__all__ = ["LocalUpdate", "Pipeline", "TrainPlan", "Transform", "UpdateContext", "build_worker_pipeline",
           "decode_received", "decode_update"]
