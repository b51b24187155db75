"""Fine-tuning tasks: a finegrain backbone with a dense head (segmentation, detection, open-vocabulary detection),
trained by finegrain's trainer as methods (``method.name: finetune-seg | finetune-det | finetune-ovd``)."""

from .base import BackboneOptions, DenseTask, TaskOptions

__all__ = ["BackboneOptions", "DenseTask", "TaskOptions"]
