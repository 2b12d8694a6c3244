"""The speed paths of `lora train` must compute exactly what the plain transformers paths compute.

- packed attention (each example attended alone) against SDPA with transformers' block-diagonal mask;
- the chunked, response-only loss against the model's own loss, values and LoRA gradients;
- `--precision auto` on a CPU picks the dtype this CPU multiplies faster.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_cli import data, loss, packed_attention  # noqa: E402

IGNORE = data.IGNORE_INDEX


def _packed_batch(lengths, masked_prefix=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 290, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * min(masked_prefix, n) + ids[masked_prefix:]})
    batch = data.make_collator(None, packing=True)(rows)
    return {k: torch.as_tensor(v) if not isinstance(v, int) else v for k, v in batch.items()}


def _lora_model(model_dir, attention="sdpa", targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.set_attn_implementation(attention)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_attention_equals_sdpa_with_the_block_mask_in_values_and_gradients(tiny_model_dir, monkeypatch):
    # one example over the eager limit takes the flash-kernel branch, the others the eager one
    monkeypatch.setattr(packed_attention, "EAGER_MAX_TOKENS", 20)
    batch = _packed_batch([17, 30, 1, 9])
    results = {}
    for attention in ("sdpa", packed_attention.register()):
        model = _lora_model(tiny_model_dir, attention)
        out = model(**batch)
        out.loss.backward()
        results[attention] = (out.logits.detach(), out.loss.item(), _lora_grads(model))
    (ref_logits, ref_loss, ref_grads), (logits, loss_value, grads) = results.values()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert loss_value == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_attention_without_example_boundaries_is_plain_sdpa(tiny_model_dir):
    """Padded batches and generation carry no boundaries: they must get the usual masked attention."""
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = _lora_model(tiny_model_dir, "sdpa")(input_ids=ids, attention_mask=mask).logits
        ours = _lora_model(tiny_model_dir, packed_attention.register())(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, ref)


def test_packed_attention_keeps_a_sliding_window_shorter_than_an_example():
    """Mistral-style windows: examples longer than the window must not see past it in a packed row either."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, use_cache=False)
    model = MistralForCausalLM(config).eval()
    batch = _packed_batch([30, 20, 5])
    starts = batch["position_ids"][0].eq(0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=batch["input_ids"][:, a:b]).logits[0] for a, b in zip(starts, starts[1:])])
        model.set_attn_implementation(packed_attention.register())
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       **{k: v for k, v in batch.items() if k.startswith(("cu_seq", "max_length"))}).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def _trainer(model, tmp_path, chunked):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True)
    return loss.LoraTrainer(model=model, args=args, chunked_loss=chunked)


@pytest.mark.parametrize("num_items", [None, 57])
def test_chunked_loss_equals_the_models_own_loss_and_lora_gradients(tiny_model_dir, tmp_path, monkeypatch,
                                                                    num_items):
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 300)  # 6 rows a chunk at most: several chunks
    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    results = []
    for chunked in (False, True):
        model = _lora_model(tiny_model_dir)
        trainer = _trainer(model, tmp_path, chunked)
        assert trainer.chunked_loss is chunked
        value = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        value.backward()
        results.append((value.item(), _lora_grads(model)))
    (ref, ref_grads), (ours, grads) = results
    assert ours == pytest.approx(ref, rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_loss_in_bf16_is_the_models_own_bf16_loss(tiny_model_dir, tmp_path, monkeypatch):
    """As `lora train` runs in bf16: frozen weights in bf16, LoRA in fp32, under autocast. The chunked
    loss multiplies in bf16 as the model's own output layer would (fp32 would be 2e-5 away, measured)."""
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 300)
    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    results = []
    for chunked in (False, True):
        model = _lora_model(tiny_model_dir)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
        trainer = _trainer(model, tmp_path, chunked)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = trainer.compute_loss(model, dict(batch))
        value.backward()
        results.append((value.item(), _lora_grads(model)))
    (ref, ref_grads), (ours, grads) = results
    assert ours == pytest.approx(ref, rel=5e-6)
    for name, grad in ref_grads.items():  # bf16 rounds the two differently; fp32 was 0.017 away
        assert (grads[name] - grad).norm() / grad.norm() < 0.012, name


def test_a_target_whose_probability_underflows_still_gets_its_exact_loss_and_gradient():
    """On a CPU the loss is -log of the softmax's target probability; 87 nats below the rest that is 0 in fp32."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=generator)
    hidden = torch.randn(5, 16, generator=generator)
    targets = torch.tensor([1, 2, 3, 4, 5])
    hidden[2], weight[3] = 0.0, 0.0
    hidden[2, 0], weight[3, 0] = 30.0, -5.0  # row 2's target logit is -150
    hidden.requires_grad_(True)
    ours = loss.chunked_cross_entropy_sum(hidden, weight, targets)
    ours.backward()
    reference = torch.nn.functional.cross_entropy(hidden.detach().double() @ weight.double().t(), targets,
                                                  reduction="none")
    assert reference[2] > 140
    assert ours.item() == pytest.approx(reference.sum().item(), rel=1e-6)
    expected = torch.func.grad(lambda h: torch.nn.functional.cross_entropy(h @ weight.double().t(), targets,
                                                                           reduction="sum"))(hidden.detach().double())
    torch.testing.assert_close(hidden.grad.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 339, 340, 341, 400, 1000])
def test_loss_chunks_share_the_rows_evenly_within_the_chunk_size(rows):
    vocab = 49152
    most = loss._chunk_rows(10**6, vocab)
    assert most * vocab * 2 < loss.CHUNK_ELEMENTS * 2 - 64 * 1024  # bf16 logits well under glibc's mmap threshold
    size = loss._chunk_rows(rows, vocab)
    chunks = -(-rows // size)
    assert size <= most and chunks == -(-rows // most)  # as few chunks as the largest size needs, none larger
    assert rows - (chunks - 1) * size >= size - chunks  # the last one is not a sliver


def test_a_batch_without_trained_positions_has_a_loss_of_zero():
    hidden = torch.zeros(0, 16, requires_grad=True)
    value = loss.chunked_cross_entropy_sum(hidden, torch.randn(300, 16), torch.zeros(0, dtype=torch.long))
    value.backward()
    assert value.item() == 0 and hidden.grad.shape == (0, 16)


def test_the_packed_output_layer_gives_the_chunked_loss_and_gradients_bit_for_bit(tiny_model_dir, monkeypatch):
    from lora_cli import packed_weights

    if not packed_weights.applies("bf16", None, "cpu"):
        pytest.skip("this CPU's oneDNN has no native bf16 kernels: lora never packs here")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 300)
    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    model = _lora_model(tiny_model_dir, attention=packed_attention.register())
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    head = model.get_output_embeddings()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        inputs = dict(batch)
        labels = inputs.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value, _ = loss.trained_positions_loss(model, head, inputs, labels)
        value.backward()
        return value.detach(), _lora_grads(model)

    plain_loss, plain = loss_and_grads()
    packed_weights.enable(model)
    assert hasattr(head, loss.HEAD_LAYOUTS)
    packed_loss, packed = loss_and_grads()
    assert torch.equal(packed_loss, plain_loss)
    assert all(torch.equal(packed[n], plain[n]) for n in plain)
    # the loss does multiply through the copies: copies of another weight give another loss
    reorder = torch.ops.mkldnn._reorder_linear_weight
    doubled = head.weight.detach() * 2
    setattr(head, loss.HEAD_LAYOUTS, (reorder(doubled, 64), reorder(doubled.t(), 64)))
    assert not torch.equal(loss_and_grads()[0], plain_loss)
    packed_weights.disable(model)
    assert not hasattr(head, loss.HEAD_LAYOUTS)


def test_the_trainer_clips_and_counts_flops_as_the_hf_trainer_does(tiny_model_dir, tmp_path):
    """lora's Trainer clips the adapter's gradients alone and counts the parameters once; the figures are the
    HF Trainer's own."""
    from transformers import Trainer

    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    model = _lora_model(tiny_model_dir)
    trainer = _trainer(model, tmp_path, chunked=True)
    trainer.create_optimizer()
    trainer.args.max_grad_norm = 0.01  # small enough to clip
    trainer.compute_loss(model, dict(batch)).backward()
    grads = _lora_grads(model)
    expected_norm = Trainer._clip_grad_norm(trainer, model)
    expected = _lora_grads(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.grad = grads[name].clone()
    assert trainer._clip_grad_norm(model).item() == pytest.approx(expected_norm.item(), rel=1e-6)
    assert expected_norm > 0.01
    assert all(torch.equal(param.grad, expected[name]) for name, param in model.named_parameters()
               if param.requires_grad)
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0


def test_a_loss_only_evaluation_uses_the_chunked_loss_and_gets_the_per_token_mean(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from datasets import Dataset
    from transformers import TrainingArguments

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 300)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in (17, 30, 5, 9, 22, 12, 40):
        ids = torch.randint(5, 290, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]})
    calls = []
    counted = loss.chunked_cross_entropy_sum
    monkeypatch.setattr(loss, "chunked_cross_entropy_sum", lambda *a: calls.append(1) or counted(*a))
    values = []
    for chunked in (False, True):
        model = _lora_model(tiny_model_dir)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True,
                                 per_device_eval_batch_size=3, prediction_loss_only=True, remove_unused_columns=False)
        trainer = loss.LoraTrainer(model=model, args=args, chunked_loss=chunked, eval_dataset=Dataset.from_list(rows),
                                   data_collator=data.make_collator(None, packing=True))
        if chunked:
            values.append(trainer.evaluate()["eval_loss"])
        else:  # the model's own loss, batch by batch, summed over the tokens it scores
            batches = [(trainer.prediction_step(trainer.model, trainer._prepare_inputs(batch), True)[0].item(),
                        int((batch["labels"][:, 1:] != IGNORE).sum())) for batch in trainer.get_eval_dataloader()]
            values.append(sum(mean * n for mean, n in batches) / sum(n for _, n in batches))
            # what the Trainer itself reports: each batch's mean, averaged over rows
            assert trainer.evaluate()["eval_loss"] != pytest.approx(values[0], rel=1e-5)
        assert len(calls) == (3 if chunked else 0)  # 7 rows, 3 a batch
    # the chunked evaluation reports the mean over every scored token of the set, as `lora eval` does
    assert values[1] == pytest.approx(values[0], rel=1e-5)


@pytest.mark.parametrize("with_adapter", [True, False])
def test_lora_eval_response_loss_equals_the_full_logits_loss(tiny_model_dir, tmp_path, monkeypatch, with_adapter):
    """`lora eval` scores response tokens through the chunked loss, padded batches included: same value."""
    from lora_cli import adapters, evaluate

    model = _lora_model(tiny_model_dir)  # random LoRA weights, so adapted and base differ
    model.save_pretrained(tmp_path / "adapter")
    loaded = adapters.load_for_inference(str(tmp_path / "adapter"), str(tiny_model_dir), precision="fp32")
    rows = [{"instruction": f"Question {i} " * (1 + i % 4), "output": f"Answer number {i} " * (1 + i % 3)}
            for i in range(11)]
    examples = evaluate._examples(loaded, rows, "instruction", "rows", 64)
    calls = []
    counted = loss.chunked_cross_entropy_sum
    monkeypatch.setattr(loss, "chunked_cross_entropy_sum", lambda *a: calls.append(1) or counted(*a))
    ours = evaluate.response_loss(loaded, examples, adapter=with_adapter, batch_size=4)
    assert len(calls) == 3  # 11 rows, 4 a batch
    monkeypatch.setattr(loss, "supports_chunked_loss", lambda *a, **k: False)
    reference = evaluate.response_loss(loaded, examples, adapter=with_adapter, batch_size=4)
    assert len(calls) == 3
    assert ours == pytest.approx(reference, rel=1e-5)


def test_chunked_loss_steps_aside_when_the_output_layer_is_trained(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir, targets=("q_proj", "lm_head"))
    assert not loss.supports_chunked_loss(model)
    assert _trainer(model, tmp_path, True).chunked_loss is False


def test_the_memory_estimate_knows_what_the_loss_does():
    from lora_cli import estimate

    assert estimate.CHUNKED_LOSS_MODEL_TYPES == loss.PLAIN_HEAD_MODEL_TYPES
    assert estimate.LOSS_CHUNK_ELEMENTS == loss.CHUNK_ELEMENTS


@pytest.mark.parametrize("ratio, chosen", [(0.15, "bf16"), (1.05, "bf16"), (1.2, "fp32"), (1.8, "fp32")])
def test_auto_precision_on_a_cpu_is_the_dtype_it_multiplies_faster(ratio, chosen, tmp_path, monkeypatch):
    """AVX512-BF16 without AMX ran bf16 matmuls at 0.6x fp32's rate and training 1.6x slower: flags alone
    mislead, so the CPU's own timing (bf16 time / fp32 time) decides, a near tie going to bf16."""
    from lora_cli import cpu
    from lora_cli.models import resolve_precision

    if torch.cuda.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("auto picks the GPU's dtype / fp32 without bf16 support: nothing is timed")
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))  # a fresh answer, not one remembered earlier
    monkeypatch.setattr(cpu, "bf16_time_ratio", lambda: ratio)
    cpu.bf16_beats_fp32.cache_clear()
    try:
        assert resolve_precision("auto") == chosen
    finally:
        cpu.bf16_beats_fp32.cache_clear()


def test_the_bf16_timing_measures_this_cpu():
    from lora_cli import cpu

    assert 0.02 < cpu.bf16_time_ratio(rounds=1) < 50  # a ratio of two real timings, whichever way this CPU goes


def test_the_cpu_precision_choice_is_timed_three_times_and_then_remembered(tmp_path, monkeypatch):
    """Every run on one machine, and every rank of a multi-process run, must train in the same precision;
    one timing taken in a noisy moment must not decide it for good."""
    import json

    from lora_cli import cpu

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("without bf16 support there is nothing to time: fp32")
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))
    path = tmp_path / cpu.PRECISION_FILE
    timings = iter([1.5, 0.4, 0.4, 1.5])  # bf16 time / fp32 time: a noisy first timing, then the truth

    def choose() -> bool:
        cpu.bf16_beats_fp32.cache_clear()
        return cpu.bf16_beats_fp32()

    monkeypatch.setattr(cpu, "bf16_time_ratio", lambda: next(timings))
    try:
        assert choose() is False  # one timing so far
        (key,) = json.loads(path.read_text())
        assert choose() is True  # a tie: the newer timing decides
        assert choose() is True and json.loads(path.read_text())[key] == [False, True, True]
        assert choose() is True and next(timings) == 1.5  # three taken: read from now on, not timed again
        # the ranks of a multi-process run read the answer, and add no timing that could split them
        path.write_text(json.dumps({key: [True]}))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert choose() is True and json.loads(path.read_text())[key] == [True]
        monkeypatch.delenv("WORLD_SIZE")
        # an answer kept by an earlier lora (a single true/false) counts as one timing
        path.write_text(json.dumps({key: False}))
        monkeypatch.setattr(cpu, "bf16_time_ratio", lambda: 0.4)
        assert choose() is True and json.loads(path.read_text())[key] == [False, True]
        for damaged in ("not json", "[]"):  # a damaged file is measured again and rewritten, not fatal
            path.write_text(damaged)
            assert choose() is True and json.loads(path.read_text()) == {key: [True]}
        # a cache folder that cannot be written (here: under a file) costs a timing, not the run
        monkeypatch.setenv("LORA_CACHE_DIR", str(path / "below-a-file"))
        assert choose() is True
    finally:
        cpu.bf16_beats_fp32.cache_clear()


def test_the_log_says_why_auto_left_bf16_aside():
    from lora_cli.models import describe_precision

    assert describe_precision("fp32", "fp32") == "fp32"  # asked for: nothing to explain
    assert describe_precision("auto", "bf16") == "bf16"
    explained = describe_precision("auto", "fp32")
    if torch.cuda.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert explained == "fp32"  # no bf16 to leave aside
    else:
        assert explained.startswith("fp32 (auto:") and "bf16" in explained


_STEPS_OF_CHANGING_LENGTH = """
import ctypes
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: with hugepages 'always', faults are few anyway
import ctypes, random, resource, sys
from lora_cli import cpu
applied = cpu.keep_freed_memory() if sys.argv[1] == "keep" else False
# The blocks come straight from malloc, as torch's CPU allocator takes them (posix_memalign), but without the
# small objects torch interleaves on the heap, whose placement varies between runs: the count is exact.
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MB = 1 << 20
def step(sizes):  # one step's activations: written, kept for the backward, then freed (the last first)
    blocks = [libc.malloc(size) for size in sizes]
    for block, size in zip(blocks, sizes):
        libc.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)
step([4 * MB] * 16)  # the longest row first: growing to the peak is not what is counted
rng = random.Random(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step([rng.randint(MB, 4 * MB) for _ in range(16)])  # a packed row of a new length each step
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode, **env):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STEPS_OF_CHANGING_LENGTH, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_activations_are_reused_not_faulted_in_again():
    """Steps of changing length must not hand their memory back to the kernel and fault it in again."""
    from lora_cli import cpu

    if not cpu._glibc():
        pytest.skip("the setting is glibc's")
    applied, kept = _page_faults("keep")
    _, default = _page_faults("default")
    assert applied
    # glibc's defaults trim the freed blocks and fault them in again: ~96k pages (~10k a step); kept, none
    assert default > 50_000 and kept < default / 100
    # a user's own malloc tuning wins (here a 1 MB trim threshold: even more faults than the default)
    applied, theirs = _page_faults("keep", MALLOC_TRIM_THRESHOLD_="1000000")
    assert not applied and theirs > default / 2


def _tiny_lora_model(model_dir):
    from transformers import AutoModelForCausalLM

    from lora_cli import models
    from lora_cli.config import LoraSettings

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return models.add_lora(model, LoraSettings(target_modules="q_proj,v_proj"), quantized=False,
                           gradient_checkpointing=False)


def _loss_and_lora_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_int8_input_gradients_leave_the_forward_exact_and_the_lora_gradients_close(tiny_model_dir):
    """Frozen projections' input gradients through int8: the same loss, LoRA gradients within int8's rounding."""
    from lora_cli import cpu, int8_backward

    if not cpu.int8_matmul_is_exact():
        pytest.skip("this CPU's int8 matmul saturates (no VNNI): lora never picks int8 here")

    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 48))
    batch = {"input_ids": ids, "labels": ids}
    exact_model, int8_model = _tiny_lora_model(tiny_model_dir), _tiny_lora_model(tiny_model_dir)
    with torch.no_grad():  # B starts at zero, which would leave the layers below without a LoRA gradient
        for name, param in exact_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    int8_model.load_state_dict(exact_model.state_dict())  # the same adapter in both
    # 2 layers x 7 frozen projections; not the output layer, not LoRA's trainable A and B
    assert int8_backward.enable(int8_model) == 14
    assert "forward" not in vars(int8_model.get_output_embeddings())
    assert all("forward" not in vars(m) for n, m in int8_model.named_modules() if "lora_" in n)
    exact_loss, exact = _loss_and_lora_grads(exact_model, batch)
    int8_loss, approx = _loss_and_lora_grads(int8_model, batch)
    assert torch.equal(int8_loss, exact_loss)  # the forward is untouched
    rounded = 0
    for name, grad in exact.items():
        error = ((approx[name] - grad).norm() / grad.norm()).item()
        assert error < 0.03, (name, error)  # int8's rounding: about 1% here
        rounded += error > 0
    # the first layer's adapters get their gradient through the second layer's int8 projections
    assert rounded >= len(exact) // 2
    with torch.no_grad():  # evaluation takes the plain path
        assert torch.equal(int8_model(**batch).loss, exact_loss)


def test_int8_input_gradients_apply_where_they_can_and_auto_follows_the_cpus_timing(monkeypatch):
    from lora_cli import cpu
    from lora_cli.errors import ConfigError
    from lora_cli.models import resolve_int8_backward

    for measured in (True, False):  # auto follows the CPU's timing, whichever way it goes
        monkeypatch.setattr(cpu, "int8_beats_fp32", lambda answer=measured: answer)
        assert resolve_int8_backward(None, "fp32", None, device="cpu") is measured
        assert resolve_int8_backward(None, "fp32", None, device="cuda") is False  # a GPU has its own fast paths
    assert resolve_int8_backward(True, "fp32", None, device="cpu") is True
    assert resolve_int8_backward(None, "bf16", None, device="cpu") is False  # bf16 runs its own fast path
    assert resolve_int8_backward(None, "fp32", "4bit", device="cpu") is False  # bitsandbytes' layers, not nn.Linear
    assert resolve_int8_backward(False, "fp32", None, device="cpu") is False
    with pytest.raises(ConfigError, match="--int8-backward applies to fp32 training on the CPU"):
        resolve_int8_backward(True, "bf16", None, device="cpu")
    with pytest.raises(ConfigError, match="--int8-backward applies"):
        resolve_int8_backward(True, "fp32", None, device="cuda")



@pytest.mark.parametrize("speedup, chosen", [(3.0, True), (1.6, True), (1.4, False), (0.8, False)])
def test_the_int8_choice_follows_the_cpus_timing_and_is_kept_beside_the_bf16_one(speedup, chosen, tmp_path,
                                                                                  monkeypatch):
    """int8 input gradients where this CPU's timing finds them 1.5x as fast; the answer is kept, under a key
    of its own, so that every later run and every rank trains the same way. (The timing itself is noisy:
    `lora train` takes the majority of three; a test comparing it with a timing of its own would flake.)"""
    import json

    from lora_cli import cpu

    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))
    (tmp_path / cpu.PRECISION_FILE).write_text(json.dumps({"bf16 answer kept beside it": True}))
    timings = []
    monkeypatch.setattr(cpu, "int8_speedup", lambda: timings.append(1) or speedup)
    monkeypatch.setattr(cpu, "int8_matmul_is_exact", lambda: True)
    cpu.int8_beats_fp32.cache_clear()
    try:
        for _ in range(cpu.TIMINGS + 1):
            cpu.int8_beats_fp32.cache_clear()
            assert cpu.int8_beats_fp32() is chosen
        assert len(timings) == cpu.TIMINGS  # timed three times, then read back
        known = json.loads((tmp_path / cpu.PRECISION_FILE).read_text())
        (key,) = [k for k in known if k.startswith("int8 input gradients | ")]
        assert known[key] == [chosen] * cpu.TIMINGS and known["bf16 answer kept beside it"] is True
    finally:
        cpu.int8_beats_fp32.cache_clear()


def test_a_cpu_whose_int8_matmul_saturates_never_gets_int8_gradients(tmp_path, monkeypatch):
    from lora_cli import cpu

    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "int8_speedup", lambda: 4.0)  # fast, but wrong
    monkeypatch.setattr(cpu, "int8_matmul_is_exact", lambda: False)
    cpu.int8_beats_fp32.cache_clear()
    try:
        assert cpu.int8_beats_fp32() is False
    finally:
        cpu.int8_beats_fp32.cache_clear()


def test_the_int8_timing_measures_this_cpu():
    from lora_cli import cpu

    assert isinstance(cpu.int8_matmul_is_exact(), bool)

    assert 0.05 < cpu.int8_speedup(rounds=1) < 50  # a ratio of two real timings, whichever way this CPU goes


def test_packed_weights_give_the_same_bf16_loss_and_lora_gradients_bit_for_bit(tiny_model_dir):
    """The frozen projections on oneDNN's pre-packed weights run the kernels bf16 training runs anyway:
    the loss and every LoRA gradient equal the plain path's exactly, and `disable` leaves plain layers."""
    from lora_cli import packed_weights

    if not packed_weights.applies("bf16", None, "cpu"):
        pytest.skip("this CPU's oneDNN has no native bf16 kernels: lora never packs here")
    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    model = _lora_model(tiny_model_dir, attention=packed_attention.register())
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = model(**batch).loss
        value.backward()
        return value.detach(), _lora_grads(model)

    plain_loss, plain = loss_and_grads()
    # 2 layers x 7 frozen projections; not the output layer, not LoRA's trainable A and B
    assert packed_weights.enable(model) == 14
    assert "forward" not in vars(model.get_output_embeddings())
    assert all("forward" not in vars(m) for n, m in model.named_modules() if "lora_" in n)
    packed_loss, packed = loss_and_grads()
    assert torch.equal(packed_loss, plain_loss)
    assert packed.keys() == plain.keys() and all(torch.equal(packed[n], plain[n]) for n in plain)
    assert all(grad.abs().sum() > 0 for grad in plain.values())  # every adapter, the first layer's too, is reached
    with torch.no_grad():  # evaluation runs on the packed weights too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(**batch).loss, plain_loss)
    assert packed_weights.disable(model) == 14
    assert not any("forward" in vars(m) for m in model.modules())


def test_packed_weights_apply_to_bf16_on_a_cpu_only():
    from lora_cli import packed_weights

    assert not packed_weights.applies("fp32", None, "cpu")  # fp32 runs in MKL, not oneDNN
    assert not packed_weights.applies("bf16", None, "cuda")
    assert not packed_weights.applies("bf16", "4bit", "cpu")  # bitsandbytes' layers, not nn.Linear
    assert packed_weights.applies("bf16", None, "cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_inference_packs_the_forward_layout_only_where_it_applies_and_fits(tiny_model_dir, monkeypatch):
    """generate and eval: the same logits on the packed forward layout; nothing packed for fp32, nor where
    the copy would take more than three quarters of the free memory."""
    import psutil

    from lora_cli import packed_weights

    if not packed_weights.applies("bf16", None, "cpu"):
        pytest.skip("this CPU's oneDNN has no native bf16 kernels: lora never packs here")
    # weights not marked frozen, as in a plain or merged model loaded for inference
    model = _lora_model(tiny_model_dir).eval().to(torch.bfloat16)
    ids = torch.randint(3, 300, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert packed_weights.enable_for_inference(model, "fp32", None) == 0
    free = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free._replace(available=1000))
    assert packed_weights.enable_for_inference(model, "bf16", None) == 0
    monkeypatch.undo()
    # 14 projections and the 2 x 2 x 2 LoRA matrices, all in bf16 here; not the output layer
    assert packed_weights.enable_for_inference(model, "bf16", None) == 14 + 8
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)
        with model.disable_adapter():  # lora eval's base side
            base = model(input_ids=ids).logits
    assert not torch.equal(base, plain)
    assert packed_weights.disable(model) == 22


@pytest.fixture
def plain_rotary():
    """transformers' rotary function, put back after the test whatever happens in it (fused layers swap it)."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    yield original
    modeling_llama.apply_rotary_pos_emb = original


def _relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def test_fused_layers_train_as_close_to_fp32_as_the_plain_bf16_layers_and_disable_restores_them(tiny_model_dir,
                                                                                                   plain_rotary):
    """RMSNorm, the rotary embedding and LoRA in fewer passes (lora_cli/fused_layers.py) compute the plain
    layers' math: against an fp32 run of the same weights, the bf16 loss and every LoRA gradient are as
    close as the plain bf16 layers' are; and `disable` gives back the plain layers, bit for bit."""
    from transformers.models.llama import modeling_llama

    from lora_cli import fused_layers

    batch = _packed_batch([17, 30, 1, 9], masked_prefix=5)
    model = _lora_model(tiny_model_dir, attention=packed_attention.register())
    for param in model.parameters():  # values bf16 holds exactly, so the fp32 run is the same model
        param.data = param.data.to(torch.bfloat16).float()

    def loss_and_grads(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = model(**batch).loss
        value.backward()
        return value.detach().float(), _lora_grads(model)

    exact_loss, exact = loss_and_grads(bf16=False)
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    plain_loss, plain = loss_and_grads(bf16=True)
    # 2 layers x 2 norms + the final norm; q and v of 2 layers; Llama's rotary function
    from lora_cli import cpu_kernels

    swiglus = 2 if cpu_kernels.available() else 0  # PyTorch's own ops are left as they are without the kernels
    assert fused_layers.enable(model) == {"norms": 5, "rotary": 1, "lora": 4, "mlp": swiglus}
    fused_loss, fused = loss_and_grads(bf16=True)

    assert abs(fused_loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-3
    for name in exact:
        assert exact[name].abs().sum() > 0  # every adapter is reached
        assert _relative_error(fused[name], exact[name]) <= 1.5 * _relative_error(plain[name], exact[name]) + 2e-3, name
    assert fused_layers.disable(model) == 10 + swiglus
    assert not any("forward" in vars(m) for m in model.modules())
    assert modeling_llama.apply_rotary_pos_emb is plain_rotary
    again_loss, again = loss_and_grads(bf16=True)
    assert torch.equal(again_loss, plain_loss) and all(torch.equal(again[n], plain[n]) for n in plain)


def test_each_fused_layer_computes_its_plain_layers_values_and_gradients(plain_rotary):
    """Each piece alone, against transformers' and PEFT's own layers computed in fp32: the fused RMSNorm's
    output is the plain bf16 one, its input gradient as close (a gradient along the normalized input too,
    where the backward's two terms nearly cancel); the rotary embedding is right for any
    cos/sin (halves that differ too) forward and backward; LoRA's fused sum is PEFT's, base and adapter,
    and with the adapter switched off it is the base layer alone."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama import modeling_llama

    from lora_cli import fused_layers

    generator = torch.Generator().manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16).requires_grad_(False)
    norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
    x = (torch.randn(3, 11, 64, generator=generator) * 3).to(torch.bfloat16)
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    noise = torch.randn(3, 11, 64, generator=generator)
    reference = modeling_llama.LlamaRMSNorm(64, eps=1e-6)
    reference.weight.data = norm.weight.float()
    for grad in (noise.to(torch.bfloat16), (normalized / norm.weight.float() + 0.01 * noise).to(torch.bfloat16)):

        def norm_out_and_grad(module, inputs):
            inputs = inputs.detach().requires_grad_()
            out = module(inputs)
            return out, torch.autograd.grad(out, inputs, grad.to(out.dtype))[0]

        exact_out, exact_grad = norm_out_and_grad(reference, x.float())
        plain_out, plain_grad = norm_out_and_grad(norm, x)
        assert fused_layers.enable(norm) == {"norms": 1, "rotary": 1, "lora": 0, "mlp": 0}  # modeling_llama's rotary too
        fused_out, fused_grad = norm_out_and_grad(norm, x)
        fused_layers.disable(norm)
        assert fused_out.dtype == torch.bfloat16 and torch.allclose(fused_out, plain_out, rtol=2 ** -7, atol=0)
        assert _relative_error(fused_grad, exact_grad) <= 1.5 * _relative_error(plain_grad, exact_grad) + 1e-3
        assert _relative_error(fused_grad, exact_grad) < 0.01  # transformers' own is 16% off along n (bf16 g')

    # the rotary embedding, through the function the attention layers call once a model is enabled
    model = torch.nn.Sequential(modeling_llama.LlamaRMSNorm(8))
    original = plain_rotary
    q = torch.randn(1, 4, 9, 16, generator=generator, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, generator=generator, requires_grad=True)
    cos, sin = torch.randn(1, 9, 16, generator=generator), torch.randn(1, 9, 16, generator=generator)
    grads = torch.randn(1, 4, 9, 16, generator=generator), torch.randn(1, 2, 9, 16, generator=generator)

    def rotary_out_and_grads(function):
        outs = function(q, k, cos, sin)
        return outs, torch.autograd.grad(outs, (q, k), grads)

    exact_outs, exact_grads = rotary_out_and_grads(original)
    assert fused_layers.enable(model)["rotary"] == 1
    assert modeling_llama.apply_rotary_pos_emb is not original
    fused_outs, fused_grads = rotary_out_and_grads(modeling_llama.apply_rotary_pos_emb)
    fused_layers.disable(model)
    assert modeling_llama.apply_rotary_pos_emb is original
    for fused_value, exact_value in zip(fused_outs + fused_grads, exact_outs + exact_grads):
        torch.testing.assert_close(fused_value, exact_value, rtol=1e-5, atol=1e-5)

    # LoRA: the fused sum in fp32 is PEFT's to rounding, and an adapter switched off is not added
    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    inputs = torch.randn(2, 5, 16, generator=generator)

    def lora_out_and_grads():
        out = lora(inputs)
        trained = [p for p in lora.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out, trained, torch.ones_like(out))

    peft_out, peft_grads = lora_out_and_grads()
    with lora.disable_adapter():
        base_out = lora(inputs)
    assert fused_layers.enable(lora)["lora"] == 1
    fused_out, fused_grads = lora_out_and_grads()
    with lora.disable_adapter():
        torch.testing.assert_close(lora(inputs), base_out, rtol=0, atol=0)
    fused_layers.disable(lora)
    torch.testing.assert_close(fused_out, peft_out, rtol=1e-5, atol=1e-6)
    for fused_grad, peft_grad in zip(fused_grads, peft_grads):
        torch.testing.assert_close(fused_grad, peft_grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(peft_out, base_out)  # the adapter adds something to test


def _require_compiled_kernels():
    """Skip where the compiled CPU kernels are not meant to be used; fail where they are and do not build."""
    from lora_cli import cpu_kernels

    if cpu_kernels.switched_off():
        pytest.skip(f"{cpu_kernels.SWITCH}=0: PyTorch's own kernels are used")
    if not cpu_kernels.find_compiler():
        pytest.skip("no C compiler on this machine: PyTorch's own kernels are used")
    assert cpu_kernels.available()  # a compiler that cannot build the kernels is a failure, not a skip


def test_compiled_rms_norm_kernel_gives_the_pytorch_paths_values(monkeypatch):
    """The compiled RMSNorm (lora_cli/cpu_kernels.c), forward and backward, against transformers' bf16
    RMSNorm and the fused layer's PyTorch path, on rows of a width that is not a multiple of the kernel's
    16 lanes, with large and small values, an empty batch, and a NaN that stays in its own row."""
    from transformers.models.llama import modeling_llama

    from lora_cli import cpu_kernels, fused_layers

    _require_compiled_kernels()
    norm_function = fused_layers._rms_norm_function()
    generator = torch.Generator().manual_seed(0)
    weight = (torch.rand(100, generator=generator) + 0.5).to(torch.bfloat16)
    plain = modeling_llama.LlamaRMSNorm(100, eps=1e-6).to(torch.bfloat16).requires_grad_(False)
    plain.weight.copy_(weight)

    def out_and_grad(x, grad, compiled):
        monkeypatch.setattr(cpu_kernels, "handles", lambda *tensors: compiled)
        x = x.detach().requires_grad_()
        out = norm_function.apply(x, weight, 1e-6)
        out.backward(grad)
        return out.detach(), x.grad

    for rows, scale in ((37, 1.0), (5, 300.0), (8, 1e-3), (0, 1.0)):
        x = (torch.randn(2, rows, 100, generator=generator) * scale).to(torch.bfloat16)
        grad = torch.randn(2, rows, 100, generator=generator).to(torch.bfloat16)
        compiled_out, compiled_grad = out_and_grad(x, grad, True)
        torch_out, torch_grad = out_and_grad(x, grad, False)
        expected = plain(x)
        # the sum of squares is added up in another order: r may differ in its last bit, a value by one rounding
        assert torch.allclose(compiled_out, expected, rtol=2 ** -7, atol=0)
        assert (compiled_out != expected).sum() <= 0.01 * expected.numel()
        largest = float(torch_grad.abs().max()) if torch_grad.numel() else 0.0
        torch.testing.assert_close(compiled_grad, torch_grad, rtol=2 ** -7, atol=2 ** -7 * largest)
        assert (compiled_grad != torch_grad).sum() <= 0.01 * torch_grad.numel()

    # an input seen transposed and a gradient that is one value broadcast (as `.sum().backward()` gives it)
    x = torch.randn(100, 6, generator=generator).to(torch.bfloat16).t()
    grad = torch.ones(()).to(torch.bfloat16).expand(6, 100)
    (compiled_out, compiled_grad), (torch_out, torch_grad) = (out_and_grad(x, grad, c) for c in (True, False))
    assert torch.equal(compiled_out, plain(x))
    torch.testing.assert_close(compiled_grad, torch_grad, rtol=2 ** -7, atol=2 ** -7 * float(torch_grad.abs().max()))

    x = torch.randn(3, 100, generator=generator).to(torch.bfloat16)
    x[1, 7] = float("nan")
    out, grad = out_and_grad(x, torch.ones(3, 100, dtype=torch.bfloat16), True)
    assert out[1].isnan().all() and grad[1].isnan().all()
    assert out[[0, 2]].isfinite().all() and grad[[0, 2]].isfinite().all()


def test_compiled_swiglu_kernel_gives_pytorchs_values_and_gradients():
    """The MLP's `silu(gate) * up` through the compiled kernel against PyTorch's bf16 ops, forward and both
    gradients: the same bf16 values (its exp is not PyTorch's, so a rare value may round the other way), and
    PyTorch's answers at the edges (0, large values, inf, NaN)."""
    from lora_cli import fused_layers

    _require_compiled_kernels()
    generator = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 60.0, -60.0, 87.5, -87.5, 88.5, -88.5, 89.0, -89.0, 100.0, -100.0,
                          float("inf"), float("-inf"), float("nan")])
    for scale in (1.0, 4.0, 12.0):
        gate = (torch.randn(5, 33, 97, generator=generator) * scale)
        gate.view(-1)[:edges.numel()] = edges
        gate = gate.to(torch.bfloat16)
        up = torch.randn(5, 33, 97, generator=generator).to(torch.bfloat16)
        grad = torch.randn(5, 33, 97, generator=generator).to(torch.bfloat16)
        results = []
        for compute in (fused_layers._swiglu_function().apply, lambda g, u: torch.nn.functional.silu(g) * u):
            g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
            out = compute(g, u)
            out.backward(grad)
            results.append((out.detach(), g.grad, u.grad))
        for compiled, plain in zip(*results):
            assert compiled.dtype == torch.bfloat16
            edge = slice(0, edges.numel())
            assert torch.equal(compiled.view(-1)[edge].nan_to_num(), plain.view(-1)[edge].nan_to_num())
            assert torch.equal(compiled.isnan(), plain.isnan())
            finite = plain.isfinite()
            assert torch.equal(compiled[~finite & ~plain.isnan()], plain[~finite & ~plain.isnan()])
            torch.testing.assert_close(compiled[finite], plain[finite], rtol=2 ** -7, atol=0)
            assert (compiled[finite] != plain[finite]).sum() <= 0.001 * plain.numel()


def test_compiled_rotary_kernel_gives_the_pytorch_paths_values_in_the_same_layout(monkeypatch):
    """The rotary embedding through the compiled kernel against the fused layer's PyTorch path: the same
    bf16 values forward and backward, for q laid out as the projections give it (heads seen transposed),
    a contiguous k, one cos/sin per batch row or one shared, and the output in its input's layout."""
    from lora_cli import cpu_kernels, fused_layers

    _require_compiled_kernels()
    generator = torch.Generator().manual_seed(0)
    for batch, cos_rows in ((2, 2), (2, 1), (1, 1)):
        q_proj = torch.randn(batch, 29, 6 * 16, generator=generator).to(torch.bfloat16)
        k = torch.randn(batch, 2, 29, 16, generator=generator).to(torch.bfloat16)
        cos, sin = (torch.randn(cos_rows, 29, 16, generator=generator).to(torch.bfloat16) for _ in range(2))
        grads = [torch.randn(batch, heads, 29, 16, generator=generator).to(torch.bfloat16) for heads in (6, 2)]
        results = []
        for compiled in (True, False):
            original = cpu_kernels.rotary
            monkeypatch.setattr(cpu_kernels, "rotary", original if compiled else lambda *args: None)
            q_leaf, k_leaf = q_proj.clone().requires_grad_(), k.clone().requires_grad_()
            q = q_leaf.view(batch, 29, 6, 16).transpose(1, 2)
            outs = fused_layers._rotary(q, k_leaf, cos, sin)
            torch.autograd.backward(outs, grads)
            results.append(([o.detach() for o in outs], [o.stride() for o in outs], q_leaf.grad, k_leaf.grad))
            monkeypatch.setattr(cpu_kernels, "rotary", original)
        (outs, strides, q_grad, k_grad), (plain_outs, plain_strides, plain_q_grad, plain_k_grad) = results
        assert strides == plain_strides == [(29 * 6 * 16, 16, 6 * 16, 1), (2 * 29 * 16, 29 * 16, 16, 1)]
        for value, plain in zip(outs + [q_grad, k_grad], plain_outs + [plain_q_grad, plain_k_grad]):
            assert torch.equal(value, plain)


def _exact_packed_attention(q, k, v, lengths, grad):
    """Causal attention within each example in fp64, and its gradients: what every path approximates."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    outs = [torch.nn.functional.scaled_dot_product_attention(
                qs, ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1), is_causal=True).transpose(1, 2)
            for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    out = torch.cat(outs, dim=1)
    out.backward(grad.double())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("heads, kv_heads, dim, lengths", [
    (9, 3, 64, [54, 1, 25, 70, 7, 33]),  # the default model's heads; examples of 1 token and no whole block
    (4, 4, 128, [40, 3, 97]),  # Llama's head width, one key head per query head
])
def test_compiled_attention_is_closer_to_exact_attention_than_the_pytorch_path(heads, kv_heads, dim, lengths,
                                                                                monkeypatch):
    """A packed row's attention through the compiled kernel (causal blocks in fp32) against fp64 attention
    within each example: output and the gradients of q, k and v at least as close as PyTorch's bf16 path
    (which rounds scores and probabilities to bf16), in the layouts the model hands over and expects."""
    _require_compiled_kernels()
    generator = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # as the collator
    projected = [torch.randn(1, tokens, n * dim, generator=generator).to(torch.bfloat16) * 2
                 for n in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, tokens, heads, dim, generator=generator).to(torch.bfloat16)

    def run(compiled):
        monkeypatch.setattr(packed_attention, "_compiled_takes", lambda *args: compiled)
        leaves = [x.clone().requires_grad_() for x in projected]
        q, k, v = (x.view(1, tokens, -1, dim).transpose(1, 2) for x in leaves)  # the projections' layout
        out, _ = packed_attention.packed_attention_forward(object(), q, k, v, None, cu_seq_lens_q=bounds)
        out.backward(grad)
        return out.detach(), *(x.grad.view(1, tokens, -1, dim).transpose(1, 2) for x in leaves)

    exact = _exact_packed_attention(*(x.view(1, tokens, -1, dim).transpose(1, 2) for x in projected), lengths, grad)
    compiled, plain = run(True), run(False)
    assert compiled[0].shape == (1, tokens, heads, dim) and compiled[0].is_contiguous()
    for name, ours, theirs, reference in zip(("out", "q", "k", "v"), compiled, plain, exact):
        assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape
        error = (ours.double() - reference).abs().max() / reference.abs().max()
        plain_error = (theirs.double() - reference).abs().max() / reference.abs().max()
        assert error <= max(plain_error, 2 ** -8), name
    # a 1-token example attends to itself alone: its output is its value, exactly
    position = lengths[0]
    value = projected[2].view(1, tokens, kv_heads, dim)[0, position]
    assert torch.equal(compiled[0][0, position], value.repeat_interleave(heads // kv_heads, 0))


def test_compiled_attention_trains_as_close_to_fp32_as_the_pytorch_path(tmp_path, monkeypatch):
    """A bf16 LoRA step of a Llama with 64-wide heads (the compiled attention's case) through the compiled
    attention: loss and every LoRA gradient as close to an fp32 step of the same weights as the PyTorch path's."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    _require_compiled_kernels()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(packed_attention.register())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                             init_lora_weights=False))
    for param in model.parameters():  # values bf16 holds exactly, so the fp32 run is the same model
        param.data = param.data.to(torch.bfloat16).float()
    batch = _packed_batch([40, 1, 75, 20], masked_prefix=5)
    taken = []
    original = packed_attention._compiled_takes

    def loss_and_grads(bf16, compiled):
        monkeypatch.setattr(packed_attention, "_compiled_takes",
                            lambda *args: taken.append(original(*args)) or (compiled and taken[-1]))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = model(**batch).loss
        value.backward()
        return value.detach().float(), _lora_grads(model)

    exact_loss, exact = loss_and_grads(bf16=False, compiled=False)
    for param in model.parameters():  # frozen weights in bf16, as `lora train` keeps them: q, k and v are bf16
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    plain_loss, plain = loss_and_grads(bf16=True, compiled=False)
    taken.clear()
    compiled_loss, compiled = loss_and_grads(bf16=True, compiled=True)
    assert taken == [True, True]  # both layers' attention went through the kernel
    assert abs(compiled_loss - exact_loss) <= 1.5 * abs(plain_loss - exact_loss) + 1e-3
    for name in exact:
        assert exact[name].abs().sum() > 0
        assert _relative_error(compiled[name], exact[name]) <= 1.5 * _relative_error(plain[name], exact[name]) + 2e-3, name


def test_compiled_attention_steps_aside_where_it_does_not_apply():
    """Dropout, heads not a whole number of 64-wide blocks, fp32, examples whose backward would need more
    scratch than the cap, and bounds that do not cover the row exactly go to the PyTorch path."""
    from lora_cli import cpu_kernels

    _require_compiled_kernels()
    q, k = torch.zeros(1, 4, 10, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 10, 64, dtype=torch.bfloat16)
    assert packed_attention._compiled_takes(q, k, k, [0, 4, 10])
    long_q, long_k = torch.zeros(1, 4, 8000, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 8000, 64, dtype=torch.bfloat16)
    assert packed_attention._compiled_takes(long_q, long_k, long_k, list(range(0, 8001, 500)))
    assert not packed_attention._compiled_takes(long_q, long_k, long_k, [0, 4000, 8000])  # 2 x 4 heads x 4000^2 fp32 > 256 MB
    assert not packed_attention._compiled_takes(long_q, long_k, long_k, list(range(0, 8001, 1000)))  # all the blocks
    assert not cpu_kernels.attention_takes(q[..., :32], k[..., :32], k[..., :32], [0, 10])
    assert not cpu_kernels.attention_takes(q.float(), k.float(), k.float(), [0, 10])
    assert not cpu_kernels.attention_takes(q[:, :3], k, k, [0, 10])  # 3 query heads over 2 key heads
    for uncovered in ([0, 4, 8], [2, 4, 10], [0, 6, 4, 10], [0, 4, 12], []):
        assert not cpu_kernels.attention_takes(q, k, k, uncovered)
    calls = []
    original = packed_attention._compiled_function
    try:
        packed_attention._compiled_function = lambda: calls.append(1) or original()
        bounds = torch.tensor([0, 4, 10], dtype=torch.int32)
        packed_attention.packed_attention_forward(object(), q, k, k, None, dropout=0.1, cu_seq_lens_q=bounds)
        assert not calls
        packed_attention.packed_attention_forward(object(), q, k, k, None, cu_seq_lens_q=bounds)
        assert calls
        calls.clear()
        for short in ([0, 4, 8], [2, 4, 10]):  # bounds that miss tokens of the row: refused, never half-computed
            with pytest.raises(RuntimeError):
                packed_attention.packed_attention_forward(object(), q, k, k, None,
                                                          cu_seq_lens_q=torch.tensor(short, dtype=torch.int32))
        assert not calls
    finally:
        packed_attention._compiled_function = original


def test_the_training_log_names_the_compiled_attention_where_it_applies():
    """`compiled_applies` (what `lora train` logs) follows the kernel's own conditions: this module's attention,
    bf16 on a CPU, no attention dropout, 64-wide head blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _require_compiled_kernels()

    def model(head_dim, **extra):
        config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, **extra)
        return LlamaForCausalLM(config)

    llama = model(64)
    assert not packed_attention.compiled_applies(llama, "bf16", "cpu")  # transformers' SDPA
    llama.set_attn_implementation(packed_attention.register())
    assert packed_attention.compiled_applies(llama, "bf16", "cpu")
    assert not packed_attention.compiled_applies(llama, "fp32", "cpu")
    assert not packed_attention.compiled_applies(llama, "bf16", "cuda")
    for other in (model(32), model(64, attention_dropout=0.1)):
        other.set_attn_implementation(packed_attention.register())
        assert not packed_attention.compiled_applies(other, "bf16", "cpu")


def test_compiled_kernels_are_built_once_and_can_be_switched_off(monkeypatch, tmp_path):
    """The library is built into the cache and taken from there next time (a damaged one is built again);
    LORA_CPU_KERNELS=0 and a missing compiler each leave PyTorch's kernels in place."""
    import os
    import shutil
    import subprocess
    import sys

    from lora_cli import cpu_kernels

    compiler = cpu_kernels.find_compiler()
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))
    try:
        if compiler:
            cpu_kernels._load(compiler)
            (built,) = (tmp_path / "kernels").iterdir()  # the library, and no partial file beside it
            assert built.name.endswith(".so") and built.stat().st_size > 0
            when = built.stat().st_mtime_ns
            cpu_kernels._load(compiler)
            assert list(built.parent.iterdir()) == [built] and built.stat().st_mtime_ns == when  # not built again
            # a damaged library is built again; in another process, as this one has the library loaded
            damaged = tmp_path / "damaged"
            damaged.write_bytes(b"cut short")
            os.replace(damaged, built)
            subprocess.run([sys.executable, "-c", f"from lora_cli import cpu_kernels; cpu_kernels._load({compiler!r})"],
                           check=True, env={**os.environ, "LORA_CACHE_DIR": str(tmp_path)})
            assert list(built.parent.iterdir()) == [built] and built.stat().st_size > 1000
        monkeypatch.setenv("LORA_CPU_KERNELS", "0")
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() is None and not cpu_kernels.handles(torch.ones(1, dtype=torch.bfloat16))
        monkeypatch.delenv("LORA_CPU_KERNELS")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setattr(shutil, "which", lambda name: None)
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() is None
    finally:
        cpu_kernels.library.cache_clear()


def test_fused_layers_leave_alone_what_they_would_not_compute_exactly(plain_rotary):
    """LoRA with dropout or DoRA keeps PEFT's forward, a norm that is not Llama's RMSNorm (Gemma's adds 1 to
    its weight) keeps its own, and nothing is fused but bf16 training on a CPU with plain weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM

    from lora_cli import fused_layers

    for extra in ({"lora_dropout": 0.1}, {"use_dora": True}):
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 12)),
                               LoraConfig(r=4, target_modules=["0"], **extra))
        assert fused_layers.enable(model)["lora"] == 0, extra
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    gemma.requires_grad_(False)
    assert fused_layers.enable(gemma)["norms"] == 0
    assert fused_layers.enable(gemma)["mlp"] == 0  # GELU, not SiLU: Gemma's MLP is Llama's code otherwise
    fused_layers.disable(gemma)
    assert fused_layers.applies("bf16", None, "cpu")
    assert not fused_layers.applies("fp32", None, "cpu")
    assert not fused_layers.applies("bf16", None, "cuda")
    assert not fused_layers.applies("bf16", "4bit", "cpu")
