"""Training package for SoundStorm models: the §3.2 masking, token corpora and training
windows, the trainer (checkpoints, exact resume, torchrun DDP) and a synthetic corpus."""

from soundstorm.training.config import TrainConfig
from soundstorm.training.corpus import CorpusError, CorpusWriter, TokenCorpus, open_corpus
from soundstorm.training.masking import MaskedBatch, masked_loss, sample_mask
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus
from soundstorm.training.trainer import Trainer, train

__all__ = ["CorpusError", "CorpusWriter", "MaskedBatch", "SyntheticSpec", "TokenCorpus",
           "TrainConfig", "Trainer", "masked_loss", "open_corpus", "sample_mask", "train",
           "write_synthetic_corpus"]
