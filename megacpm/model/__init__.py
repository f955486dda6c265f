"""The MiniCPM model: decoder, rotary tables, muP init and parameter counts."""
from megacpm.model.minicpm import MiniCPM
from megacpm.model.params import count_parameters
from megacpm.model.rotary import RotaryEmbedding

__all__ = ["MiniCPM", "count_parameters", "RotaryEmbedding"]
