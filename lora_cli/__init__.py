"""lora: fine-tune LLaMA-family models with LoRA and QLoRA from the command line."""

__version__ = "0.1.0"
