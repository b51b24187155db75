"""Dense-capable CLIP models built on open_clip (state-dict compatible)."""

from .backbone import SimpleFeaturePyramid, ViTBackbone, layer_decay_param_groups
from .clip import FinegrainCLIP
from .decoder import MAEDecoder, sincos_pos_embed_2d
from .ema import EMATeacher, cosine_momentum
from .export import export_local_dir
from .factory import (
    create_model,
    get_tokenizer,
    list_models,
    model_config,
    model_from_checkpoint,
    resolve_model_name,
)
from .heads import IBOTHead
from .roi import pool_boxes
from .tower import DENSE_MODES, TowerOutput, UnsupportedModelError
from .vit_tower import interpolate_pos_embed, order_indices, restore_tokens

__all__ = [
    "DENSE_MODES",
    "EMATeacher",
    "FinegrainCLIP",
    "IBOTHead",
    "MAEDecoder",
    "SimpleFeaturePyramid",
    "TowerOutput",
    "UnsupportedModelError",
    "ViTBackbone",
    "cosine_momentum",
    "create_model",
    "export_local_dir",
    "get_tokenizer",
    "interpolate_pos_embed",
    "layer_decay_param_groups",
    "list_models",
    "model_config",
    "model_from_checkpoint",
    "order_indices",
    "pool_boxes",
    "resolve_model_name",
    "restore_tokens",
    "sincos_pos_embed_2d",
]
