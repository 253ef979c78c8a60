"""smoothkd: offline soft-label knowledge distillation for LLM fine-tuning."""

__version__ = "0.1.0"
