"""FastSAM for Label Studio: all-instance masks cached once per image, prompts answered from the cache."""

__version__ = "0.1.0"
