"""GEM ("Grounding Everything", Bousselham et al., CVPR 2024) on current open_clip.

Training-free text-prompted heatmaps from a pretrained CLIP ViT. Knows nothing of Label Studio.
"""
from .errors import GemError, InvalidInputError, UnsupportedModelError, WeightsNotFoundError
from .factory import available_models, create_gem_model, normalize_model_name
from .model import GemModel, ImageFeatures, minmax_normalize
from .predictor import EncodedImage, FeatureCache, HeatmapPredictor
from .transforms import get_gem_img_transform, target_size

__all__ = [
    "EncodedImage", "FeatureCache", "GemError", "GemModel", "HeatmapPredictor", "ImageFeatures",
    "InvalidInputError", "UnsupportedModelError", "WeightsNotFoundError", "available_models",
    "create_gem_model", "get_gem_img_transform", "minmax_normalize", "normalize_model_name",
    "target_size",
]
