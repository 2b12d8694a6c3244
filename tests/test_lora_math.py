"""The LoRA arithmetic, pinned to a hand-worked example through PEFT itself: y = W0 x + (alpha / r) B A x."""

from __future__ import annotations

import torch

W0 = [[1, 0, -1, 2, 0.5], [0, 1, 0, -1, 1], [0.5, -0.5, 1, 0, 0], [1.5, 0, 0, 1, -0.5]]
A = [[0.2, -0.1, 0, 0.3, -0.2], [0, 0.1, 0.4, -0.2, 0.1]]
B = [[0.5, 0.1], [-0.3, 0.2], [0, -0.4], [0.2, 0.3]]
X = [1, -1, 0.5, 0, 2]
# By hand: W0 x = [1.5, 1, 1.5, 0.5]; A x = [-0.1, 0.3]; B A x = [-0.02, 0.09, -0.12, 0.07];
# scale alpha / r = 16 / 2 = 8, so y = [1.5 - 0.16, 1 + 0.72, 1.5 - 0.96, 0.5 + 0.56].
EXPECTED = [1.34, 1.72, 0.54, 1.06]


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 4, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor(W0))

    def forward(self, x):
        return self.proj(x)


def lora_layer():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLinear(), LoraConfig(r=2, lora_alpha=16, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(A))
        layer.lora_B["default"].weight.copy_(torch.tensor(B))
    return model


def test_peft_lora_forward_matches_the_hand_worked_example():
    model = lora_layer()
    y = model(torch.tensor([X], dtype=torch.float32))[0]
    torch.testing.assert_close(y, torch.tensor(EXPECTED), atol=1e-6, rtol=0)


def test_merging_gives_the_same_output_and_weight_w0_plus_scaled_ba():
    model = lora_layer()
    merged = model.merge_and_unload()
    y = merged(torch.tensor([X], dtype=torch.float32))[0]
    torch.testing.assert_close(y, torch.tensor(EXPECTED), atol=1e-6, rtol=0)
    expected_weight = torch.tensor(W0) + 8 * torch.tensor(B) @ torch.tensor(A)
    torch.testing.assert_close(merged.proj.weight.detach(), expected_weight, atol=1e-6, rtol=0)


def test_our_merge_arithmetic_gives_the_hand_worked_weight():
    """lora merge folds adapters in with its own code (lora_cli/merge.py), not peft's: the same numbers."""
    from lora_cli.merge import Delta

    weight = Delta(torch.tensor(A), torch.tensor(B), scale=16 / 2).apply(torch.tensor(W0))
    torch.testing.assert_close(weight @ torch.tensor(X), torch.tensor(EXPECTED), atol=1e-6, rtol=0)
    # an embedding's pair is stored transposed (B A is vocab x hidden only after the transpose)
    embedding = Delta(torch.tensor(B).T, torch.tensor(A).T, scale=8.0, embedding=True).apply(torch.tensor(W0))
    torch.testing.assert_close(embedding, weight, atol=1e-6, rtol=0)
