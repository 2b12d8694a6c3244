"""The training loss without the full logits: the output layer runs only where a label is trained, in chunks.

A causal LM's usual loss multiplies every position's hidden state by the 49k-152k-row output matrix,
upcasts the whole (tokens x vocab) block to fp32, log-softmaxes it, and keeps it for the backward
pass. On a CPU that elementwise work over the vocabulary costs about as much as the matmul itself,
and in memory the block dominates a LoRA step. Here the decoder's final hidden states are taken
(a hook hands the output layer zero positions to work on), the positions whose next-token label is
ignored (prompts, padding, packing seams) are dropped, and the rest go through the output layer a
few hundred rows at a time: each chunk's loss and its gradient are computed at once and the chunk
is thrown away. The result equals transformers' `ForCausalLMLoss`, including the reduction over
`num_items_in_batch` that keeps gradient accumulation exact.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer

from lora_cli import packed_weights
from lora_cli.data import IGNORE_INDEX

# Architectures whose logits are exactly lm_head(final hidden state): no softcapping, no scaling.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}

# The output layer's weight in oneDNN's two layouts, where lora_cli/packed_weights.py put them on the module.
HEAD_LAYOUTS = "lora_packed_layouts"

# Cells of one fp32 logits chunk (rows x vocab): 64 MB, small next to the model, large enough
# that the chunk's matmul runs at full speed. (lora_cli/estimate.py counts on both values.)
CHUNK_ELEMENTS = 1 << 24


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              layouts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), never holding more than one chunk of logits.

    `layouts`: the weight laid out by oneDNN for the logits and for the hidden states' gradient
    (lora_cli/packed_weights.py), used for bf16 on a CPU.
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, layouts)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradient for the hidden states; backward scales it.

    The output weight is frozen (LoRA does not train it), so no weight gradient is formed. The
    matmuls run in the autocast dtype when autocast is on (as the model's own output layer would),
    the softmax in fp32.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                layouts: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        packed_head = layouts is not None and dtype == torch.bfloat16 and device.type == "cpu"
        with torch.autocast(device.type, enabled=False):
            weight = weight.to(dtype)
            vocab = weight.shape[0]
            rows = _chunk_rows(hidden.shape[0], vocab)
            need_grad = ctx.needs_input_grad[0]
            total = torch.zeros((), dtype=torch.float32, device=device)
            grad = torch.empty(hidden.shape, dtype=dtype, device=device) if need_grad else None
            for start in range(0, hidden.shape[0], rows):
                target = targets[start:start + rows]
                n = len(target)
                chunk = hidden[start:start + rows].to(dtype)
                if packed_head:
                    # oneDNN's op returns a new tensor: a chunk stays under glibc's mmap threshold (see
                    # _chunk_rows), so the next chunk gets the same heap memory, not fresh pages
                    logits = packed_weights.multiply(chunk, layouts[0])
                else:
                    logits = _scratch("logits", (n, vocab), dtype, device)
                    torch.matmul(chunk, weight.t(), out=logits)
                # the softmax runs in fp32: in place when the logits already are (a 49k-wide copy
                # there and back cost 13 ms of a 100 ms loss on a CPU), else on an fp32 copy
                work = logits if dtype == torch.float32 else _scratch("fp32", (n, vocab), torch.float32, device)
                if work is not logits:
                    work.copy_(logits)
                total += _softmax_in_place(work, target, chunk, weight, need_grad)
                if grad is not None:
                    work[torch.arange(n, device=device), target] -= 1.0
                    if work is not logits:
                        logits.copy_(work)
                    if packed_head:
                        grad[start:start + rows] = packed_weights.multiply(logits, layouts[1])
                    else:
                        torch.matmul(logits, weight, out=grad[start:start + rows])
                del logits, work  # a packed chunk's logits are its own tensor: gone before the next one's
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None


def _softmax_in_place(work: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      need_softmax: bool) -> torch.Tensor:
    """The rows' summed cross-entropy from fp32 logits (rows x vocab), which are turned into their softmax in
    place (on a GPU only when `need_softmax`).

    On a CPU, one fused softmax kernel keeps each row in cache, and the loss is -log of the target's
    probability: half the time of the max, subtract, exp, sum and divide as five passes over the chunk
    (17 against 31 ms for 341 x 49,152). A target probability that underflows fp32 (87 nats below the
    row's log-sum-exp) has its loss computed again from its logits, `hidden @ weight.T`.
    On a GPU the five in-place passes stay: log-sum-exp, then the softmax.
    """
    rows = torch.arange(len(target), device=work.device)
    if work.device.type == "cpu":
        torch._softmax(work, -1, False, out=work)
        chosen = work[rows, target]
        losses = -chosen.log()
        underflowed = chosen < torch.finfo(torch.float32).tiny
        if underflowed.any():
            logits = (hidden[underflowed] @ weight.t()).float()
            losses[underflowed] = (torch.logsumexp(logits, -1)
                                   - logits.gather(1, target[underflowed][:, None]).squeeze(1))
        return losses.sum()
    picked = work[rows, target]
    # log-sum-exp and softmax in place: torch.logsumexp allocates a chunk-sized temporary
    # and makes two more passes over it
    top = work.amax(dim=-1, keepdim=True)
    work.sub_(top).exp_()
    sums = work.sum(dim=-1, keepdim=True)
    if need_softmax:
        work.div_(sums)
    return (sums.squeeze(1).log() + top.squeeze(1) - picked).sum()


def _chunk_rows(total_rows: int, vocab: int) -> int:
    """Rows per chunk: under CHUNK_ELEMENTS cells, and the rows shared evenly among the chunks (400 rows go
    as 2 x 200, not 341 + 59: a chunk of a few dozen rows multiplies at two thirds of the speed).

    A 1/256 margin keeps a bf16 chunk of logits, allocator overhead included, under the 32 MiB (CHUNK_ELEMENTS
    bf16 cells) that lora_cli/cpu.py sets as glibc's mmap threshold: at a vocabulary that divides 2^24
    (32,768 say) a full chunk would be mapped and unmapped, its pages faulted in anew, at every chunk.
    """
    most = max(1, CHUNK_ELEMENTS * 255 // 256 // vocab)
    if total_rows == 0:
        return most
    chunks = -(-total_rows // most)
    return -(-total_rows // chunks)


_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(role: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A chunk buffer. On the CPU one buffer per role lives for the whole run: glibc hands blocks this
    big back to the kernel when freed, and faulting ~100 MB of fresh pages in again every step cost
    about 8% of a step. CUDA's caching allocator already reuses memory."""
    numel = shape[0] * shape[1]
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffer = _SCRATCH.get((role, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[(role, dtype)] = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=dtype)
    return buffer[:numel].view(shape)


def supports_chunked_loss(model: Any, training: bool = True) -> bool:
    """True when the chunked loss gives exactly the model's own loss: a plain, bias-free output layer,
    frozen when training (it forms no weight gradient)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return (getattr(base.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
            and type(head) is torch.nn.Linear and head.bias is None
            and not (training and head.weight.requires_grad)
            and head.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


def trained_positions_loss(model: Any, head: Any, inputs: dict[str, Any], labels: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed next-token cross-entropy over the positions whose label is trained, and their count.

    `model(**inputs)` runs with its output layer `head` handed zero positions (a forward pre-hook
    takes the final hidden states instead); only the trained positions then go through the output
    layer, chunk by chunk.
    """
    captured: list[Any] = []

    def take_hidden_states(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][:, :0], *args[1:])  # the output layer then runs on zero positions

    hook = head.register_forward_pre_hook(take_hidden_states)
    try:
        model(**inputs)
    finally:
        hook.remove()
    hidden = captured[-1]
    next_tokens = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    trained = next_tokens != IGNORE_INDEX
    return chunked_cross_entropy_sum(hidden[trained], head.weight, next_tokens[trained],
                                     getattr(head, HEAD_LAYOUTS, None)), trained.sum()


class LoraTrainer(Trainer):
    """The HF Trainer with the chunked, response-only loss (see the module docstring).

    Training steps use it, and so do evaluations that report only the loss (`prediction_loss_only`,
    as `lora train` sets it): the full logits of an eval batch cost more than the rest of its forward
    pass. An evaluation that asks for logits, and any model `supports_chunked_loss` rejects, keep the
    Trainer's own loss path.
    """

    def __init__(self, *args: Any, chunked_loss: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # FSDP and ZeRO-3 shard the output weight outside the forward pass, where this loss needs it whole.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        # torch.nn.DataParallel (one process, several GPUs) runs the hook once per replica
        replicated = self.args.n_gpu > 1
        self.chunked_loss = chunked_loss and not sharded and not replicated and supports_chunked_loss(self.model)
        self._loss_only_prediction = False
        self._eval_totals: list[Any] | None = None  # [loss sum, trained tokens] over an evaluation
        self.eval_seconds = 0.0  # wall time spent in evaluate() during this process's training
        self._parameter_count: tuple[Any, int] | None = None  # (model, its count), for the FLOP log

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        # The Trainer's own counts the model's parameters again at every step, a walk over every module
        # (3.6 ms a step on the default model on a CPU). The count is kept for as long as the model is.
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None or self._parameter_count[0] is not self.model:
            self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._parameter_count[1]

    def _clip_grad_norm(self, model: Any) -> Any:
        # Only the parameters the optimizer trains have gradients: clipping them alone skips a walk over every
        # frozen weight of the model at every step (4.3 against 1.0 ms on the default model on a CPU). FSDP,
        # DeepSpeed, XLA and tensor-parallel (DTensor) gradients keep the Trainer's way, which those need.
        mixed_mesh = getattr(self, "_has_mixed_mesh_grads", None)
        if (self.is_fsdp_enabled or self.is_deepspeed_enabled or self.accelerator.distributed_type == "XLA"
                or (mixed_mesh is not None and mixed_mesh(model))):
            return super()._clip_grad_norm(model)
        trained = [param for group in self.optimizer.param_groups for param in group["params"]]
        return self.accelerator.clip_grad_norm_(trained, self.args.max_grad_norm)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.time() - started

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The Trainer's running train_runtime and train_tokens_per_second count evaluations as training
        # time. lora's own figures (progress bar, manifest) leave them out, and so does the log: one rate.
        if start_time is not None:
            start_time += self.eval_seconds
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        # The Trainer averages each batch's mean loss over the batches' rows, which weighs a token by how
        # many share its batch and moves the figure with --batch-size. The eval loss is the mean over every
        # scored token of the set, as `lora eval` reports it: summed here, batch by batch.
        self._eval_totals = [0.0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            loss_sum, tokens = self._eval_totals
        finally:
            self._eval_totals = None
        if tokens:
            totals = self.accelerator.reduce(torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64,
                                                          device=self.args.device), "sum")
            output.metrics[f"{metric_key_prefix}_loss"] = (totals[0] / totals[1]).item()
        return output

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        # compute_loss is asked for outputs here, but only the loss is kept when prediction_loss_only
        self._loss_only_prediction = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._loss_only_prediction = False

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss_only_eval = return_outputs and self._loss_only_prediction
        if (return_outputs and not loss_only_eval) or not self.chunked_loss or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        loss, trained = trained_positions_loss(model, base.get_output_embeddings(), inputs, labels)
        if loss_only_eval and self._eval_totals is not None:
            self._eval_totals[0] += loss.detach().double()
            self._eval_totals[1] += trained
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:  # a mean; the Trainer scales it for GA
            loss = loss / trained.clamp(min=1)
        else:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
            if self.args.average_tokens_across_devices:  # as Trainer.compute_loss does for a model's own loss
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, {"loss": loss}) if return_outputs else loss
