"""EfficientVLM model library: configs, models, processor and pipeline (also shipped as Hub remote code)."""

from .configuration_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMFusionConfig,
    EfficientVLMTextConfig,
    EfficientVLMVisionConfig,
)
from .modeling_efficientvlm import (
    EfficientVLMEncoderOutput,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForVisualReasoning,
    EfficientVLMModel,
    EfficientVLMOutput,
    EfficientVLMPreTrainedModel,
    EfficientVLMVisualReasoningOutput,
    EncoderPruningMasks,
    PruningMasks,
)

__all__ = [
    "EfficientVLMConfig",
    "EfficientVLMEncoderOutput",
    "EfficientVLMForImageTextRetrieval",
    "EfficientVLMForPreTraining",
    "EfficientVLMForVisualReasoning",
    "EfficientVLMFusionConfig",
    "EfficientVLMModel",
    "EfficientVLMOutput",
    "EfficientVLMPreTrainedModel",
    "EfficientVLMTextConfig",
    "EfficientVLMVisionConfig",
    "EfficientVLMVisualReasoningOutput",
    "EncoderPruningMasks",
    "PruningMasks",
]
