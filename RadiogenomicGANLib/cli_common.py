"""What every command line of the project shares: one exit-code convention, one top-level handler, and the
guards that keep an output from landing on an input.

Exit codes (every CLI: insert, demo, phantom, prepare, train, evaluate, export):

- 0 — done;
- 2 — a user error: bad arguments or input files, an output that cannot be written (read-only folder, disk
  full, a file where a folder is needed), an output that would overwrite an input. One line on stderr,
  `error: <what is wrong>`, never a traceback, and no output file under a requested name;
- 130 — cancelled or interrupted (the shell's code for SIGINT);
- anything else (1 with a traceback) — a bug: please report it.

argparse already exits 2 for a malformed command line; this makes every other user error agree with it.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
#: Packages only an extra installs (pyproject's optional-dependencies): missing, they are a set-up error
#: with the install command to fix it, not a traceback.
OPTIONAL_MODULES = {"tensorboard": "train", "skimage": "train"}

class UserError(ValueError):
    """Bad input to a command line (exit status 2); the message says what is wrong and what to do."""


_OUT_OF_MEMORY = ("not enough memory for this request; ask for less (fewer slices or patients, a smaller batch, "
                  "narrower networks)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_os_error(error: OSError) -> str:
    """A one-line message naming the file and the reason: 'cannot write /x/y.nrrd: No space left on device'."""
    if error.strerror is None:  # raised by our code with a message of its own
        return str(error) or type(error).__name__
    reason = error.strerror
    if error.errno == errno.EFBIG:
        reason += " (the file size limit, ulimit -f, was reached)"
    return reason if error.filename is None else f"{error.filename}: {reason}"


def run_cli(body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = (), *,
            interrupted: str = "interrupted") -> int:
    """Run a command's body under the one convention above and return its exit status.

    `user_errors` are the exception types that mean bad input (besides `UserError` and `OSError`, which
    file access raises for unwritable or missing paths). Anything else propagates with its traceback: a bug.
    `interrupted` is printed on Ctrl-C (a command that writes atomically can add "no output written").
    """
    try:
        return body()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_CANCELLED
    except (UserError, *user_errors) as error:  # type: ignore[misc]
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        print(f"error: {_one_line(describe_os_error(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as error:
        extra = OPTIONAL_MODULES.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: {_missing_extra_message(str(error.name), extra)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print(f"error: {_OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as error:  # torch reports a failed allocation (CPU or GPU) as a RuntimeError
        if not any(sign in str(error) for sign in ("can't allocate memory", "out of memory")):
            raise
        print(f"error: {_OUT_OF_MEMORY} ({_one_line(str(error))[:160]})", file=sys.stderr)
        return EXIT_USER_ERROR


def _missing_extra_message(module: str, extra: str) -> str:
    return f"this command needs {module}, which a plain install leaves out: pip install 'radiogenomicgan[{extra}]'"


def require_optional(module: str) -> None:
    """Refuse, before any work or file, a command whose optional package (OPTIONAL_MODULES) is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(_missing_extra_message(module, OPTIONAL_MODULES.get(module, "train")))


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file (resolved paths, or the same inode through links)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return a.resolve() == b.resolve()


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when `path` lies in `folder` or any folder below it (resolved)."""
    return Path(folder).resolve() in Path(path).resolve().parents


def check_not_an_input(output: str | Path, inputs: Iterable[str | Path | None], option: str) -> None:
    """Refuse an output that is one of the inputs, or lies inside an input folder (a DICOM series, a cohort)."""
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if source.is_dir() and is_inside(output, source):
            raise UserError(f"{option} {output} lies inside the input folder {source}; write outputs elsewhere, "
                            "inputs are never modified")
        if same_file(output, source):
            raise UserError(f"{option} {output} is an input ({source}); it would be overwritten: choose another "
                            "path")


def check_output_folder(path: str | Path, option: str = "--out", *, create: bool = True) -> Path:
    """An output *folder*: refuse an existing file there (or on the way to it) and a folder that cannot be
    written. With `create` the folder is made now; without, the nearest existing folder above is probed, so
    a run refused later leaves nothing behind."""
    from RadiogenomicGANLib.atomic import check_writable

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder (it is created if missing)")
    existing = path
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a folder")
            existing = parent
            break
    if create:
        path.mkdir(parents=True, exist_ok=True)
        existing = path
    check_writable(existing)
    return path


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """An output *file*: not a folder, in an existing folder that can be written."""
    from RadiogenomicGANLib.atomic import check_writable

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{option} {path}: the folder {folder} does not exist")
    check_writable(folder)
    return path
