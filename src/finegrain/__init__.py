"""finegrain: fine-grained vision-language pretraining (DetailCLIP, FineCLIP) on open_clip models.

Top-level names load lazily, so ``finegrain --help`` does not import torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "create_model": "models", "get_tokenizer": "models", "list_models": "models", "FinegrainCLIP": "models",
    "ViTBackbone": "models", "load_config": "config", "ExperimentConfig": "config", "load_predictor": "predict",
}
__all__ = ["ExperimentConfig", "FinegrainCLIP", "ViTBackbone", "__version__", "create_model", "get_tokenizer",
           "list_models", "load_config", "load_predictor"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'finegrain' has no attribute {name!r}")
