"""Evaluation: image-text retrieval, zero-shot classification, box (region) classification (records and COCO
panoptic), open-vocabulary segmentation, CLIP_benchmark interop (one registry of these protocols:
:mod:`.protocols`), named benchmarks and results files."""

from .benchmarks import BENCHMARKS, run_benchmark
from .box_classification import (
    crop_box,
    evaluate_box_classification,
    evaluate_panoptic_box_classification,
    predict_boxes,
)
from .classification import class_text_embeddings, classification_metrics
from .clip_benchmark import evaluate_clip_benchmark_retrieval, evaluate_clip_benchmark_zero_shot
from .encode import evaluating
from .prompts import TEMPLATE_SETS, Templates, load_class_names, load_templates
from .protocols import PROTOCOLS, Protocol
from .results import append_result, compare_runs, read_results
from .retrieval import evaluate_retrieval, retrieval_metrics
from .segmentation import evaluate_segmentation, predict_segmentation
from .tasks import evaluate
from .zero_shot import evaluate_zero_shot

__all__ = [
    "BENCHMARKS",
    "PROTOCOLS",
    "TEMPLATE_SETS",
    "Protocol",
    "Templates",
    "append_result",
    "class_text_embeddings",
    "classification_metrics",
    "compare_runs",
    "crop_box",
    "evaluate",
    "evaluate_box_classification",
    "evaluate_clip_benchmark_retrieval",
    "evaluate_clip_benchmark_zero_shot",
    "evaluate_panoptic_box_classification",
    "evaluate_retrieval",
    "evaluate_segmentation",
    "evaluate_zero_shot",
    "evaluating",
    "load_class_names",
    "load_templates",
    "predict_boxes",
    "predict_segmentation",
    "read_results",
    "retrieval_metrics",
    "run_benchmark",
]
