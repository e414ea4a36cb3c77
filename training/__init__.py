"""Training package for SoundStorm models (masking, data, trainer)."""
