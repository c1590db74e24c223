"""Inference engines behind one interface (see ``base.py``): hf (transformers), vllm, openai (HTTP)."""

from medcap.engines.base import Completion, Engine, Request

__all__ = ["Completion", "Engine", "Request"]
