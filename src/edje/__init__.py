"""edje: efficient discriminative joint encoders for vision-language reranking.

`import edje` registers the "edje" model type with transformers' `AutoConfig`, `AutoModel` and
`AutoProcessor`. The classes below are imported when first used, so `edje.cli` starts fast (the
console script defers the registration to the command it runs: `edje_cli`).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from edje._version import __version__

_EXPORTS = {
    "EDJEConfig": "edje.configuration_edje",
    "EDJELightAdapter": "edje.modeling_edje",
    "EDJELocalAdapter": "edje.modeling_edje",
    "EDJEPaperAdapter": "edje.modeling_edje",
    "EDJEModel": "edje.modeling_edje",
    "EDJEOutput": "edje.modeling_edje",
    "LocalProjector": "edje.modeling_edje",
    "PaperTokenCompressionAdapter": "edje.modeling_edje",
    "TokenCompressionAdapter": "edje.modeling_edje",
    "EDJEProcessor": "edje.processing_edje",
    "EDJEReranker": "edje.rerank",
    "clean_caption": "edje.configuration_edje",
}
__all__ = [
    "EDJEConfig",
    "EDJELightAdapter",
    "EDJELocalAdapter",
    "EDJEModel",
    "EDJEOutput",
    "EDJEPaperAdapter",
    "EDJEProcessor",
    "EDJEReranker",
    "LocalProjector",
    "PaperTokenCompressionAdapter",
    "TokenCompressionAdapter",
    "__version__",
    "clean_caption",
    "register_auto_classes",
]

if TYPE_CHECKING:
    from edje.configuration_edje import EDJEConfig, clean_caption
    from edje.modeling_edje import (
        EDJELightAdapter,
        EDJELocalAdapter,
        EDJEModel,
        EDJEOutput,
        EDJEPaperAdapter,
        LocalProjector,
        PaperTokenCompressionAdapter,
        TokenCompressionAdapter,
    )
    from edje.processing_edje import EDJEProcessor
    from edje.rerank import EDJEReranker


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edje' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def register_auto_classes() -> None:
    """Register "edje" with transformers' Auto classes (again is harmless)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from edje.configuration_edje import EDJEConfig
    from edje.modeling_edje import EDJEModel
    from edje.processing_edje import EDJEProcessor

    AutoConfig.register("edje", EDJEConfig, exist_ok=True)
    AutoModel.register(EDJEConfig, EDJEModel, exist_ok=True)
    AutoProcessor.register(EDJEConfig, EDJEProcessor, exist_ok=True)
    # Saved folders carry the code and an `auto_map`, so they load with trust_remote_code=True.
    EDJEConfig.register_for_auto_class()
    EDJEModel.register_for_auto_class("AutoModel")
    EDJEProcessor.register_for_auto_class("AutoProcessor")


if "edje_cli" not in sys.modules:
    register_auto_classes()
