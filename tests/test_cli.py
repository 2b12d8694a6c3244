"""The command line: bad input gets one line and an exit status, leaves nothing behind; good input works."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import logged_steps, tiny_train_args
from lora_cli import runs
from lora_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


BAD_INPUTS = [
    (["train", "--rank", "0"], 2, "--rank must be a positive integer, got 0"),
    (["train", "--dropout", "1.5"], 2, "--dropout must be in [0, 1)"),
    (["train", "--lr", "-1"], 2, "--lr must be a positive number"),
    (["train", "--max-seq-len", "0"], 2, "--max-seq-len must be a positive integer"),
    (["train", "--use-4bit", "--use-8bit"], 2, "--use-4bit and --use-8bit exclude each other"),
    (["train", "--precision", "fp8"], 2, "--precision must be one of auto, bf16, fp16, fp32"),
    (["train", "--scheduler", "wavy"], 2, "--scheduler must be one of"),
    (["train", "--format", "xml"], 2, "--format must be one of"),
    (["train", "--batch-size", "0"], 2, "--batch-size must be a positive"),
    (["train", "--eval-split", "1.0"], 2, "--eval-split must be in [0, 1)"),
    (["train", "--config", "missing.yaml"], 2, "--config file not found: missing.yaml"),
    (["train", "--data", "missing.jsonl", "--model", "MODEL"], 2, "--data missing.jsonl: no such file or folder"),
    (["train", "--data", "notes.txt", "--model", "MODEL"], 2, "unsupported file type '.txt'"),
    (["train", "--data", "data/missing.jsonl", "--model", "MODEL"], 2, "--data data/missing.jsonl: no such file"),
    (["train", "--data", "bad.jsonl", "--model", "MODEL"], 2, "line 2 is not valid JSON"),
    (["train", "--data", "columns.jsonl", "--model", "MODEL"], 2,
     "cannot tell the data format of --data columns.jsonl from columns answer, question"),
    (["train", "--data", "mixed.jsonl", "--model", "MODEL"], 2,
     "--data mixed.jsonl row 2 has no 'output' (its columns: instruction, response); every instruction row needs"),
    (["train", "--data", "nulls.jsonl", "--model", "MODEL"], 2, "--data nulls.jsonl row 1 has an empty 'output'"),
    (["train", "--data", "facts.jsonl", "--eval-data", "missing.jsonl", "--model", "MODEL"], 2,
     "--eval-data missing.jsonl: no such file"),
    (["train", "--data", "facts.jsonl", "--eval-data", "mixed.jsonl", "--model", "MODEL"], 2,
     "--eval-data mixed.jsonl row 2 has no 'output'"),
    (["train", "--data", "one.jsonl", "--eval-split", "0.5", "--model", "MODEL"], 2,
     "--eval-split 0.5 of 1 training rows leaves none to train on"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--output-dir", "notes.txt"], 2,
     "--output-dir notes.txt is a file"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--output-dir", ".", "--overwrite"], 2,
     "--output-dir . holds files that are not a lora run (such as bad.jsonl); pick another folder"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--output-dir", "project", "--overwrite"], 2,
     "--output-dir project holds files that are not a lora run (such as src); pick another folder"),
    (["train", "--data", "empty.jsonl", "--model", "MODEL"], 2, "no rows found"),
    (["train", "--model", "./no/such/folder"], 2, "no such folder"),
    (["train", "--data", "someorg/somedata", "--model", "MODEL"], 1,
     "--data someorg/somedata: no such local file or folder, and HF_DATASETS_OFFLINE=1 forbids downloading it"),
    (["train", "--model", "not-a-real-org/not-a-real-model"], 1, "not in the local cache and HF_HUB_OFFLINE=1"),
    (["train", "--data", "facts.jsonl", "--model", "noweights"], 2, "--model noweights holds no weight files"),
    (["train", "--data", "facts.jsonl", "--model", "notokenizer"], 2, "notokenizer holds no tokenizer (tokenizer.json"),
    (["train", "--model", "my model!"], 2, "--model 'my model!' is neither a model folder, a hub id (org/name) nor"),
    (["estimate", "--model", "my model!"], 2, "--model 'my model!' is neither a model folder"),
    (["train", "--model", "llama-7b", "--rank", "8", "--use-4bit"], 1, "model 'llama-7b' (huggyllama/llama-7b)"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--target-modules", "nope_proj"], 2,
     "--target-modules nope_proj not found in this model; it has:"),
    (["train", "--resume", "--overwrite"], 2, "--resume and --overwrite exclude each other"),
    (["train", "--report-to", "wandb"], 2, "--report-to wandb needs the wandb package"),
    (["train", "--resume"], 2, "--resume: no unfinished run with a checkpoint in "),
    (["generate"], 2, "give exactly one of --prompt"),
    (["generate", "--prompt", "hi"], 2, "no adapter named and no"),
    (["generate", "--prompt", "hi", "--adapter", "nowhere"], 2, "nowhere does not exist"),
    (["generate", "--prompts-file", "facts.jsonl"], 2, "--prompts-file needs --output"),
    (["generate", "--prompts-file", "facts.jsonl", "--output", "notes.txt"], 2,
     "--output notes.txt already exists; name a new file, or pass --overwrite"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--output-dir", "/proc/no/run"], 2,
     "--output-dir /proc/no/run cannot be created in /proc"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--output-dir", "notes.txt/run"], 2,
     "--output-dir notes.txt/run cannot be created in"),
    (["eval", "--adapter", "nowhere"], 2, "nowhere does not exist"),
    (["eval", "--data", "missing.jsonl"], 2, "no adapter named and no"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--max-seq-len", "3"], 2,
     "no training row has a response token within --max-seq-len 3"),
    (["train", "--push-to-hub", "me/my-adapter"], 2, "HF_HUB_OFFLINE=1 forbids uploading"),
    (["train", "--push-to-hub", "not a repo!"], 2, "is not a repository id"),
    (["train", "--config", "push.yaml"], 2, "HF_HUB_OFFLINE=1 forbids uploading"),  # from YAML as from the flag
    (["train", "--config", "unknown-key.yaml"], 2, "unknown key 'lora.rank' in unknown-key.yaml (did you mean 'lora.r'?)"),
    (["merge", "nowhere"], 2, "nowhere does not exist"),
    (["merge", "--push-to-hub", "me/merged"], 2, "HF_HUB_OFFLINE=1 forbids uploading"),
    (["estimate", "--rank", "0"], 2, "--rank must be a positive integer, got 0"),
    (["estimate", "--device", "tpu"], 2, "--device must be cuda or cpu"),
    (["estimate", "--device", "cpu", "--precision", "fp16"], 2, "--precision fp16 needs a CUDA GPU; on the CPU use bf16"),
    (["estimate", "--model", "./no/such/folder"], 2, "does not exist"),
    (["estimate", "--model", "llama-7b", "--target-modules", "nope_proj"], 2, "nope_proj"),
    (["info", "nowhere"], 2, "nowhere does not exist"),
    (["train", "--config", "scalar.yaml"], 2, "'model' in scalar.yaml must be a section of keys (such as model: {name"),
    (["train", "--data", "facts.jsonl", "--model", "facts.jsonl"], 2, "--model facts.jsonl is a file; give the model's folder"),
    (["train", "--data", "facts.jsonl", "--model", "badconfig"], 2, "--model badconfig: its config.json is damaged"),
    (["estimate", "--model", "badconfig"], 2, "Model folder 'badconfig': its config.json cannot be read"),
    (["train", "--data", "facts.jsonl", "--model", "badweights"], 2,
     "badweights/model.safetensors is damaged or not a safetensors file"),
    (["train", "--data", "my org/my data", "--model", "MODEL"], 2,
     "--data my org/my data: no such local file or folder, nor a valid hub dataset id"),
    (["generate", "--prompt", "hi", "--repetition-penalty", "0"], 2,
     "--repetition-penalty must be a finite number above 0 (1 = no penalty), got 0.0"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], 2, "--temperature must be a finite number (0 = greedy)"),
    (["generate", "--prompt", "hi", "--temperature", "0.7", "--seed", str(2**32)], 2,
     "--seed must be an integer from 0 to 2**32 - 1, got 4294967296"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--epochs", "inf"], 2,
     "--epochs must be a finite number, got inf"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--rank", "1000000000", "--target-modules", "q_proj"], 1,
     "GiB; lower --batch-size, --max-seq-len or --rank"),
    (["train", "--data", "facts.jsonl", "--model", "MODEL", "--seed", "99999999999"], 2,
     "--seed must be an integer from 0 to 2**32 - 1"),
    (["generate", "--prompt", "hi", "--precision", "fp8"], 2, "--precision must be one of auto, bf16, fp16, fp32"),
    (["eval", "--precision", "fp8"], 2, "--precision must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    (["train", "--target-modules", ","], 2, "--target-modules must be a preset (qv, attention, mlp, all-linear)"),
]


@pytest.mark.parametrize("args, code, message", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_leaves_nothing(args, code, message, workdir, tiny_model_dir, facts_file):
    (workdir / "bad.jsonl").write_text('{"text": "ok"}\n{"text": nope}\n')
    (workdir / "columns.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (workdir / "empty.jsonl").write_text("\n")
    (workdir / "mixed.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "response": "d"}\n')
    (workdir / "nulls.jsonl").write_text('{"instruction": "a", "output": null}\n')
    (workdir / "one.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (workdir / "notes.txt").write_text("hello\n")
    (workdir / "unknown-key.yaml").write_text("lora:\n  rank: 16\n")
    (workdir / "push.yaml").write_text("push_to_hub: me/my-adapter\n")
    (workdir / "project" / "checkpoints").mkdir(parents=True)  # a folder of the user's that merely looks like a run
    (workdir / "project" / "src").mkdir()
    (workdir / "project" / "src" / "main.py").write_text("precious\n")
    (workdir / "scalar.yaml").write_text("model: some-model\n")  # a section given as a value
    for folder, files in (("noweights", ["config.json", "tokenizer.json", "tokenizer_config.json"]),
                          ("notokenizer", ["config.json", "model.safetensors"]),
                          ("badconfig", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
                          ("badweights", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])):
        (workdir / folder).mkdir()
        for name in files:
            (workdir / folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    (workdir / "badconfig" / "config.json").write_text('{"model_type": "llama",')  # cut off mid-write
    (workdir / "badweights" / "model.safetensors").write_bytes(b"")  # a download that never arrived
    (workdir / "facts.jsonl").write_text(facts_file.read_text())
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    before = snapshot(workdir)
    result = invoke(*args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert snapshot(workdir) == before  # nothing created, nothing changed


@pytest.mark.parametrize("stopped", [True, False])
def test_bad_input_on_another_rank_waits_for_rank_0_to_say_it(stopped, monkeypatch, capsys):
    """Under a launcher, rank 0 says a bad-input error; another rank waits to be stopped rather than leave first
    (the launcher would stop rank 0 before it spoke). Not stopped in time, it says the error itself."""
    import typer

    from lora_cli import cli
    from lora_cli.errors import ConfigError

    def sleep(seconds):
        assert seconds == cli.RANK_ZERO_GRACE_S
        if stopped:
            raise KeyboardInterrupt  # the launcher's SIGTERM, as lora receives it

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli.time, "sleep", sleep)

    @cli.errors_as_one_line
    def command():
        raise ConfigError("--rank must be a positive integer")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 2
    said = capsys.readouterr().err.count("error: --rank must be a positive integer")
    assert said == (0 if stopped else 1)


def test_debug_shows_the_traceback_and_keeps_the_exit_status():
    result = invoke("--debug", "train", "--rank", "0")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "--rank must be a positive" in result.stderr


def test_finished_run_survives_a_second_train_into_the_same_folder(workdir, tiny_model_dir, facts_file, monkeypatch):
    out = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, out)).exit_code == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    result = invoke(*tiny_train_args(tiny_model_dir, facts_file, out, "--lr", "1e-2"))
    assert result.exit_code == 2 and "already holds a finished run" in result.output and "--overwrite" in result.output
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, out, "--overwrite", "--lr", "1e-2")).exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() != adapter

    # --overwrite never deletes the data the run reads, even inside the old run's folder
    inside = out / "my_data.jsonl"
    inside.write_text(facts_file.read_text())
    result = invoke(*tiny_train_args(tiny_model_dir, inside, out, "--overwrite"))
    assert result.exit_code == 2 and "holds files that are not a lora run (such as my_data.jsonl)" in result.output
    assert inside.read_text() == facts_file.read_text() and runs.is_finished(out)
    inside.unlink()

    # nor the folder it runs in
    monkeypatch.chdir(out)
    result = invoke(*tiny_train_args(tiny_model_dir, facts_file, Path("."), "--overwrite"))
    assert result.exit_code == 2 and "the folder this command runs in" in result.output
    assert runs.is_finished(out)


def test_bare_resume_never_reopens_a_finished_run(workdir, tiny_model_dir, facts_file):
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--save-steps", "5")).exit_code == 0
    adapter = (workdir / "run" / "adapter_model.safetensors").read_bytes()
    result = invoke("train", "--model", str(tiny_model_dir), "--data", str(facts_file), "--resume")
    assert result.exit_code == 2 and "no unfinished run with a checkpoint" in result.output
    assert (workdir / "run" / "adapter_model.safetensors").read_bytes() == adapter
    # named, it is refused too, unless asked to go further than it went
    result = invoke("train", "--resume", "--output-dir", str(workdir / "run"))
    assert result.exit_code == 2 and "is finished (12 steps); to train it further pass a --max-steps above 12" in result.output
    assert (workdir / "run" / "adapter_model.safetensors").read_bytes() == adapter
    assert invoke("train", "--resume", "--output-dir", str(workdir / "run"), "--max-steps", "15").exit_code == 0
    assert json.loads((workdir / "run" / "lora_run.json").read_text())["metrics"]["global_step"] == 15
    assert logged_steps(workdir / "run")[-3:] == [13, 14, 15]


def test_a_finished_run_goes_on_for_more_epochs_only(workdir, tiny_model_dir, facts_file):
    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "-1", "--epochs", "1",
                                   "--save-steps", "2")).exit_code == 0
    steps = json.loads((run / "lora_run.json").read_text())["metrics"]["global_step"]
    result = invoke("train", "--resume", "--output-dir", str(run))  # the same epoch count: nothing to add
    assert result.exit_code == 2 and f"is finished ({steps} steps); to train it further pass more --epochs than 1" \
        in result.output
    assert invoke("train", "--resume", "--output-dir", str(run), "--epochs", "2").exit_code == 0
    assert json.loads((run / "lora_run.json").read_text())["metrics"]["global_step"] == 2 * steps


def test_epochs_on_resume_lengthen_a_run_made_with_max_steps(workdir, tiny_model_dir, facts_file):
    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "3", "--save-steps", "3")).exit_code == 0
    # 32 rows in batches of 4: 8 steps an epoch; --epochs replaces the run's --max-steps 3
    result = invoke("train", "--resume", "--output-dir", str(run), "--epochs", "1")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "lora_run.json").read_text())
    assert record["metrics"]["global_step"] == 8 and record["config"]["training"]["max_steps"] == -1


def test_resume_refuses_an_end_before_the_checkpoint_it_resumes_from(workdir, tiny_model_dir, facts_file):
    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--save-steps", "6")).exit_code == 0
    # as a kill after the checkpoint at step 12 leaves it: checkpoints, no adapter, status "started"
    record = json.loads((run / "lora_run.json").read_text())
    (run / "lora_run.json").write_text(json.dumps({**record, "status": "started"}))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    before = snapshot(run)
    result = invoke("train", "--resume", "--output-dir", str(run), "--max-steps", "8")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "resumes from its checkpoint at step 12, past the end --max-steps 8 sets; pass a --max-steps above 12" \
        in result.output
    assert snapshot(run) == before and json.loads((run / "lora_run.json").read_text())["status"] == "started"
    # a checkpoint at the run's very end (killed while writing the adapter) resumes to a finished run
    result = invoke("train", "--resume", "--output-dir", str(run))
    assert result.exit_code == 0, result.output
    assert runs.is_finished(run) and json.loads((run / "lora_run.json").read_text())["metrics"]["global_step"] >= 12


def test_train_json_prints_only_the_manifest(workdir, tiny_model_dir, facts_file):
    result = runner.invoke(app, tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--json",
                                                "--eval-data", str(facts_file), "--eval-steps", "5"))
    assert result.exit_code == 0
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "finished"
    # run in this test's process, not a `lora` process of its own: no start-up figure to give
    assert manifest["metrics"]["seconds_to_first_step"] is None


def test_tokens_per_second_leave_the_evaluations_out(workdir, tiny_model_dir, facts_file):
    held_out = workdir / "held_out.jsonl"
    held_out.write_text(facts_file.read_text() * 25)  # evaluating then takes most of the run
    result = invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--eval-data", str(held_out),
                                     "--eval-steps", "2"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((workdir / "run" / "lora_run.json").read_text())["metrics"]
    log = [json.loads(line) for line in (workdir / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluating = sum(entry["eval_runtime"] for entry in log if "eval_runtime" in entry)
    assert evaluating > 0.5 * metrics["train_runtime_s"] and metrics["eval_seconds"] == pytest.approx(evaluating, abs=0.1)
    # the progress clock starts after the Trainer's setup, so leaving evaluation out can only be faster than this;
    # counting it in would be slower: the evaluations took longer than the setup
    training_only = metrics["tokens_seen"] / (metrics["train_runtime_s"] - evaluating)
    assert metrics["tokens_per_second"] >= 0.95 * training_only
    # the training log's running rate is the same figure, not the Trainer's own that counts the evaluations in
    logged = [entry["train_tokens_per_second"] for entry in log if "train_tokens_per_second" in entry][-1]
    assert logged == pytest.approx(metrics["tokens_per_second"], rel=0.25)
    assert f"s of it evaluating): 12 steps, {metrics['tokens_per_second']:.0f} tokens/s" in result.stderr


def test_generate_after_train_uses_runs_latest(workdir, tiny_model_dir, facts_file):
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run")).exit_code == 0
    result = runner.invoke(app, ["generate", "--prompt", "What is the capital of Veloria?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # an answer went to stdout


def test_eval_json_has_base_and_adapted_side_by_side(workdir, tiny_model_dir, facts_file, monkeypatch):
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run")).exit_code == 0
    result = runner.invoke(app, ["eval", "--data", str(facts_file), "--json", "--limit", "4", "--no-general"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 4 and report["left_out_rows"] == 0 and report["exact_match_rows"] == 4
    for side in ("base", "adapted"):
        assert set(report[side]) == {"loss", "perplexity", "exact_match"}
    assert report["adapted"]["loss"] < report["base"]["loss"]  # trained on these very rows

    # rows with nothing to score are left out as training leaves them out, and counted
    mixed = workdir / "mixed.jsonl"
    mixed.write_text(facts_file.read_text().splitlines()[0] + "\n" + json.dumps({"instruction": "a", "output": " "})
                     + "\n" + json.dumps({"instruction": "long " * 2000, "output": "b"}) + "\n")
    result = runner.invoke(app, ["eval", "--data", str(mixed), "--no-general"])
    assert result.exit_code == 0, result.output
    assert f"1 row of {mixed} (2 left out: blank responses, or responses cut away by the length limit)" in result.stdout
    # the long row's answer is still generated and matched: only its loss is cut away
    assert "(exact match over 2 rows: rows the length limit cuts from the losses are still answered" in result.stdout
    blank = workdir / "blank.jsonl"
    blank.write_text(json.dumps({"instruction": "a", "output": ""}) + "\n")
    result = runner.invoke(app, ["eval", "--data", str(blank), "--no-general"])
    assert result.exit_code == 2 and "no row has a response to score (blank, or cut away" in result.output

    # a --general file without text rows is refused before any model loads, with one line
    from lora_cli import adapters

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking --general")

    monkeypatch.setattr(adapters, "load_for_inference", no_loading)
    result = runner.invoke(app, ["eval", "--data", str(facts_file), "--general", str(facts_file)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"--general {facts_file} row 1 has no 'text'" in result.output
    # --format names the layout instead of detecting it, from a flag or from --config
    result = runner.invoke(app, ["eval", "--data", str(facts_file), "--format", "text"])
    assert result.exit_code == 2 and "--format text needs columns text" in result.output
    (workdir / "eval.yaml").write_text(f"data: {facts_file}\nformat: completion\nno-general: true\n")
    result = runner.invoke(app, ["eval", "--config", str(workdir / "eval.yaml")])
    assert result.exit_code == 2 and "--format completion needs columns prompt, completion" in result.output
    result = runner.invoke(app, ["eval", "--config", str(workdir / "eval.yaml"), "--format", "text"])
    assert result.exit_code == 2 and "--format text needs" in result.output  # the flag wins over the file


def test_info_describes_the_latest_run(workdir, tiny_model_dir, facts_file):
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run")).exit_code == 0
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert "r=4 alpha=8" in result.output and "32 examples (instruction, the chat template)" in result.output


def test_raw_text_runs_are_not_described_as_templated(workdir, tiny_model_dir):
    data = workdir / "pairs.jsonl"
    data.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 8)
    assert invoke(*tiny_train_args(tiny_model_dir, data, workdir / "run", "--max-steps", "1")).exit_code == 0
    assert "8 examples (completion, raw text (no template))" in invoke("info").output
    card = (workdir / "run" / "README.md").read_text()
    assert "format completion, raw text (no template); only response tokens trained" in card
    assert "the chat template" not in card


@pytest.mark.parametrize("args, message", [
    (["train", "--rank", "abc"], "error: Invalid value for '--rank'"),
    (["train", "--rnak", "4"], "error: No such option: --rnak"),
    (["bogus"], "error: No such command 'bogus'"),
])
def test_usage_errors_get_one_line_too(args, message):
    result = subprocess.run([sys.executable, "-m", "lora_cli", *args], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr


def test_help_is_instant_and_lists_every_command():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lora_cli", "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    for command in ("train", "merge", "generate", "eval", "estimate"):
        assert command in out.stdout
    # no torch or transformers at import: the whole interpreter start stays far below a heavy import (~6 s)
    assert elapsed < 3.0
    imported = subprocess.run([sys.executable, "-c", "import lora_cli.cli, sys; print('torch' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_tasks_without_the_eval_extra_says_how_to_install_it(workdir, tiny_model_dir, facts_file, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run")).exit_code == 0
    result = invoke("eval", "--tasks", "hellaswag")
    assert result.exit_code == 2 and 'pip install ".[eval]"' in result.output


def test_push_sends_the_adapter_and_never_the_checkpoints(workdir, tiny_model_dir, facts_file, monkeypatch):
    """The hub is out of reach here: a stand-in for HfApi records what upload_folder would select from
    the real run folder, with huggingface_hub's own pattern matching."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from lora_cli import hub

    out = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, out, "--save-steps", "5")).exit_code == 0
    assert any((out / "checkpoints").rglob("adapter_model.safetensors"))
    sent = {}

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            sent["private"] = kwargs.get("private")
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, allow_patterns=None, ignore_patterns=None):
            files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            sent["files"] = sorted(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                       ignore_patterns=ignore_patterns))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.push(out, "me/my-adapter", run=True) == "https://huggingface.co/me/my-adapter"
    assert sent["private"] is True
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_run.json", "tokenizer.json"} <= set(sent["files"])
    assert not [f for f in sent["files"] if f.startswith("checkpoints/") or f.startswith(".")], sent["files"]


def _empty_weights(run):
    (run / "adapter_model.safetensors").write_bytes(b"")


def _foreign_targets(run):
    config = json.loads((run / "adapter_config.json").read_text())
    config["target_modules"] = ["foo_proj"]
    (run / "adapter_config.json").write_text(json.dumps(config))


def _list_manifest(run):
    (run / "lora_run.json").write_text("[1, 2]")


DAMAGE = [
    (_empty_weights, ["generate", "eval", "merge", "info"], "adapter_model.safetensors is damaged"),
    (_foreign_targets, ["generate", "merge"], "foo_proj"),
    (_list_manifest, ["generate", "eval", "merge", "info"], "lora_run.json is damaged (not a JSON object)"),
]


@pytest.mark.parametrize("damage, commands, message", DAMAGE, ids=[d.__name__.strip("_") for d, _, _ in DAMAGE])
def test_a_damaged_run_gets_one_line_from_every_command(damage, commands, message, workdir, tiny_model_dir,
                                                        facts_file):
    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "2")).exit_code == 0
    damage(run)
    before = snapshot(workdir)
    for command in commands:
        args = {"generate": ["generate", "--adapter", str(run), "--prompt", "hi"],
                "eval": ["eval", "--adapter", str(run), "--data", str(facts_file), "--no-general"],
                "merge": ["merge", str(run), "--output-dir", str(workdir / "merged")],
                "info": ["info", str(run)]}[command]
        result = invoke(*args)
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("Merging ")]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (command, result.output)
        assert message in lines[0], (command, lines[0])
    assert snapshot(workdir) == before  # no merged folder, nothing of the run touched


def test_an_adapter_on_the_wrong_base_is_bad_input_for_every_command(workdir, tiny_model_dir, facts_file):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "2")).exit_code == 0
    narrow = workdir / "narrow"  # the tiny model's layout at half its width
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = config.hidden_size // 2, config.intermediate_size // 2
    LlamaForCausalLM(config).save_pretrained(narrow)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(narrow)
    before = snapshot(workdir)
    for args in (["merge", str(run), "--model", str(narrow), "--output-dir", str(workdir / "merged")],
                 ["generate", "--adapter", str(run), "--model", str(narrow), "--prompt", "hi"]):
        result = invoke(*args)
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("Merging ")]
        assert result.exit_code == 2 and len(lines) == 1 and "the base" in lines[0], (args[0], result.output)
    assert snapshot(workdir) == before


def test_an_adapter_is_not_applied_twice_and_a_dangling_latest_is_named(workdir, tiny_model_dir, facts_file):
    run = workdir / "run"
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "2")).exit_code == 0
    assert invoke("merge", str(run), "--output-dir", str(workdir / "merged"), "--no-check").exit_code == 0
    result = invoke("generate", "--model", str(workdir / "merged"), "--adapter", str(run), "--prompt", "hi")
    assert result.exit_code == 2 and "already holds the adapter" in result.output, result.output
    assert invoke("generate", "--model", str(workdir / "merged"), "--prompt", "hi", "--max-new-tokens", "2").exit_code == 0

    shutil.rmtree(run)  # runs/latest still points at it
    result = invoke("generate", "--prompt", "hi")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "latest points to" in result.output and "which no longer exists" in result.output


@pytest.fixture
def local_hub(monkeypatch):
    """A local HTTP server answering as the hub does: ids with "gated" are gated, ids with "missing" unknown."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            status, code = (403, "GatedRepo") if "gated" in self.path else \
                (404, "RepoNotFound") if "missing" in self.path else (200, None)
            body = json.dumps({"id": "org/x"} if code is None else {"error": code}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read from the environment at import
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yield
    server.shutdown()


def test_the_hubs_answers_for_models_and_datasets_become_one_line_each(local_hub):
    from lora_cli import data, models
    from lora_cli.errors import ConfigError, DataError, ModelError

    models.check_hub("org/there", "org/there", None)  # there: no error, transformers goes on to download it
    with pytest.raises(ModelError, match="'org/gated' is gated on the Hugging Face hub; accept its licence"):
        models.check_hub("org/gated", "org/gated", None)
    with pytest.raises(ModelError, match="'org/missing' was not found on the Hugging Face hub"):
        models.check_hub("org/missing", "org/missing", None)
    with pytest.raises(ConfigError, match="is neither a model folder, a hub id"):
        models.check_hub("my org/model", "my org/model", None)

    data._check_hub_dataset("org/there", "org/there", "--data")
    with pytest.raises(DataError, match="org/gated: the dataset is gated on the Hugging Face hub"):
        data._check_hub_dataset("org/gated", "org/gated", "--data")
    with pytest.raises(DataError, match="no such dataset on the Hugging Face hub"):
        data._check_hub_dataset("org/missing", "org/missing:test", "--eval-data")
    with pytest.raises(DataError, match="nor a valid hub dataset id"):
        data._check_hub_dataset("my org/data", "my org/data", "--data")


def test_an_unreachable_hub_dataset_fails_at_once_without_retries(workdir, tiny_model_dir):
    # No offline switch: the hub is asked, and answers nothing (a closed local port stands in for no network).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--model", str(tiny_model_dir),
                             "--data", "someorg/somedata"], capture_output=True, text=True, env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: --data someorg/somedata: no such local file or folder, and the Hugging "
                                    "Face hub cannot be reached"), result.stderr
    assert "Retrying" not in result.stderr and result.stderr.count("\n") == 1
    assert not (workdir / "runs").exists()


def test_a_run_trained_again_from_its_manifest_gives_the_same_adapter(workdir, tiny_model_dir, facts_file):
    import torch
    from safetensors.torch import load_file

    first = runner.invoke(app, tiny_train_args(tiny_model_dir, facts_file, workdir / "first", "--seed", "3"))
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", "--config", str(workdir / "first" / "lora_run.json"),
                                "--output-dir", str(workdir / "again")])
    assert again.exit_code == 0, again.output
    one, two = (load_file(workdir / run / "adapter_model.safetensors") for run in ("first", "again"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    recorded = [json.loads((workdir / run / "lora_run.json").read_text())["config"] for run in ("first", "again")]
    assert recorded[1] == {**recorded[0], "output_dir": str(workdir / "again")}


def test_the_off_flags_parse_and_no_overwrite_beats_a_recipes_overwrite(workdir, tiny_model_dir, facts_file):
    assert runner.invoke(app, tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--max-steps", "1")).exit_code == 0
    recipe = workdir / "r.yaml"
    recipe.write_text("overwrite: true\nmodel:\n  trust_remote_code: true\n  allow_pickle_weights: true\n")
    result = runner.invoke(app, [*tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--max-steps", "1"),
                                 "--config", str(recipe), "--no-overwrite", "--no-trust-remote-code",
                                 "--no-allow-pickle-weights"])
    assert result.exit_code == 2 and "already holds a finished run" in result.output, result.output


def test_the_eval_loss_training_records_is_the_per_token_mean_lora_eval_reports(workdir, tiny_model_dir, facts_file):
    """The Trainer averages batch means by rows, which weighs a token by how many share its batch; the
    recorded figure is the mean over every scored token, whatever --batch-size, as `lora eval` computes it."""
    held_out = workdir / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": "Say it " + "again " * (i % 5 * 6), "output": "ok " * (1 + i % 7)})
                                + "\n" for i in range(11)))
    recorded = []
    for batch in ("4", "8"):
        result = invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / f"b{batch}", "--max-steps", "2",
                                         "--eval-data", str(held_out), "--eval-steps", "2", "--batch-size", batch,
                                         "--max-seq-len", "64", "--lr", "1e-9"))
        assert result.exit_code == 0, result.output
        manifest = json.loads((workdir / f"b{batch}" / "lora_run.json").read_text())
        recorded.append(manifest["metrics"]["eval_loss"])
    report = json.loads(invoke("eval", "--adapter", str(workdir / "b8"), "--data", str(held_out), "--json",
                               "--no-general").stdout)
    # cut at the run's --max-seq-len 64, as training scored them (at 1024 all 11 rows would be scored)
    assert report["rows"] == manifest["data"]["eval_examples"] and report["left_out_rows"] > 0
    assert recorded[0] == pytest.approx(recorded[1], rel=1e-6)  # a learning rate of 1e-9 leaves the adapter as drawn
    assert recorded[1] == pytest.approx(report["adapted"]["loss"], rel=1e-5)


def test_eval_of_a_merged_folder_names_the_command_that_compares_it(workdir, tiny_model_dir, facts_file):
    assert invoke(*tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--max-steps", "2")).exit_code == 0
    assert invoke("merge", str(workdir / "run")).exit_code == 0
    for extra in ([], ["--adapter", str(workdir / "run")]):
        result = invoke("eval", "--model", str(workdir / "run" / "merged"), *extra, "--no-general")
        assert result.exit_code == 2, result.output
        assert f"`lora eval --adapter {(workdir / 'run').resolve()}` compares that base with the adapter" in result.output
