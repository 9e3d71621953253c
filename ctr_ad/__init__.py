"""ctr-ad: reproducible CTR prediction with anti-distillation ensembles."""

__version__ = "0.1.0"
