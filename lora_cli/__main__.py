"""`python -m lora_cli`: what `accelerate launch -m lora_cli` and `torchrun -m lora_cli` run."""

from lora_cli.cli import run

if __name__ == "__main__":
    run()
