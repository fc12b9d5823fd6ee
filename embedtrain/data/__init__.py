"""Readers, batch plans and collators for contrastive training data."""

from embedtrain.data.collate import BatchCollator, PlannedBatches, pretokenize, token_lengths
from embedtrain.data.readers import PairDataset, read_pairs, text_hash
from embedtrain.data.sampler import PlannedBatch, plan_epoch

__all__ = ["BatchCollator", "PlannedBatches", "pretokenize", "token_lengths", "PairDataset", "read_pairs",
           "text_hash", "PlannedBatch", "plan_epoch"]
