"""MeshShard: run one LLM across a handful of edge devices as a chain of layer shards."""

__version__ = "0.1.0"
