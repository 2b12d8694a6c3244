"""`lora estimate`: exact PEFT parameter counts and the memory arithmetic, on the meta device (no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import lru_cache

import pytest

from lora_cli.errors import ConfigError, ModelError
from lora_cli.estimate import CONFIG_DIR, GIB, GPU_SIZES_GB, estimate, format_estimate, load_model_config

LLAMA_7B_BASE = 6_738_415_616
# llama-7b's quantizable linears: 32 layers x (4 of 4096x4096 + 3 of 4096x11008); the rest
# (embeddings, lm_head, 65 norms) is 262,410,240 parameters.
LLAMA_7B_LINEAR = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
LLAMA_7B_REST = LLAMA_7B_BASE - LLAMA_7B_LINEAR


@lru_cache(maxsize=None)
def _config(name: str):
    return load_model_config(name)


@lru_cache(maxsize=None)
def report(name: str = "llama-7b", **kwargs) -> dict:
    """One estimate per distinct call: tests share them (read-only)."""
    return estimate(_config(name), model=name, **kwargs)


def test_llama7b_r8_on_q_and_v_has_4194304_trainable_params():
    assert report(target_modules="qv", r=8)["trainable_params"] == 4_194_304


def test_llama7b_r8_on_all_linear_layers_has_19988480_trainable_params():
    assert report(target_modules="all-linear", r=8)["trainable_params"] == 19_988_480


def test_llama7b_base_model_has_6738415616_params():
    assert report(target_modules="qv")["base_params"] == LLAMA_7B_BASE


def test_total_params_count_base_plus_adapter_as_peft_does():
    rep = report(target_modules="qv")
    assert rep["total_params"] == LLAMA_7B_BASE + 4_194_304
    assert rep["trainable_share"] == pytest.approx(4_194_304 / rep["total_params"])


def test_tied_embeddings_are_counted_once():
    assert report("smollm2-135m", target_modules="qv")["base_params"] == 134_515_008


def test_dora_adds_one_magnitude_per_output_feature():
    lora, dora = report(target_modules="qv"), report(target_modules="qv", use_dora=True)
    assert dora["trainable_params"] - lora["trainable_params"] == 32 * (4096 + 4096)


def test_unquantized_weights_are_base_params_times_dtype_bytes():
    assert report(target_modules="qv", compute_dtype="fp16")["memory"]["weights_bytes"] == LLAMA_7B_BASE * 2


def test_4bit_weights_match_hand_computed_nf4_with_double_quant():
    # One q_proj (4096x4096 = 16,777,216 weights): 8,388,608 bytes of 4-bit codes + 262,144 uint8
    # absmax (one per 64) + 1,024 fp32 second-level absmax (one per 256 blocks) = 4,096 bytes +
    # 1,092 bytes of per-tensor constants (NF4 code, nested code, offset) = 8,655,940.
    # One gate_proj (4096x11008 = 45,088,768): 22,544,384 + 704,512 + 11,008 + 1,092 = 23,260,996.
    layer = 4 * 8_655_940 + 3 * 23_260_996
    assert layer == 104_406_748
    # The rest is fp32: prepare_model_for_kbit_training upcasts every non-quantized parameter.
    expected = 32 * layer + LLAMA_7B_REST * 4
    assert report(target_modules="qv", quantization="4bit")["memory"]["weights_bytes"] == expected


def test_4bit_linear_weights_are_a_quarter_of_fp16_plus_about_3_percent_constants():
    quantized = report(target_modules="qv", quantization="4bit")["memory"]["weights_bytes"] - LLAMA_7B_REST * 4
    ratio = quantized / (LLAMA_7B_LINEAR * 2)
    assert 0.25 < ratio < 0.26  # 4.127 bits per weight against 16


def test_8bit_weights_are_one_byte_per_param_plus_an_fp32_scale_per_row():
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096)
    expected = LLAMA_7B_LINEAR + rows * 4 + LLAMA_7B_REST * 4
    assert report(target_modules="qv", quantization="8bit")["memory"]["weights_bytes"] == expected


def test_int8_input_gradients_add_an_int8_copy_and_an_fp32_scale_per_input_feature():
    fp32 = report(target_modules="qv", compute_dtype="fp32", device="cpu")["memory"]["weights_bytes"]
    int8 = report(target_modules="qv", compute_dtype="fp32", device="cpu", int8_backward=True)
    columns = 32 * (6 * 4096 + 11008)  # down_proj's input is the 11008-wide MLP
    assert int8["memory"]["weights_bytes"] - fp32 == LLAMA_7B_LINEAR + columns * 4
    assert int8["int8_backward"]


def test_optimizer_keeps_two_fp32_states_per_trainable_param():
    rep = report(target_modules="qv")
    m = rep["memory"]
    assert (m["lora_bytes"], m["gradients_bytes"], m["optimizer_bytes"]) == (4_194_304 * 4, 4_194_304 * 4,
                                                                            4_194_304 * 8)


def test_gradient_checkpointing_lowers_activations():
    without = report(target_modules="qv")["memory"]["activations_bytes"]
    with_ckpt = report(target_modules="qv", gradient_checkpointing=True)["memory"]["activations_bytes"]
    assert with_ckpt < without / 3


def test_report_gives_activations_both_with_and_without_checkpointing():
    rep = report(target_modules="qv", gradient_checkpointing=True)
    assert rep["memory"]["activations_bytes"] == rep["activations_bytes_with_checkpointing"]
    assert rep["activations_bytes_without_checkpointing"] == report(target_modules="qv")["memory"]["activations_bytes"]


def test_bigger_batch_raises_total_memory():
    assert report(target_modules="qv", batch_size=8)["memory"]["total_bytes"] > \
        report(target_modules="qv", batch_size=4)["memory"]["total_bytes"]


def test_longer_sequences_raise_activations():
    assert report(target_modules="qv", max_seq_len=1024)["memory"]["activations_bytes"] > \
        report(target_modules="qv", max_seq_len=512)["memory"]["activations_bytes"]


def test_fits_table_lists_each_gpu_size_and_the_largest_batch_fits_where_one_more_does_not():
    rep = report(target_modules="qv", quantization="4bit", gradient_checkpointing=True)
    assert [row["gpu_gb"] for row in rep["fits"]] == list(GPU_SIZES_GB)
    for row in rep["fits"]:
        assert row["fits"] == (row["max_batch_size"] >= rep["batch_size"])
    assert [row["max_batch_size"] for row in rep["fits"]] == sorted(row["max_batch_size"] for row in rep["fits"])
    assert rep["fits"][-1]["max_batch_size"] > 0


def test_70b_model_is_too_big_for_8gb_even_in_4bit():
    rep = report("llama2-70b", target_modules="qv", quantization="4bit", gradient_checkpointing=True)
    assert rep["fits"][0] == {"gpu_gb": 8, "fits": False, "max_batch_size": 0}


def test_70b_estimate_takes_seconds_not_minutes():
    config = _config("llama3-70b")
    estimate(_config("smollm2-135m"))  # the first estimate of a process imports torch and peft: not timed
    start = time.perf_counter()
    estimate(config, quantization="4bit")  # all-linear: 560 adapted modules, on meta
    assert time.perf_counter() - start < 20  # about 1 s here; minutes if it built real weights


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_config_is_a_valid_llama_config_that_estimates(path):
    from transformers import LlamaConfig

    data = json.loads(path.read_text())
    config = LlamaConfig(**data)
    assert data["model_type"] == "llama" and data["architectures"] == ["LlamaForCausalLM"]
    rep = report(path.stem, target_modules="qv")
    assert rep["layers"] == config.num_hidden_layers and rep["trainable_params"] > 0


def test_shipped_short_names_are_the_documented_ones():
    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert names == {"smollm2-135m", "llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama2-7b", "llama2-13b",
                     "llama2-70b", "llama3-8b", "llama3-70b"}


def test_report_survives_a_json_round_trip():
    rep = report(target_modules="qv", quantization="4bit")
    assert json.loads(json.dumps(rep)) == rep


def test_format_shows_counts_with_thousands_separators_and_the_fits_table():
    text = format_estimate(report(target_modules="qv"))
    assert "6,742,609,920" in text and "4,194,304" in text and "0.0622%" in text
    assert "total" in text and "80 GB" in text


def test_local_folder_with_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text((CONFIG_DIR / "smollm2-135m.json").read_text())
    assert load_model_config(str(tmp_path)).hidden_size == 576


def test_local_folder_without_config_json_is_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_model_config(str(tmp_path))


def test_unknown_model_id_raises_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="no-such-model"):
        load_model_config("nobody-here/no-such-model")


def test_unknown_quantization_raises_config_error():
    with pytest.raises(ConfigError):
        estimate(_config("llama-7b"), quantization="3bit")


def test_unknown_target_module_raises_config_error():
    with pytest.raises(ConfigError):
        estimate(_config("smollm2-135m"), target_modules="no_such_proj")


# Peak RSS on a 2-core CPU of SmolLM2-135M training runs, r=8 alpha=16, batch 4, seq 256. Plain HF
# Trainer runs with the model's own loss and padding (/work/shared/FACTS.md "Throughput baselines",
# read as 1e9 bytes), and `lora train` runs measured for this module on a Xeon with AMX: rows longer
# than 256 tokens, 6 steps, packed, no dropout (the setup of tests/test_default_model.py's live check).
@pytest.mark.parametrize("kwargs, measured", [
    (dict(compute_dtype="fp32", target_modules="qv", packing=False, chunked_loss=False), 3.5e9),
    (dict(compute_dtype="fp32", target_modules="qv", packing=False, gradient_checkpointing=True,
          chunked_loss=False), 2.1e9),
    (dict(compute_dtype="bf16", target_modules="qv", packing=True, lora_dropout=0.0), 1.66 * GIB),
    (dict(compute_dtype="bf16", target_modules="all-linear", packing=True, lora_dropout=0.0), 1.98 * GIB),
    (dict(compute_dtype="fp32", target_modules="all-linear", packing=True, lora_dropout=0.0), 2.84 * GIB),
    (dict(compute_dtype="bf16", target_modules="all-linear", packing=True, lora_dropout=0.0,
          gradient_checkpointing=True), 1.28 * GIB),
])
def test_smollm2_cpu_estimate_is_within_25_percent_of_measured_peak_rss(kwargs, measured):
    rep = report("smollm2-135m", batch_size=4, max_seq_len=256, device="cpu", **kwargs)
    assert rep["memory"]["total_bytes"] == pytest.approx(measured, rel=0.25)


def test_importing_the_module_does_not_import_torch():
    code = "import sys, lora_cli.estimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hub_id_of_a_short_name_loads_the_shipped_config_offline():
    assert load_model_config("meta-llama/Meta-Llama-3-8B").vocab_size == 128256


def test_missing_local_path_is_bad_input_without_asking_the_hub():
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config("./no/such/model-folder")


def test_packed_weights_add_two_bf16_copies_of_every_projection_and_of_the_output_layer():
    plain = report(target_modules="qv", compute_dtype="bf16", device="cpu")
    packed = report(target_modules="qv", compute_dtype="bf16", device="cpu", packed_weights=True)
    head = 32000 * 4096  # the chunked loss multiplies through the output layer's packed copies too
    assert packed["memory"]["weights_bytes"] - plain["memory"]["weights_bytes"] == 2 * 2 * (LLAMA_7B_LINEAR + head)
    unchunked = report(target_modules="qv", compute_dtype="bf16", device="cpu", packed_weights=True,
                       chunked_loss=False)
    assert packed["memory"]["weights_bytes"] - unchunked["memory"]["weights_bytes"] == 2 * 2 * head
    assert packed["packed_weights"] and not plain["packed_weights"]
    assert "2 packed copies" in format_estimate(packed) and "packed copies" not in format_estimate(plain)
