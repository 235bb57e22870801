"""Model space: architectures joined by function-preserving moves, search over them, save/load.

>>> from morphc.space import ModelSpace, Widen   # doctest: +SKIP
"""

from morphc.space.architecture import architecture_graph, architecture_hash
from morphc.space.graph import ModelSpace, function_change, summarize
from morphc.space.move_base import Move
from morphc.space.moves import Contract, Deepen, Extend, Grow, Shrink, Ungrow, Widen
from morphc.space.search import HillClimb, SearchResult

__all__ = ["Contract", "Deepen", "Extend", "Grow", "HillClimb", "ModelSpace", "Move",
           "SearchResult", "Shrink", "Ungrow", "Widen", "architecture_graph", "architecture_hash",
           "function_change", "summarize"]
