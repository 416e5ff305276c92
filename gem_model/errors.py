"""Errors a user can act on. Their messages are meant to be printed as they are."""


class GemError(Exception):
    """Base class for errors raised by gem_model."""


class UnsupportedModelError(GemError):
    """The requested open_clip model has an image tower GEM cannot modify."""


class WeightsNotFoundError(GemError):
    """Pretrained weights could not be found, downloaded or read."""


class InvalidInputError(GemError, ValueError):
    """An image, prompt list or setting that cannot be processed."""
