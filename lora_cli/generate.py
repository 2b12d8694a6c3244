"""`lora generate`: text from base + adapter or from a merged folder, streamed as it comes.

Only generated text goes to stdout, so answers can be piped; everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from lora_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # transformers refuses these only inside generate(), which for a streamed answer runs in a thread
        if not self.repetition_penalty > 0 or not math.isfinite(self.repetition_penalty):
            raise ConfigError(f"--repetition-penalty must be a finite number above 0 (1 = no penalty), "
                              f"got {self.repetition_penalty}")
        if not math.isfinite(self.temperature):  # inf would sample uniformly, whatever the model says
            raise ConfigError(f"--temperature must be a finite number (0 = greedy), got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be an integer from 0 to 2**32 - 1, got {self.seed}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None,
                "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}


def uses_raw_prompts(loaded: Any) -> bool:
    """Runs trained on plain text or prompt/completion pairs continue the text as given, with no template."""
    from lora_cli.data import RAW_FORMATS

    return loaded.data_format in RAW_FORMATS


def prompt_text(loaded: Any, history: list[dict[str, str]], raw: bool) -> str:
    if raw or uses_raw_prompts(loaded):
        from lora_cli.data import with_input

        return loaded.renderer.continuation(with_input(history[-1]))
    return loaded.renderer.prompt(history)


def generate_one(loaded: Any, text: str, sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 adapter: bool = True) -> str:
    """Generate a continuation of `text`; `on_text` receives pieces as they are decoded (streaming)."""
    import torch
    from transformers import TextIteratorStreamer

    tok = loaded.tokenizer
    inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    kwargs = {**inputs, **sampling.generate_kwargs(), "pad_token_id": tok.pad_token_id,
              "eos_token_id": stop_ids(loaded)}
    streamer = None
    if on_text is not None:
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs["streamer"] = streamer
    disable = getattr(loaded.model, "disable_adapter", None) if not adapter and loaded.adapter_dir else None
    with torch.no_grad(), (disable() if disable else contextlib.nullcontext()):
        if streamer is None:
            out = loaded.model.generate(**kwargs)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        import threading

        pieces: list[str] = []
        failures: list[BaseException] = []

        def run() -> None:
            try:
                loaded.model.generate(**kwargs)
            except BaseException as exc:  # handed to the caller's thread below, which would otherwise wait forever
                failures.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            pieces.append(piece)
            on_text(piece)
        worker.join()
        if failures:
            raise failures[0]
        return "".join(pieces)


def stop_ids(loaded: Any) -> list[int]:
    """EOS of the tokenizer and of the model's generation config: chat models often end turns with another id."""
    ids = {loaded.tokenizer.eos_token_id}
    config_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def opening(system: str | None) -> list[dict[str, str]]:
    """The messages a conversation starts with: the system prompt, when one is given (a blank one is left
    out, as training leaves it out)."""
    return [{"role": "system", "content": system}] if system and system.strip() else []


def stream_answer(loaded: Any, prompt: str, sampling: Sampling, raw: bool, out: TextIO | None = None,
                  adapter: bool = True, system: str | None = None) -> str:
    """Stream one answer to `out` (default: the current stdout), ending with a newline."""
    out = out or sys.stdout
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    messages = [*opening(system), {"role": "user", "content": prompt}]
    answer = generate_one(loaded, prompt_text(loaded, messages, raw), sampling, write, adapter)
    out.write("\n")
    return answer


def compare(loaded: Any, prompt: str, sampling: Sampling, raw: bool, out: TextIO | None = None,
            system: str | None = None) -> dict[str, str]:
    """The same prompt through the base (adapter disabled) and the adapted model."""
    out = out or sys.stdout
    text = prompt_text(loaded, [*opening(system), {"role": "user", "content": prompt}], raw)
    answers = {"base": generate_one(loaded, text, sampling, adapter=False),
               "adapted": generate_one(loaded, text, sampling, adapter=True)}
    for name, answer in answers.items():
        out.write(f"[{name}] {answer.strip()}\n")
    return answers


def ask(prompt: str) -> str:
    """input() with its prompt on stderr (stdout carries only generated text), keeping line editing."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def interactive(loaded: Any, sampling: Sampling, raw: bool, read: Callable[[str], str] = ask,
                system: str | None = None) -> None:
    """A chat that keeps its history; an empty line or EOF ends it."""
    history: list[dict[str, str]] = opening(system)
    while True:
        try:
            message = read("> ")
        except EOFError:
            break
        if not message.strip():
            break
        history.append({"role": "user", "content": message})
        answer = generate_one(loaded, prompt_text(loaded, history, raw), sampling,
                              lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})


def question(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A --prompts-file row as the messages training would have rendered before the answer: its system
    prompt, if it has one, then the user message with its input kept apart."""
    from lora_cli.data import to_messages

    prompt = row.get("prompt") or row.get("instruction")
    if not prompt:
        raise DataError(f"{where}: needs a 'prompt' or 'instruction' field")
    # an instruction row, as training read it, without the answer it has yet to get
    return to_messages({**row, "instruction": prompt, "output": None}, "instruction", where)[:-1]


def batch(loaded: Any, prompts_file: Path, output: Path, sampling: Sampling, raw: bool,
          system: str | None = None) -> int:
    """Answer every prompt of a JSONL file ({"prompt": ...} or {"instruction": ...}); returns how many.
    `system` is the system prompt of rows that have none of their own.

    Each answer is written to `<output>.partial` as soon as it is made, and the file becomes `output` only
    when every row is answered. The same command run again after an interruption keeps the answers
    already made for the same rows and goes on from there."""
    from lora_cli.data import read_rows

    rows, _ = read_rows(str(prompts_file), flag="--prompts-file")
    partial = partial_answers(output)
    kept = answered_before(partial, rows)
    if kept:
        log.info("%d of %d prompts were answered before (%s): going on from row %d", len(kept), len(rows),
                 partial, len(kept) + 1)
    with open(partial, "w", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in kept)  # rewritten: a line cut off by the interruption goes
        out.flush()
        done = len(kept)
        try:
            for number, row in enumerate(rows[done:], start=done + 1):
                asked = question({"system": system, **row} if system and row.get("system") is None else row,
                                 f"{prompts_file} row {number}")
                answer = generate_one(loaded, prompt_text(loaded, asked, raw), sampling)
                out.write(json.dumps({**row, "response": answer.strip()}, ensure_ascii=False) + "\n")
                out.flush()
                done = number
        except KeyboardInterrupt:
            log.warning("%d of %d prompts answered, kept in %s; the same command again goes on from there",
                        done, len(rows), shlex.quote(str(partial)))
            raise
    os.replace(partial, output)
    return len(rows)


def partial_answers(output: Path) -> Path:
    """Where `batch` keeps the answers made so far."""
    return output.with_name(output.name + ".partial")


def answered_before(partial: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The lines of an earlier, interrupted `batch` that answer the first rows of `rows`, in order: each the
    row itself plus its response. Nothing when the file is missing or was made for other prompts."""
    if not partial.is_file():
        return []
    kept = []
    for line, row in zip(partial.read_text(encoding="utf-8", errors="replace").splitlines(), rows):
        try:
            answered = json.loads(line)
        except ValueError:
            break  # the line the interruption cut off
        if not isinstance(answered, dict) or {k: v for k, v in answered.items() if k != "response"} != row \
                or not isinstance(answered.get("response"), str):
            break  # from here on the prompts are not the ones answered then
        kept.append(line)
    return kept
