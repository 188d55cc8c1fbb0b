"""Privacy mechanisms: DP-SGD for LoRA adapters (``dp_sgd``)."""
