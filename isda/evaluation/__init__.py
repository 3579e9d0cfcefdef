"""Evaluation helpers beyond Detectron2's COCOEvaluator."""
from .duplicates import DEMO_SCORE_THRESHOLD, count_duplicates

__all__ = ["count_duplicates", "DEMO_SCORE_THRESHOLD"]
