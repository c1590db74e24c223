"""The synthesizer: an instruction LLM reads the neighbours' captions and the candidates and writes one caption."""

from medcap.synthesizer.synthesize import Synthesizer, build_synthesis_messages
from medcap.synthesizer.templates import TEMPLATES, Template, get_template

__all__ = ["TEMPLATES", "Synthesizer", "Template", "build_synthesis_messages", "get_template"]
