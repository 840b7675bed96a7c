"""Protection schemes: V1 key masks (split/merge and their scores)."""

from ticketctl.protect.scores import SCORES, Score, compute_scores
from ticketctl.protect.split import key_size, merge_parts, split_ticket

__all__ = ["SCORES", "Score", "compute_scores", "key_size", "merge_parts", "split_ticket"]
