"""SpecCLIP models: encoders, heads, decoders, losses, built from named configs.

from specsearch.models import build_model, save_model, load_model
model = build_model("specclip", "small", variant="pr")
"""

from .clip import CLIPConfig, SpecCLIPModel
from .configs import SpecCLIPConfig, config_names, config_to_dict, get_config
from .factory import build_model, count_parameters, load_model, save_model
from .heads import LabelHead, LabelHeadConfig
from .loss import ClipLoss
from .specformer import SpecFormer, SpecFormerConfig
from .xp_oae import XPAutoencoder, XPAutoencoderConfig
from .xp_transformer import XPTransformer, XPTransformerConfig

__all__ = [
    "CLIPConfig",
    "ClipLoss",
    "LabelHead",
    "LabelHeadConfig",
    "SpecCLIPConfig",
    "SpecCLIPModel",
    "SpecFormer",
    "SpecFormerConfig",
    "XPAutoencoder",
    "XPAutoencoderConfig",
    "XPTransformer",
    "XPTransformerConfig",
    "build_model",
    "config_names",
    "config_to_dict",
    "count_parameters",
    "get_config",
    "load_model",
    "save_model",
]
