"""dpzo-engine: differentially private zeroth-order fine-tuning at inference memory."""

__version__ = "0.1.0"
