"""finegrain: fine-grained vision-language pretraining (DetailCLIP, FineCLIP) on open_clip models."""

__version__ = "0.1.0"

from .config import ExperimentConfig, load_config
from .models import FinegrainCLIP, create_model, get_tokenizer, list_models

__all__ = ["ExperimentConfig", "FinegrainCLIP", "__version__", "create_model", "get_tokenizer", "list_models",
           "load_config"]
