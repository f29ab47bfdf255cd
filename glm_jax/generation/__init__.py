"""Generation: decoding strategies (greedy, temperature/top-k/top-p sampling, GLM-130B beam search)."""

from glm_jax.generation.api import Generator
from glm_jax.generation.beam_search import BeamSearchConfig
from glm_jax.generation.blanks import FillResult, fill_blanks
from glm_jax.generation.decode import Decoder, SamplingConfig

__all__ = ['Generator', 'fill_blanks', 'FillResult', 'Decoder', 'SamplingConfig', 'BeamSearchConfig']
