"""Training data: read files or hub datasets, detect the row format, render prompts, tokenize, mask labels.

Every row becomes one text plus the character ranges the loss covers. Tokenizing that text once with
offsets and labelling the tokens that start inside a trained range gives masks that are exact for any
template, without the boundary drift of tokenizing prompt and response separately.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lora_cli import hub
from lora_cli.errors import DataError, LoraError, first_line

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value the loss skips
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ASSETS = resources.files("lora_cli") / "assets"


def default_data_path(split: str = "train") -> Path:
    """The embedded dataset: invented facts the base model cannot know (see assets/data/README.md)."""
    return Path(str(ASSETS / "data" / f"default_{split}.jsonl"))


# ---------------------------------------------------------------- reading


# What `datasets.save_to_disk` and the hub put beside the data: never rows.
METADATA_FILES = {"dataset_info.json", "dataset_dict.json", "state.json"}
HELD_OUT_SPLITS = ("test", "validation")  # where --eval-data and `lora eval` look, in that order


def _files_of(path: Path, split: str, flag: str) -> list[Path]:
    """The data files of a file or folder. In a folder whose file or folder names name a held-out split
    (test.jsonl, validation/, dev.csv: the names `datasets` recognises), "train" reads every file but
    those, and "eval" reads the test files, else the validation files, else the whole folder."""
    if not path.is_dir():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"{flag} {path}: unsupported file type '{path.suffix}'; use JSONL, JSON, CSV or Parquet")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file()
                   and p.name not in METADATA_FILES and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{flag} folder {path} holds no {', '.join(FILE_SUFFIXES)} files")
    named = _split_files(path, files)
    held_out = {f for name in HELD_OUT_SPLITS for f in named.get(name, [])}
    if split == "train":  # everything but the held-out files: shards and other names stay training data
        chosen = [f for f in files if f not in held_out]
    else:  # the test files, else the validation files, else the whole folder
        chosen = next((named[name] for name in HELD_OUT_SPLITS if named.get(name)), files)
    if not chosen:
        raise DataError(f"{flag} folder {path} holds only held-out files ({', '.join(sorted(named))}); "
                        "name the training file itself, or add one named train")
    if len(chosen) < len(files):
        left = [f.relative_to(path).as_posix() for f in files if f not in chosen]
        log.info("%s %s: reading %d of its %d files; left out by their split names: %s", flag, path, len(chosen),
                 len(files), ", ".join(left[:5]) + (", ..." if len(left) > 5 else ""))
    return chosen


def _split_files(folder: Path, files: list[Path]) -> dict[str, list[Path]]:
    """{split: files} as `datasets` reads split names from file and folder names; {} when none is named."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        if list(patterns) == ["train"] and patterns["train"] == ["**"]:  # the default: no split is named
            return {}
        resolved = DataFilesDict.from_local_or_remote(patterns, base_path=str(folder))
    except Exception:  # datasets finds no data where we do (files under _x/ or .x/): no split names then
        return {}
    named = {}
    for split, found in resolved.items():
        found = {Path(f).resolve() for f in found}
        named[str(split)] = [f for f in files if f.resolve() in found]
    return {split: found for split, found in named.items() if found}


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark, as some editors write, is not data
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" is JSON Lines in a .json file: read it line by line below
                raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        else:
            return _rows_of(whole, path)
    rows = []
    # "\n" only: splitlines() would also cut at U+2028 and the like, which JSON strings may hold unescaped
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix or remove that row") from None
        if not isinstance(rows[-1], dict):
            raise DataError(f"{path}: line {number} is not a JSON object; each line must be one row like "
                            '{"instruction": ..., "output": ...}')
    return rows


def _rows_of(whole: Any, path: Path) -> list[dict[str, Any]]:
    """The rows of a whole JSON document: a list of objects, an object holding one such list (as in
    {"data": [...]}), or a single object (one row)."""
    if isinstance(whole, dict):
        if any(set(columns) <= set(whole) for columns in FORMAT_COLUMNS.values()):
            return [whole]  # one row, such as {"messages": [...]}
        lists = [value for value in whole.values() if isinstance(value, list) and value
                 and all(isinstance(item, dict) for item in value)]
        if len(lists) == 1:
            return lists[0]
        if lists:
            keys = ", ".join(key for key, value in whole.items() if any(value is found for found in lists))
            raise DataError(f"{path}: the object holds several lists of rows ({keys}); keep one list per file")
        return [whole]
    if not isinstance(whole, list) or not all(isinstance(r, dict) for r in whole):
        raise DataError(f"{path}: expected a list of JSON objects (rows)")
    return whole


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                return [dict(r) for r in csv.DictReader(f)]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    except Exception as exc:  # pyarrow raises its own error types for broken files
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be parsed as {suffix[1:]} ({type(exc).__name__})") from None


def read_rows(spec: str | None, split: str = "train", flag: str = "--data") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows from a file, a folder of files, the embedded default, or a `datasets` hub id; plus their identity.

    `split` is "train", or "eval" for held-out rows: a folder's test or validation files, a hub
    dataset's test or validation split (`ID:SPLIT` names one). `flag` is the option that named them,
    for the messages. With several files, identity["file_rows"] counts each file's rows, so that a
    message can name the file a row came from (`row_name`)."""
    path = Path(spec).expanduser() if spec else default_data_path(split if split == "train" else "heldout")
    if path.exists():
        files = _files_of(path, split, flag)
        per_file = [_read_file(f) for f in files]
        rows = [row for found in per_file for row in found]
        # one file: the sha256 of its bytes, which `sha256sum` shows; a folder's: its files' names and bytes
        digest = hashlib.sha256()
        for f in files:
            if len(files) > 1:
                digest.update(f.name.encode())
            digest.update(f.read_bytes())
        identity = {"source": str(spec or "embedded:" + path.name), "files": [str(f) for f in files],
                    "sha256": digest.hexdigest()}
        if len(files) > 1:
            identity["file_rows"] = [len(found) for found in per_file]
    elif spec and _looks_like_hub_id(spec):
        rows, identity = _read_hub(spec, split, flag)
    else:
        raise DataError(f"{flag} {spec}: no such file or folder (nor a hub dataset id like 'org/name')")
    if not rows:
        raise DataError(f"{flag} {spec or path}: no rows found")
    identity["rows"] = len(rows)
    return rows, identity


def row_name(source: str, number: int, identity: dict[str, Any] | None = None) -> str:
    """'SOURCE row N', or with several files 'SOURCE, FILE row N' counting within that file."""
    counts = (identity or {}).get("file_rows")
    if counts:
        for file, count in zip(identity["files"], counts):
            if number <= count:
                return f"{source}, {Path(file).name} row {number}"
            number -= count
    return f"{source} row {number}"


def _looks_like_hub_id(spec: str) -> bool:
    """org/name or org/name:split, not a missing data/file.jsonl or ./folder."""
    name = spec.split(":", 1)[0]
    return name.count("/") == 1 and not spec.startswith((".", "/", "~")) and Path(name).suffix.lower() not in FILE_SUFFIXES


def _check_hub_dataset(name: str, spec: str, flag: str) -> None:
    """One quick look at the hub before `datasets` asks it: with no network, datasets retries for half a
    minute before it gives up. A dataset already in the local caches is left to datasets."""
    from huggingface_hub import constants

    import datasets

    if not hub.is_repo_id(name):
        raise DataError(f"{flag} {spec}: no such local file or folder, nor a valid hub dataset id (org/name); "
                        "check the path")
    folder = name.replace("/", "--")
    cached = (Path(constants.HF_HUB_CACHE) / f"datasets--{folder}").is_dir() or \
        (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir()
    if cached or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    answer = hub.ask(name, "dataset")
    if answer == hub.GATED:
        raise DataError(f"{flag} {spec}: the dataset is gated on the Hugging Face hub; accept its terms on the hub "
                        "and log in with `hf auth login`, or pass a local file")
    if answer == hub.NOT_FOUND:
        raise DataError(f"{flag} {spec}: no such local file or folder, and no such dataset on the Hugging Face hub "
                        "(unknown id, or private); check the path or the id")
    if answer:  # the machine, not the input
        raise LoraError(f"{flag} {spec}: no such local file or folder, and the Hugging Face hub cannot be reached "
                        f"to load it as a dataset ({answer}); check your network, or pass a local file")


def _read_hub(spec: str, split: str, flag: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A hub dataset `ID` or `ID:SPLIT`; without a split, "train" for training, else test or validation."""
    import datasets

    name, _, asked = spec.partition(":")
    _check_hub_dataset(name, spec, flag)
    try:
        splits = [asked] if asked else datasets.get_dataset_split_names(name)
        wanted = [asked] if asked else ["train"] if split == "train" else list(HELD_OUT_SPLITS)
        chosen = next((candidate for candidate in wanted if candidate in splits), None)
        loaded = datasets.load_dataset(name, split=chosen) if chosen else None
    except Exception as exc:  # datasets wraps network and lookup failures in many types
        offline = next((v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v) == "1"), None)
        if offline:  # the machine, not the input: exit status 1, as for a model the hub cannot give
            raise LoraError(f"{flag} {spec}: no such local file or folder, and {offline}=1 forbids downloading it "
                            "as a hub dataset; unset it or pass a local file") from None
        raise DataError(f"{flag} {spec}: no such local file or folder, and it cannot be loaded as a hub dataset "
                        f"({type(exc).__name__}); check the path, the id (and split) and your network") from None
    if loaded is None:
        raise DataError(f"{flag} {spec}: the dataset has the splits {', '.join(splits)} but no {' or '.join(wanted)}; "
                        f"name one as {name}:SPLIT")
    return loaded.to_list(), {"source": spec, "split": chosen, "fingerprint": loaded._fingerprint}


# ---------------------------------------------------------------- formats

FORMAT_COLUMNS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant"}


def detect_format(rows: list[dict[str, Any]], requested: str = "auto", source: str = "the data",
                  identity: dict[str, Any] | None = None) -> str:
    """The row layout, named by the user or found from the columns of the first row; then every row is
    checked to have that layout's columns, so that a stray row fails here, by its number."""
    columns = set(rows[0])
    if requested != "auto":
        needed = FORMAT_COLUMNS[requested]
        if not set(needed) <= columns:
            raise DataError(f"--format {requested} needs columns {', '.join(needed)}; {source} has "
                            + ", ".join(sorted(columns)))
        fmt = requested
    else:
        fmt = next((name for name, needed in FORMAT_COLUMNS.items() if set(needed) <= columns), "")
        if not fmt:
            known = "; ".join(f"{n}: {'+'.join(c)}" for n, c in FORMAT_COLUMNS.items())
            raise DataError(f"cannot tell the data format of {source} from columns "
                            f"{', '.join(sorted(columns)) or '(none)'}; known formats are {known}")
    check_rows(rows, fmt, source, identity)
    return fmt


# Formats whose rows are trained as raw text: no template renders them.
RAW_FORMATS = ("completion", "text")


def describe_rendering(fmt: str, template: str) -> str:
    """How rows of this format were turned into text, for the run's summaries and its card."""
    return "raw text (no template)" if fmt in RAW_FORMATS else f"the {template} template"


# The column a row learns from, per format: a blank one would teach the model to answer with nothing.
RESPONSE_COLUMN = {"instruction": "output", "completion": "completion", "text": "text"}


def check_rows(rows: list[dict[str, Any]], fmt: str, source: str, identity: dict[str, Any] | None = None) -> None:
    """Every row holds the format's columns, none of them null (or a missing CSV cell), and text where
    text goes: a list or an object there would otherwise be trained on as its Python spelling."""
    needed = FORMAT_COLUMNS[fmt]
    for number, row in enumerate(rows, start=1):
        for column in needed:
            if row.get(column) is None:
                state = "an empty" if column in row else "no"
                raise DataError(f"{row_name(source, number, identity)} has {state} '{column}' (its columns: "
                                f"{', '.join(sorted(row)) or 'none'}); every {fmt} row needs "
                                f"{' and '.join(needed)}: fix or remove that row")
        for where, value in _text_cells(row, fmt):
            if not is_text(value):
                shown = json.dumps(value, default=str)
                raise DataError(f"{row_name(source, number, identity)} has {type(value).__name__} "
                                f"{shown[:60] + ('...' if len(shown) > 60 else '')} in {where}, where text belongs "
                                "(a string, or a list of {\"type\": \"text\"} parts): fix or remove that row")


def _text_cells(row: dict[str, Any], fmt: str) -> list[tuple[str, Any]]:
    """(where, value) of every cell of a row that is rendered as text."""
    if fmt in ("chat", "sharegpt"):
        key = "content" if fmt == "chat" else "value"
        turns = row[FORMAT_COLUMNS[fmt][0]]
        return [(f"'{FORMAT_COLUMNS[fmt][0]}' turn {i}", turn[key]) for i, turn in enumerate(turns, start=1)
                if isinstance(turn, dict) and key in turn] if isinstance(turns, list) else []
    optional = ("input", "system") if fmt == "instruction" else ()
    return [(f"'{column}'", row[column]) for column in FORMAT_COLUMNS[fmt] + optional if column in row]


def is_text(value: Any) -> bool:
    """Whether a cell reads as text: a string, a number or true/false, nothing, or a list of text parts
    (the content of a chat message in OpenAI's format)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in value)


def is_blank(row: dict[str, Any], fmt: str) -> bool:
    """A row with nothing to learn: a blank response, or a conversation whose assistant turns are all blank
    (hub corpora hold empty text rows, for one)."""
    column = RESPONSE_COLUMN.get(fmt)
    if column is not None:
        return not text_of(row[column]).strip()
    try:
        messages = to_messages(row, fmt, "")
    except DataError:
        return False  # malformed: rendering names the row
    messages = messages or []
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    tool_calls = any(m.get("tool_calls") for m in messages)  # a call is something to learn, with no text
    return bool(answers) and not tool_calls and not any(answer.strip() for answer in answers)


def with_input(message: dict[str, str]) -> str:
    """A message's text with an instruction row's `input` after it, where a template has no place of its own
    for the input (chat templates, raw prompts)."""
    return message["content"] + ("\n\n" + message["input"] if message.get("input") else "")


def text_of(value: Any) -> str:
    """A cell as text: null is empty, text parts are joined in order, true and false are spelled as in the
    JSON they came from (not Python's True), anything else (0 is an answer too) is its string. check_rows
    has made sure nothing else is here."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "".join(part["text"] for part in value)
    return str(value)


# Keys of a chat message that templates with tool use render, kept beside role and content.
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")


def _tool_value(key: str, value: Any) -> Any:
    """Tool calls as chat templates take them: OpenAI's format gives a call's arguments as a JSON string,
    which templates would encode a second time; they expect the object."""
    if key != "tool_calls" or not isinstance(value, list):
        return value
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = None
            if isinstance(arguments, dict):
                call = {**call, "function": {**function, "arguments": arguments}}
        calls.append(call)
    return calls


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, Any]] | None:
    """A row as chat messages (None for plain text and prompt/completion rows).

    A blank system turn is left out in every format: rendered, it would replace the template's default
    system prompt in training but not at generation time."""
    if fmt == "instruction":
        user = {"role": "user", "content": text_of(row["instruction"])}
        if row.get("input"):
            user["input"] = text_of(row["input"])
        messages = [{"role": "system", "content": text_of(row.get("system"))}, user,
                    {"role": "assistant", "content": text_of(row["output"])}]
    elif fmt == "chat":
        raw = row["messages"]
        if not isinstance(raw, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in raw):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        # the ShareGPT names of the roles (gpt, human, bot, model) mean what they mean there; other roles
        # (tool, ...) go to the template as they are
        messages = [{"role": SHAREGPT_ROLES.get(str(m["role"]).lower(), str(m["role"])), "content": text_of(m["content"]),
                     **{key: _tool_value(key, m[key]) for key in TOOL_KEYS if m.get(key)}} for m in raw]
    elif fmt == "sharegpt":
        raw = row["conversations"]
        try:
            messages = [{"role": SHAREGPT_ROLES[str(m["from"]).lower()], "content": text_of(m["value"])} for m in raw]
        except (KeyError, TypeError):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects with from in "
                            + ", ".join(SHAREGPT_ROLES)) from None
    else:
        return None
    return [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]


# ---------------------------------------------------------------- rendering


class _NotIncremental(Exception):
    """A chat template whose rendering of a conversation's start changes once more turns follow."""


@dataclass
class Rendered:
    """One example as text, with the character ranges whose tokens are trained."""

    text: str
    trained: list[tuple[int, int]]


def load_alpaca_template() -> dict[str, str]:
    return json.loads((ASSETS / "templates" / "alpaca.json").read_text(encoding="utf-8"))


class Renderer:
    """Turns rows into `Rendered` texts with one template: the tokenizer's chat template or Alpaca."""

    def __init__(self, tokenizer: Any, template: str = "auto"):
        self.tokenizer = tokenizer
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise DataError("--template chat: this tokenizer has no chat template; use --template alpaca")
        self.template = "chat" if (template == "chat" or (template == "auto" and has_chat)) else "alpaca"
        self.alpaca = load_alpaca_template()
        self.eos = tokenizer.eos_token or ""
        # Prepend BOS ourselves where the tokenizer would, so that texts are tokenized without special tokens.
        probe = tokenizer("a")["input_ids"]
        self.bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else ""
        self.special = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)

    def render(self, row: dict[str, Any], fmt: str, where: str) -> Rendered:
        if fmt == "text":
            body = text_of(row["text"])
            return Rendered(self.bos + body + self.eos, [(len(self.bos), len(self.bos) + len(body) + len(self.eos))])
        if fmt == "completion":
            prompt = self.bos + text_of(row["prompt"])
            answer = text_of(row["completion"]) + self.eos
            return Rendered(prompt + answer, [(len(prompt), len(prompt) + len(answer))])
        messages = to_messages(row, fmt, where)
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if not roles or roles[0] != "user" or "assistant" not in roles:
            raise DataError(f"{where}: a conversation must start with a user turn and hold an assistant turn")
        if self.template == "chat":
            try:
                return self._render_chat(messages, where)
            except DataError:
                raise
            except Exception as exc:  # the template's own refusal (jinja2's TemplateError, or a raise_exception)
                raise DataError(f"{where}: the chat template cannot render this conversation ({first_line(exc)})"
                                ) from exc
        other = sorted({m["role"] for m in messages} - {"system", "user", "assistant"})
        if other or any(m.get("tool_calls") for m in messages):
            raise DataError(f"{where}: tool turns ({', '.join(other) or 'tool_calls'}) need a chat template, and the "
                            "Alpaca template has no place for them; use a tokenizer with a chat template, or "
                            "leave these rows out")
        return self._render_alpaca(messages)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text a model continues from at generation time: what training put before a response."""
        if self.template == "chat":
            return self._apply(messages, add_generation_prompt=True)
        return self._alpaca_parts(messages)[0]  # the user part ends with the response header

    def continuation(self, text: str) -> str:
        """A raw prompt (plain text, prompt/completion) as training began such rows: after the BOS, if any."""
        return self.bos + text

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        plain = [{"role": m["role"], "content": with_input(m), **{key: m[key] for key in TOOL_KEYS if key in m}}
                 for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _render_chat(self, messages: list[dict[str, str]], where: str) -> Rendered:
        try:
            return self._render_turn_by_turn(messages)
        except _NotIncremental:
            return self._render_whole(messages, where)

    def _render_turn_by_turn(self, messages: list[dict[str, str]]) -> Rendered:
        # Render the conversation turn by turn: each assistant turn is what the full rendering adds
        # after the generation prompt. It is trained up to and including the last special token it
        # holds (the end-of-turn / EOS), and the template's trailing newline after that is not.
        trained: list[tuple[int, int]] = []
        text = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._apply(messages[:i], add_generation_prompt=True)
                full = self._apply(messages[: i + 1])
                if not (prompt.startswith(text) and full.startswith(prompt)):
                    raise _NotIncremental
                segment = full[len(prompt):]
                end = self._end_of_turn(segment)
                if end is None:  # the template closes turns without EOS: add it so the model learns to stop
                    full = full[: len(prompt) + len(segment.rstrip())] + self.eos + segment[len(segment.rstrip()):]
                    end = len(segment.rstrip()) + len(self.eos)
                if self._answers(message, segment[:end]):
                    trained.append((len(prompt), len(prompt) + end))
                text = full
            else:
                full = self._apply(messages[: i + 1])
                if not full.startswith(text):
                    raise _NotIncremental
                text = full
        return Rendered(text, trained)

    def _render_whole(self, messages: list[dict[str, str]], where: str) -> Rendered:
        """A template that renders a turn one way while it is the last and another once a later turn
        follows (Qwen3 gives the last answer a <think> block and drops reasoning from earlier ones)
        cannot be rendered turn by turn. The conversation is then rendered once, as the template
        shows it whole, and each answer is trained from its generation prompt through the token that
        closes it (as TRL's assistant-only loss does with a whole rendering)."""
        text = self._apply(messages)
        trained: list[tuple[int, int]] = []
        last_end = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], add_generation_prompt=True)
            alone = self._apply(messages[: i + 1])[len(prompt):]  # the answer as the template closes a last turn
            end = self._end_of_turn(alone)
            close = next((t for t in self.special if end is not None and alone[:end].endswith(t)), None)
            start = len(prompt)
            stop = text.find(close, start) if close and text.startswith(prompt) and start >= last_end else -1
            if stop < 0:  # no prompt-then-closing-token shape to find the answer by
                raise DataError(f"{where}: this chat template does not render turns incrementally; "
                                "use --template alpaca")
            last_end = stop + len(close)
            if self._answers(message, text[start:last_end]):
                trained.append((start, last_end))
        return Rendered(text, trained)

    def _answers(self, message: dict[str, Any], rendered: str) -> bool:
        """Whether an assistant turn is something to learn. A blank turn, or a tool call this template
        does not show, is context: training it would teach the model to end its turn at once (also
        where the template dresses the turn up, as Qwen3's empty <think> block does)."""
        said = message["content"].strip() or message.get("tool_calls")
        return bool(said) and bool(self._strip_special(rendered).strip())

    def _strip_special(self, text: str) -> str:
        for token in self.special:
            text = text.replace(token, "")
        return text

    def _end_of_turn(self, segment: str) -> int | None:
        """Where the last special token of an assistant segment ends, or None if it holds none."""
        best = None
        for token in self.special:
            pos = segment.rfind(token)
            if pos >= 0 and (best is None or pos + len(token) > best):
                best = pos + len(token)
        return best

    def _alpaca_parts(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        text, trained = self.bos, []
        system = " ".join(m["content"] for m in messages if m["role"] == "system")
        first = True
        for message in messages:
            if message["role"] == "user":
                if first:
                    key = "prompt_input" if message.get("input") else "prompt_no_input"
                    part = self.alpaca[key].format(instruction=message["content"], input=message.get("input", ""))
                    text += (system + "\n\n" if system else "") + part
                    first = False
                else:
                    text += self.alpaca["next_turn"].format(instruction=message["content"])
            elif message["role"] == "assistant":
                start = len(text)
                text += message["content"] + self.eos
                if message["content"].strip():  # a blank answer is context, not something to learn
                    trained.append((start, len(text)))
        return text, trained

    def _render_alpaca(self, messages: list[dict[str, str]]) -> Rendered:
        text, trained = self._alpaca_parts(messages)
        return Rendered(text, trained)


# ---------------------------------------------------------------- tokenizing


def tokenize(rendered: Rendered, tokenizer: Any, max_seq_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    """Token ids and labels; a token is trained when its first character lies in a trained range."""
    return _labelled(rendered, tokenizer, _encode(rendered, tokenizer), max_seq_len, train_on_inputs)


def _encode(rendered: Rendered, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _labelled(rendered: Rendered, tokenizer: Any, encoded: tuple[list[int], list[tuple[int, int]]],
              max_seq_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    ids, offsets = encoded
    if not train_on_inputs:
        ids, offsets = _split_at_answer_starts(rendered, tokenizer, ids, offsets)
    ids = ids[:max_seq_len]
    response = [any(s <= start < e for s, e in rendered.trained) for start, _end in offsets[:len(ids)]]
    if train_on_inputs:
        # the prompt is trained too, but not a prompt whose response --max-seq-len cut away: nothing
        # labelled, the row is dropped and counted as every such row is
        labels = list(ids) if any(response[1:]) else [IGNORE_INDEX] * len(ids)
    else:
        labels = [tok if trained else IGNORE_INDEX for tok, trained in zip(ids, response)]
    return {"input_ids": ids, "labels": labels}


def _split_at_answer_starts(rendered: Rendered, tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]]
                            ) -> tuple[list[int], list[tuple[int, int]]]:
    """A token that begins in the prompt and runs into an answer (a completion prompt ending in a space,
    which byte-level tokenizers join to the answer's first word) would keep that word from ever being
    trained, and give training prompt tokens that generation, tokenizing the prompt alone, never feeds.
    Such a token is re-tokenized as its prompt part and its answer part, the rest left as the whole text
    has it; where that does not spell the same text (a tokenizer that puts a space before every piece),
    the whole-text tokens stay and the straddling token is trained instead."""
    starts = {start for start, _ in rendered.trained} - {0}
    straddling = {i: b for i, (s, e) in enumerate(offsets) for b in starts if s < b < e}
    if not straddling:
        return ids, offsets
    new_ids: list[int] = []
    new_offsets: list[tuple[int, int]] = []
    for i, (token, (s, e)) in enumerate(zip(ids, offsets)):
        if i not in straddling:
            new_ids.append(token)
            new_offsets.append((s, e))
            continue
        for a, z in ((s, straddling[i]), (straddling[i], e)):
            piece = tokenizer(rendered.text[a:z], add_special_tokens=False, return_offsets_mapping=True)
            new_ids += piece["input_ids"]
            new_offsets += [(a + ps, a + pe) for ps, pe in piece["offset_mapping"]]
    if tokenizer.decode(new_ids) == tokenizer.decode(ids):
        return new_ids, new_offsets
    # the straddling token starts in the prompt: moving its start onto the answer gets it trained
    return ids, [(straddling[i], e) if i in straddling else (s, e) for i, (s, e) in enumerate(offsets)]


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any | None
    format: str
    template: str
    identity: dict[str, Any]
    dropped: int  # rows with no trained token left after truncation


def tokenize_rows(rows: list[dict[str, Any]], fmt: str, renderer: Renderer, max_seq_len: int,
                  train_on_inputs: bool, source: str, identity: dict[str, Any] | None = None,
                  scored: list[dict[str, list[int]]] | None = None) -> tuple[list[dict[str, list[int]]], int]:
    """The rows that have something to learn, tokenized and labelled, and how many were dropped.

    `scored`, when given, receives each kept row labelled on its responses only (how evaluations
    score), in the same order: rendered and encoded once for both."""
    examples, dropped = [], 0
    for number, row in enumerate(rows, start=1):
        if is_blank(row, fmt):
            dropped += 1
            continue
        rendered = renderer.render(row, fmt, row_name(source, number, identity))
        encoded = _encode(rendered, renderer.tokenizer)
        example = _labelled(rendered, renderer.tokenizer, encoded, max_seq_len, train_on_inputs)
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            dropped += 1  # nothing left to learn: the response was cut off by --max-seq-len
            continue
        examples.append(example)
        if scored is not None:
            scored.append(example if not train_on_inputs else
                          _labelled(rendered, renderer.tokenizer, encoded, max_seq_len, False))
    return examples, dropped


def prepare(data_cfg: Any, tokenizer: Any, seed: int) -> PreparedData:
    """Read, render and tokenize training (and evaluation) data as the config says.

    The tokenized rows are cached by fingerprint (the data's bytes, the tokenizer, the template and
    every option that changes a token or a label), so a second run on the same data starts at once.
    """
    import datasets

    rows, identity = read_rows(data_cfg.path)
    source = f"--data {data_cfg.path}" if data_cfg.path else "the embedded dataset"
    fmt = detect_format(rows, data_cfg.format, source, identity)
    renderer = Renderer(tokenizer, data_cfg.template)
    use_heldout = not (data_cfg.path or data_cfg.eval_split)  # the embedded dataset brings its held-out split
    eval_spec = data_cfg.eval_data or (str(default_data_path("heldout")) if use_heldout else None)
    eval_rows = None
    eval_source = f"--eval-data {data_cfg.eval_data}" if data_cfg.eval_data else "the embedded held-out split"
    if eval_spec:
        eval_rows, identity["eval"] = read_rows(eval_spec, split="eval", flag="--eval-data")
        eval_format = detect_format(eval_rows, data_cfg.format, eval_source, identity["eval"])
    key = _fingerprint(identity, fmt, renderer, data_cfg)
    cached = _read_cache(key)
    if cached is not None:
        train_ds, eval_ds, dropped = cached
        log.debug("tokenized data from the cache (%s)", key[:12])
    else:
        # the rows --eval-split holds out of a --train-on-inputs run are scored as every evaluation is, on
        # their responses: each row is labelled that way too, in the same pass, and split alike below
        scored: list[dict[str, list[int]]] | None = [] if _scored_split(data_cfg) else None
        train, dropped = tokenize_rows(rows, fmt, renderer, data_cfg.max_seq_len, data_cfg.train_on_inputs, source,
                                       identity, scored)
        if not train:
            raise DataError(f"no training row has a response token within --max-seq-len {data_cfg.max_seq_len} "
                            "(blank responses are left out); raise --max-seq-len or shorten the prompts")
        eval_examples = None
        if eval_rows is not None:
            eval_examples, _ = tokenize_rows(eval_rows, eval_format, renderer, data_cfg.max_seq_len, False,
                                             eval_source, identity["eval"])
        elif scored is not None:
            eval_examples = scored
        train_ds = datasets.Dataset.from_list(train)
        eval_ds = datasets.Dataset.from_list(eval_examples) if eval_examples else None
        _write_cache(key, train_ds, eval_ds, dropped)
    if dropped:
        log.warning("%d of %d rows dropped: their response is blank or does not fit in --max-seq-len %d",
                    dropped, len(rows), data_cfg.max_seq_len)
    if data_cfg.eval_split and not eval_spec:
        _check_split(len(train_ds), data_cfg.eval_split)
        scored = eval_ds if _scored_split(data_cfg) else train_ds
        # a split is a seeded permutation of the row count: the same rows on both sides of the same length
        train_ds = train_ds.train_test_split(test_size=data_cfg.eval_split, seed=seed)["train"]
        eval_ds = scored.train_test_split(test_size=data_cfg.eval_split, seed=seed)["test"]
    return PreparedData(train_ds, eval_ds, fmt, renderer.template, identity, dropped)


def _scored_split(data_cfg: Any) -> bool:
    """An --eval-split of a --train-on-inputs run: its held-out rows need labels of their own."""
    return bool(data_cfg.eval_split and data_cfg.train_on_inputs and not data_cfg.eval_data)


def _check_split(rows: int, share: float) -> None:
    """Both sides of a --eval-split keep at least one row (counted as `datasets` splits them)."""
    import math

    held_out = math.ceil(share * rows)
    if held_out >= rows:
        raise DataError(f"--eval-split {share} of {rows} training rows leaves none to train on; "
                        "lower it, add rows, or pass --eval-data")


# ---------------------------------------------------------------- the tokenized-data cache


def _code_version() -> str:
    """A hash of this module's source, which holds all the reading, rendering and tokenizing, and of the
    Alpaca template it renders with: any change to them gives new cache keys, so a cached dataset never
    outlives the code that made it."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update((ASSETS / "templates" / "alpaca.json").read_bytes())
    return digest.hexdigest()


def _fingerprint(identity: dict[str, Any], fmt: str, renderer: Renderer, data_cfg: Any) -> str | None:
    """None when the data has no content hash (hub datasets): those are not cached."""
    if "sha256" not in identity or ("eval" in identity and "sha256" not in identity["eval"]):
        return None
    tokenizer = renderer.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {"code": _code_version(), "data": identity["sha256"], "eval": identity.get("eval", {}).get("sha256"),
             "format": fmt, "format_option": data_cfg.format, "template": renderer.template,
             "chat_template": getattr(tokenizer, "chat_template", None), "special": str(tokenizer.special_tokens_map),
             "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(), "max_seq_len": data_cfg.max_seq_len,
             "train_on_inputs": data_cfg.train_on_inputs, "scored_split": _scored_split(data_cfg)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Reading and writing the cache is lora's own business: no `datasets` progress bars for it."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


def _cache_folder(key: str) -> Path:
    from lora_cli.models import cache_dir

    return cache_dir() / "tokenized" / key


def _read_cache(key: str | None) -> tuple[Any, Any, int] | None:
    if key is None:
        return None
    folder = _cache_folder(key)
    if not (folder / "done.json").exists():
        return None
    import datasets

    try:
        meta = json.loads((folder / "done.json").read_text())
        # in memory, as a freshly tokenized dataset is: nothing (a split's index files) gets written beside it
        with _no_progress_bars():
            train = datasets.load_from_disk(str(folder / "train"), keep_in_memory=True)
            evaluation = datasets.load_from_disk(str(folder / "eval"), keep_in_memory=True) if meta["eval"] else None
    except Exception as exc:  # a damaged cache entry is only a missed shortcut: drop it, tokenize again
        log.debug("dropping the damaged tokenized-data cache entry %s: %s", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return train, evaluation, int(meta["dropped"])


def _write_cache(key: str | None, train: Any, evaluation: Any, dropped: int) -> None:
    """Written into a temporary folder and renamed, so readers see a whole entry or none."""
    import tempfile

    if key is None:
        return
    folder = _cache_folder(key)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as exc:  # a read-only cache must not stop training
        log.debug("tokenized data not cached: %s", exc)
        return
    try:
        with _no_progress_bars():
            train.save_to_disk(str(tmp / "train"))
            if evaluation is not None:
                evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "done.json").write_text(json.dumps({"eval": evaluation is not None, "dropped": dropped}))
        os.replace(tmp, folder)  # fails when another run cached the same data first: theirs is as good
    except OSError as exc:
        log.debug("tokenized data not cached: %s", exc)
        shutil.rmtree(tmp, ignore_errors=True)


def make_collator(tokenizer: Any, packing: bool) -> Any:
    """Packing: one row per batch, position ids restarting per example and no attention across them.

    The example boundaries also travel as `cu_seq_lens_q/k` (FlashAttention's names), which lets
    `packed_attention` attend within each example without building the row-by-row mask.

    Without packing: dynamic padding to the longest row of the batch, labels padded with IGNORE_INDEX
    (never by masking pad ids: the pad token may be the EOS, which must stay trained).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
