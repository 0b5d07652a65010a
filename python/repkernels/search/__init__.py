"""PBConv structure search: candidate generation (§4.3 rules, Fig. 5) and the heuristic search (Fig. 1)."""

from .candidates import legal_sizes, place_kernels, random_candidate
from .pbconv_search import SearchResult, pbconv_search

__all__ = ["SearchResult", "legal_sizes", "pbconv_search", "place_kernels", "random_candidate"]
