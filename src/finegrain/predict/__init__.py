"""Prediction on new images with any finegrain, open_clip or released checkpoint (see :mod:`.predictors`).

>>> predictor = finegrain.load_predictor("runs/demo-finetune/ovd/best.pt")
>>> detections = predictor(["photo.jpg"], classes=["red star", "blue circle"])[0]
"""

from .inputs import list_images
from .loading import LoadedCheckpoint, load_checkpoint, load_model, parse_model_spec
from .predictors import (
    ClipPredictor,
    InstanceDetector,
    OpenVocabularyDetector,
    Predictor,
    Segmenter,
    load_predictor,
)
from .results import Classification, Detections, Segmentation

__all__ = ["Classification", "ClipPredictor", "Detections", "InstanceDetector", "LoadedCheckpoint",
           "OpenVocabularyDetector", "Predictor", "Segmentation", "Segmenter", "list_images", "load_checkpoint",
           "load_model", "load_predictor", "parse_model_spec"]
