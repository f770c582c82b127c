"""Nearest neighbours over cached features: a FAISS index beside its ids (:mod:`.index`), search by
image or id (:mod:`.query`), and train/test leaks (:mod:`.leaks`)."""

from .index import FeatureIndex, build_index, choose_index_factory, load_index
from .leaks import DEFAULT_THRESHOLD, LeakReport, eval_leak_counts, find_leaks
from .query import search

__all__ = ["DEFAULT_THRESHOLD", "FeatureIndex", "LeakReport", "build_index", "choose_index_factory",
           "eval_leak_counts", "find_leaks", "load_index", "search"]
