"""SoundStorm inference engine: configuration, model, weights I/O, level-wise decoding."""

from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.engine import Engine
from soundstorm.engine.model import SoundStorm

__all__ = ["DecodeConfig", "Engine", "ModelConfig", "SoundStorm"]
