"""EfficientVLM model library: configs, models, processor and pipeline (also shipped as Hub remote code)."""

from .configuration_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMFusionConfig,
    EfficientVLMTextConfig,
    EfficientVLMVisionConfig,
)
from .modeling_efficientvlm import (
    ITM_SCORES,
    NOT_CANDIDATE_SCORE,
    EfficientVLMCaptioningOutput,
    EfficientVLMEncoderOutput,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForVisualReasoning,
    EfficientVLMModel,
    EfficientVLMOutput,
    EfficientVLMPreTrainedModel,
    EfficientVLMVisualReasoningOutput,
    EncoderPruningMasks,
    PruningMasks,
    itm_match_scores,
)

__all__ = [
    "ITM_SCORES",
    "NOT_CANDIDATE_SCORE",
    "EfficientVLMCaptioningOutput",
    "EfficientVLMConfig",
    "EfficientVLMEncoderOutput",
    "EfficientVLMForConditionalGeneration",
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
    "itm_match_scores",
]
