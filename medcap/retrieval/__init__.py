"""Retrieval stage: embed images (open_clip encoders), index them (FAISS), find k nearest neighbours.

Heavy libraries (torch, open_clip, faiss) are imported inside the functions that use them, so
importing this package stays light.
"""

from medcap.retrieval.embed import embed_examples, load_embeddings
from medcap.retrieval.encoders import Encoder, load_encoder
from medcap.retrieval.index import build_index, import_faiss, load_index, save_index, search
from medcap.retrieval.neighbours import find_neighbours, neighbour_records

__all__ = [
    "Encoder",
    "build_index",
    "embed_examples",
    "find_neighbours",
    "import_faiss",
    "load_embeddings",
    "load_encoder",
    "load_index",
    "neighbour_records",
    "save_index",
    "search",
]
