"""Evaluation: image-text retrieval, box (region) classification and zero-shot classification."""

from .box_classification import crop_box, evaluate_box_classification
from .classification import DEFAULT_TEMPLATES, class_text_embeddings, classification_metrics
from .encode import evaluating
from .retrieval import evaluate_retrieval, retrieval_metrics
from .tasks import TASKS, evaluate
from .zero_shot import evaluate_zero_shot

__all__ = [
    "DEFAULT_TEMPLATES", "TASKS", "class_text_embeddings", "classification_metrics", "crop_box", "evaluate",
    "evaluate_box_classification", "evaluate_retrieval", "evaluate_zero_shot", "evaluating",
    "retrieval_metrics",
]
