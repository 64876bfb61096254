"""alignti: offline Align-TI distillation for LLaVA-style multimodal LLMs."""

__version__ = "0.1.0"
