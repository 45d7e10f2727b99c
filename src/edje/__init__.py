"""edje: efficient discriminative joint encoders for vision-language reranking.

`import edje` registers the "edje" model type with transformers' `AutoConfig`, `AutoModel` and
`AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from edje.configuration_edje import EDJEConfig
from edje.modeling_edje import (
    EDJEModel,
    EDJEOutput,
    LocalProjector,
    PaperTokenCompressionAdapter,
    TokenCompressionAdapter,
)
from edje.processing_edje import EDJEProcessor
from edje.rerank import EDJEReranker

__version__ = "0.1.0.dev0"

AutoConfig.register("edje", EDJEConfig, exist_ok=True)
AutoModel.register(EDJEConfig, EDJEModel, exist_ok=True)
AutoProcessor.register(EDJEConfig, EDJEProcessor, exist_ok=True)
# Saved folders carry the code and an `auto_map`, so they load with trust_remote_code=True too.
EDJEConfig.register_for_auto_class()
EDJEModel.register_for_auto_class("AutoModel")
EDJEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "EDJEConfig",
    "EDJEModel",
    "EDJEOutput",
    "EDJEProcessor",
    "EDJEReranker",
    "LocalProjector",
    "PaperTokenCompressionAdapter",
    "TokenCompressionAdapter",
    "__version__",
]
