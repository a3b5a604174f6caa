"""Errors for people and the script wrapper that prints them, and the progress bar on stderr."""
from __future__ import annotations

import sys
from typing import Callable, Optional




class UserError(Exception):
    """A problem with the user's input: printed as one line naming the file or argument, without a traceback."""


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Runs a script's main(), turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        code = main()
    except UserError as err:
        print("error: %s" % err, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def progress(iterable=None, **kwargs):
    """The project's progress bar: tqdm on stderr, so stdout keeps only results."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
