"""Child processes that start in a fraction of a second, forked from a server that imported torch
and transformers once (multiprocessing's forkserver with preloaded modules).

A fresh `python -m ...` spends 6-10 s importing transformers on 2 CPU cores before it does any work;
`qrecover compare` starts one process per stage. A forked child is still a process of its own: its
own memory (its peak resident set counts the imported modules, as a fresh interpreter's would), its
exit code, killable; it gets the caller's environment, sys.path and working directory as of the call,
and writes its stdout and stderr to a log file.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from pathlib import Path

PRELOAD = ["torch", "transformers.modeling_utils"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)  # a module that does not import is skipped
    return _context


def _child(target: str, args: tuple, env: dict, log: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    module, _, name = target.partition(":")
    code = getattr(importlib.import_module(module), name)(*args)
    sys.exit(code if isinstance(code, int) else 0)


def start(target: str, args: tuple, log: str | Path) -> multiprocessing.Process:
    """Run `module:function`(*args) in a forked child; its return value (an int) is the exit code."""
    process = _forkserver().Process(target=_child, args=(target, tuple(args), dict(os.environ), str(log)))
    process.start()
    return process


def run(target: str, args: tuple, log: str | Path) -> int:
    """start(), then wait; the child's exit code."""
    process = start(target, args, log)
    process.join()
    return process.exitcode


def log_tail(log: str | Path, chars: int = 3000) -> str:
    path = Path(log)
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""
