"""fedkt: federated knowledge transfer between a server LLM and clients' small language models."""

__version__ = "0.1.0"
