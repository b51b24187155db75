"""finegrain: fine-grained vision-language pretraining (DetailCLIP, FineCLIP) on open_clip models."""

__version__ = "0.1.0"

from .config import ExperimentConfig, load_config  # noqa: E402
from .models import FinegrainCLIP, create_model, get_tokenizer, list_models  # noqa: E402

__all__ = ["ExperimentConfig", "FinegrainCLIP", "__version__", "create_model", "get_tokenizer", "list_models",
           "load_config"]
