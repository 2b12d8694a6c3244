"""Run folders: where they go, how `runs/latest` finds the newest, and how a finished run is recognised.

A run folder is finished when its manifest `lora_run.json` says `"status": "finished"`; the manifest is
written last and atomically, after the adapter, so a run that was killed never looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from lora_cli.errors import RunError

MANIFEST = "lora_run.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
LOCK = ".lora.lock"  # held by the process training in the folder


def runs_root() -> Path:
    """Where runs go by default and where `latest` lives; LORA_RUNS_DIR overrides `./runs`."""
    return Path(os.environ.get("LORA_RUNS_DIR", "runs"))


def new_run_dir(model_name: str) -> Path:
    """A fresh run folder under the runs root, made and locked here: two runs started in the same second (a
    sweep, or two launches of several processes, whose rank 0 calls this) each get their own. An empty
    folder is removed again if the run fails before it writes anything (see remove_if_empty)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model_name).name)[:40]
    root = runs_root()
    suffix = 1
    path = root / f"{stamp}-{safe}"

    def cannot_take(exc: OSError) -> RunError:
        return RunError(f"the runs folder {root} cannot take a new run ({exc.strerror or exc}); make it writable "
                        "or free space, set LORA_RUNS_DIR, or pass --output-dir")

    try:
        made = [p for p in (root, *root.parents) if not p.exists()]  # innermost first, as they are removed
        root.mkdir(parents=True, exist_ok=True)
        while True:
            with contextlib.suppress(FileExistsError):
                path.mkdir()  # atomic: of two runs asking for one name, one gets it
                break
            suffix += 1
            path = root / f"{stamp}-{safe}-{suffix}"
    except OSError as exc:
        raise cannot_take(exc) from None
    _made[str(path.resolve())] = made  # remove_if_empty looks it up resolved
    try:
        lock_run(path)
    except (OSError, RunError) as exc:  # OSError: the lock file cannot be written (a full disk, a quota)
        remove_if_empty(path, remove_folder=True)
        if isinstance(exc, RunError):
            raise
        raise cannot_take(exc) from None
    remove_leftovers(root)
    return path


# How old a folder holding nothing but an unlocked lock file must be for remove_leftovers to take it: a run
# writes its manifest once the model and data are loaded, and holds the lock all along.
LEFTOVER_AGE_S = 600


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the folders under the runs root that hold nothing but a lock file no process holds, written over
    LEFTOVER_AGE_S ago: what a run leaves when it is killed before it writes anything (on several GPUs, the
    rank that made the folder dies in NCCL's barrier when another rank fails at start, before it can clean
    up). Where locks cannot be taken (no flock), nothing is removed. Returns the folders removed."""
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    now = time.time()
    for folder in root.iterdir():
        with contextlib.suppress(OSError):  # in use, not ours to remove, or gone meanwhile: left as it is
            lock = folder / LOCK
            if (folder.is_symlink() or not folder.is_dir() or str(folder.resolve()) in _held
                    or [entry.name for entry in folder.iterdir()] != [LOCK]
                    or now - lock.stat().st_mtime < LEFTOVER_AGE_S):
                continue
            with open(lock, "a", encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a process holds it
                lock.unlink()  # while this process holds it: no run can be starting there
            folder.rmdir()  # fails if a run made a new lock file there meanwhile
            removed.append(folder)
    return removed


# Folders new_run_dir made for a reserved run folder (it, then a runs root that did not exist yet).
_made: dict[str, list[Path]] = {}


def remove_if_empty(run_dir: Path, remove_folder: bool) -> None:
    """After a run that failed before writing anything: the lock file this process holds goes, and the
    folder too where lora made it (`remove_folder`; a folder the user named stays). Another process's
    lock is never touched."""
    key = str(run_dir.resolve())
    ours = key in _held
    with contextlib.suppress(OSError):
        if ours and {p.name for p in run_dir.iterdir()} <= {LOCK}:
            (run_dir / LOCK).unlink(missing_ok=True)  # while still held: no other process can have taken it
    release_run(run_dir)
    if remove_folder:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only while empty
            for parent in _made.pop(key, []):
                parent.rmdir()  # only while empty: another run may have come since


# Open lock files of the runs this process trains, by folder: closing one releases its lock.
_held: dict[str, Any] = {}


def lock_run(run_dir: Path) -> None:
    """Hold the run folder's lock for as long as this process lives (the system drops it when the process
    ends, however it ends): a second `lora train` into the same folder, or a `--resume` that would pick it,
    is refused while this one trains there. Where the platform or the filesystem has no flock, runs go
    unguarded, with a warning."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        return
    key = str(run_dir.resolve())
    if key in _held:
        return
    handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunError(f"{run_dir} is being trained by another lora process (pid {holder}); wait for it to "
                       "end, or pick another --output-dir") from None
    except OSError as exc:  # a filesystem without flock (some network and FUSE mounts)
        handle.close()
        with contextlib.suppress(OSError):
            if (run_dir / LOCK).stat().st_size == 0:  # made just now, by open() above: it guards nothing
                (run_dir / LOCK).unlink()
        import logging

        logging.getLogger(__name__).warning("%s cannot be locked (%s): nothing stops another lora process from "
                                            "training in it at the same time", run_dir, exc.strerror or exc)
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = handle


def release_run(run_dir: Path) -> None:
    handle = _held.pop(str(run_dir.resolve()), None)
    if handle is not None:
        handle.close()


def is_locked(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock (it is training there now)."""
    try:
        import fcntl
    except ImportError:
        return False
    if str(run_dir.resolve()) in _held or not (run_dir / LOCK).is_file():
        return False
    try:
        # a shared probe conflicts with the holder's exclusive lock, and works on a read-only handle
        # (NFS emulates flock with byte-range locks, whose exclusive kind needs the file open for writing)
        with open(run_dir / LOCK, encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # cannot tell (no flock here): not taken for busy
        return False
    return False


def trim_log(run_dir: Path, step: int) -> None:
    """On --resume from the checkpoint at `step`: the training log keeps what led up to it. Entries past
    it (steps the killed process took and the resumed one takes again) and a line cut off by the kill
    would otherwise stay in it."""
    if not (run_dir / TRAIN_LOG).is_file():
        return
    kept = [entry for entry in read_log(run_dir) if isinstance(entry.get("step"), int) and entry["step"] <= step]
    write_text_atomic(run_dir / TRAIN_LOG, "".join(json.dumps(entry) + "\n" for entry in kept))


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of the run's training log; a line cut off by a kill or a full disk is skipped, so
    the rest of the log still reads."""
    path = run_dir / TRAIN_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest; None when it has none (a plain PEFT adapter folder). A manifest that cannot be
    read is an error: guessing past it would take a damaged run for an unfinished one."""
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None  # not JSON: damaged, as below
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise RunError(f"{path} is damaged (not a JSON object); restore it from a copy, or train the run again "
                       f"with `lora train --overwrite --output-dir {shlex.quote(str(run_dir))}`")
    return manifest


def is_finished(run_dir: Path) -> bool:
    manifest = read_manifest(run_dir)
    return bool(manifest and manifest.get("status") == "finished"
                and all((run_dir / f).is_file() for f in ADAPTER_FILES))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside the target and rename: readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # a full disk, or Ctrl-C: no half-written temporary file left beside the target
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object; None when it is missing, unreadable, not JSON or not an object."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def update_latest(run_dir: Path) -> None:
    """Point `runs/latest` at the run: a symlink where the system has them, else a one-line file. The run
    is whole before this: a folder where the pointer cannot be written gets a warning, not a failed run."""
    import logging

    root = runs_root()
    link = root / "latest"
    target = run_dir.resolve()
    tmp = root / f".latest-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            # relative where the run lies under the runs folder: the pointer survives a moved or copied folder
            pointed = Path(os.path.relpath(target, root.resolve())) if target.is_relative_to(root.resolve()) \
                else target
            os.symlink(pointed, tmp, target_is_directory=True)
        except OSError:
            tmp.write_text(str(target) + "\n")
        check_latest_can_point()
        os.replace(tmp, link)
    except (OSError, RunError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        logging.getLogger(__name__).warning("%s was not pointed at %s (%s); name the run to other commands",
                                            link, run_dir, getattr(exc, "strerror", None) or exc)


def check_latest_can_point() -> None:
    """`runs/latest` is a pointer lora replaces; a real folder there is the user's, never replaced."""
    link = runs_root() / "latest"
    if link.is_dir() and not link.is_symlink():
        raise RunError(f"{link} is a real folder; move it away so that it can point at the newest run")


def latest_run() -> Path | None:
    link = runs_root() / "latest"
    if link.is_symlink() or link.is_dir():
        return link.resolve()
    if link.is_file():
        return Path(link.read_text().strip())
    return None


def find_run(spec: str | None, what: str = "adapter", unfinished: bool = False) -> Path:
    """A finished run or adapter folder named by the user, or `runs/latest` when none is named.
    `unfinished`: a run that has started and not finished is returned as it is (for `lora info`)."""
    if spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise RunError(f"{path} does not exist; name a run folder or adapter folder (or train one with `lora train`)")
    else:
        path = latest_run()
        if path is None:
            raise RunError(f"no {what} named and no {runs_root() / 'latest'} yet; run `lora train` first or name one")
        if not path.exists():
            raise RunError(f"{runs_root() / 'latest'} points to {path}, which no longer exists; name a run, or train one")
    if (path / MANIFEST).is_file() and not is_finished(path):
        manifest = read_manifest(path) if unfinished else None
        if manifest and manifest.get("status") != "finished":  # a finished one missing its adapter is refused below
            return path
        raise RunError(f"{path} is an unfinished run; finish it with `lora train --resume --output-dir "
                       f"{shlex.quote(str(path))}`")
    if not (path / "adapter_config.json").is_file():
        raise RunError(f"{path} holds no adapter (adapter_config.json); name a finished run or a PEFT adapter folder")
    from lora_cli.adapters import check_adapter_files

    check_adapter_files(path)
    return path


def _unfinished(run_dir: Path) -> bool:
    """For a scan of every run: a damaged one is not taken for one to resume, nor does it stop the scan."""
    try:
        return not is_finished(run_dir)
    except RunError:
        return False


def resume_dir(output_dir: str | None, skip_locked: bool = True) -> Path:
    """The run `--resume` continues: the one named, else the newest unfinished run with a checkpoint that
    no other process is training (`skip_locked`)."""
    if output_dir:
        return Path(output_dir)
    root = runs_root()
    unfinished = [p for p in (root.iterdir() if root.is_dir() else ())
                  if p.is_dir() and not p.is_symlink() and _unfinished(p)
                  and _has_complete_checkpoint(p)]
    idle = [p for p in unfinished if not (skip_locked and is_locked(p))]  # not one being trained right now
    if not idle:
        busy = f" ({len(unfinished)} being trained by other processes)" if unfinished else ""
        raise RunError(f"--resume: no unfinished run with a checkpoint in {root}{busy}; name the run with "
                       "--output-dir")
    return max(idle, key=lambda p: (p / CHECKPOINTS).stat().st_mtime)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse to clobber a finished run, or anything that is not a run, before any work; a resumed run
    needs checkpoints. `inputs` are the run's own files (data), which --overwrite must never delete.
    Changes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--output-dir {run_dir} is a file; name a folder for the run")
    if not run_dir.exists():
        check_can_create(run_dir, "--output-dir")
    check_latest_can_point()
    if resume:
        if not (run_dir / CHECKPOINTS).is_dir():
            raise RunError(f"--resume: {run_dir} has no checkpoints to resume from; start it again with --overwrite")
        newest_checkpoint(run_dir)  # fails now, not after the model has loaded, when none is complete
        try:  # it will be written to: a read-only one fails now, not after the model has loaded
            os.rmdir(tempfile.mkdtemp(prefix=".lora-probe-", dir=run_dir))
        except OSError as exc:
            raise RunError(f"--resume: {run_dir} cannot be written to ({exc.strerror or exc}); make it writable, or "
                           "copy the run somewhere you can write and resume it there") from None
        return
    if not (run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir())):
        return
    if not is_run(run_dir):
        example = foreign_entry(run_dir) or sorted(p.name for p in run_dir.iterdir())[0]
        raise RunError(f"--output-dir {run_dir} holds files that are not a lora run (such as {example}); pick another "
                       "folder (--overwrite only replaces runs)")
    if not overwrite:
        resumable = not is_finished(run_dir) and _has_complete_checkpoint(run_dir)
        state = "a finished run" if is_finished(run_dir) else "an unfinished run" + (
            "" if resumable else " with no complete checkpoint to resume from")
        fix = "--resume to continue it, or --overwrite" if resumable else "--overwrite"
        raise RunError(f"--output-dir {run_dir} already holds {state}; pick another folder or pass {fix}")
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise RunError(f"--overwrite would delete {run_dir}, the folder this command runs in; run it from "
                       "elsewhere or pick another --output-dir")
    for spec in inputs:
        if spec and Path(spec).exists() and Path(spec).resolve().is_relative_to(run_dir.resolve()):
            raise RunError(f"--overwrite would delete {spec}, which this run reads; move it out of {run_dir} first")


def check_can_create(path: Path, option: str) -> None:
    """Fail before any work when `path` could not be created: a folder made and removed at once in its
    nearest existing folder says so (permission bits alone do not: root passes them everywhere)."""
    ancestor = next(p for p in path.absolute().parents if p.exists())
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(0, "not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".lora-probe-", dir=ancestor))
    except OSError as exc:
        raise RunError(f"{option} {path} cannot be created in {ancestor} ({exc.strerror or exc}); "
                       "pick a folder you can write to") from None


# What lora writes into a run folder (the adapter, the tokenizer peft saves beside it, the log, the plot,
# checkpoints, a merge inside the run and their temporary names). --overwrite replaces only such folders.
RUN_ENTRIES = (MANIFEST, TRAIN_LOG, CHECKPOINTS, "adapter_*", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt", "loss_curve.png",
               "README.md", "merged", "merged.tmp-*", ".merged.old-*", ".adapter.tmp", "*.tmp", LOCK)


def is_run(folder: Path) -> bool:
    """Whether lora train made this folder: a manifest, a training log or checkpoints, and nothing else
    than what a run writes (so that --overwrite never deletes anything of the user's)."""
    return any((folder / name).exists() for name in (MANIFEST, TRAIN_LOG, CHECKPOINTS)) and \
        foreign_entry(folder) is None


def foreign_entry(folder: Path, entries: tuple[str, ...] = RUN_ENTRIES) -> str | None:
    """The first entry of `folder` that lora does not write there (by default: a run), if any."""
    import fnmatch

    return next((p.name for p in sorted(folder.iterdir())
                 if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in entries)), None)


def create_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make the run folder once the inputs are known to be good; --overwrite clears the old run first."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--output-dir {run_dir} cannot be written: {exc.strerror or exc}") from exc
    lock_run(run_dir)  # before anything is deleted or written, and the checks below repeated under it
    earlier = [p for p in run_dir.iterdir() if p.name != LOCK]
    if earlier and not resume and not overwrite:  # another run wrote here since check_run_dir
        raise RunError(f"--output-dir {run_dir} now holds a run started meanwhile; pick another folder")
    if earlier and not resume and overwrite:
        try:  # the contents, not the folder: the lock (and a folder that is a link) stays
            for item in earlier:
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        except OSError as exc:
            raise RunError(f"--output-dir {run_dir} cannot be cleared: {exc.strerror or exc}") from exc


def checkpoint_number(checkpoint: Path) -> int:
    """The step in a checkpoint folder's name (checkpoint-120 -> 120); -1 for a name without one."""
    suffix = checkpoint.name.split("-")[-1]
    return int(suffix) if suffix.isdigit() else -1


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, complete or not, oldest first (names without a step before them)."""
    return sorted((run_dir / CHECKPOINTS).glob("checkpoint-*"), key=checkpoint_number)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints with a step in their name, oldest first."""
    return [p for p in _checkpoints(run_dir) if checkpoint_number(p) >= 0 and checkpoint_is_complete(p)]


def newest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint; incomplete ones (a kill while saving) are skipped."""
    import logging

    log = logging.getLogger(__name__)
    folder = run_dir / CHECKPOINTS
    for checkpoint in reversed(_checkpoints(run_dir)):
        if checkpoint_is_complete(checkpoint):
            return str(checkpoint)
        log.warning("skipping incomplete checkpoint %s", checkpoint)
    raise RunError(f"--resume: no complete checkpoint in {folder}; start the run again with --overwrite")


def _has_complete_checkpoint(run_dir: Path) -> bool:
    return any(checkpoint_is_complete(c) for c in (run_dir / CHECKPOINTS).glob("checkpoint-*"))


def checkpoint_is_complete(checkpoint: Path) -> bool:
    """Everything the Trainer needs to resume is there and the adapter weights parse."""
    needed = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
    if not all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size > 0 for name in needed):
        return False
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        for name in ("optimizer.pt", "scheduler.pt"):  # torch.save's zip archives: a cut-off one has no directory
            with zipfile.ZipFile(checkpoint / name) as archive:
                archive.namelist()
        from safetensors import safe_open

        with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception:
        return False
    return True
