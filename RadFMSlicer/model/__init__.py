"""RadFM model code: 3D ViT, perceiver resampler, and the multimodal wrapper around LLaMA."""

from .radfm import RadFMDims, RadFMModel

__all__ = ["RadFMDims", "RadFMModel"]
