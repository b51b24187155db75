"""Pictures as PNG files: training curves, CLS attention and token removal, dense-feature clusters, box
classification results and segmentation predictions."""

from .attention import cls_attention_maps, plot_attention
from .boxes import plot_box_predictions
from .clusters import dense_clusters, plot_dense_clusters
from .curves import plot_curves
from .segmentation import plot_segmentation
from .token_removal import plot_token_removal

__all__ = ["cls_attention_maps", "dense_clusters", "plot_attention", "plot_box_predictions", "plot_curves",
           "plot_dense_clusters", "plot_segmentation", "plot_token_removal"]
