"""Kernel tests without CUDA: importing Triton kernel modules under Triton's interpreter.

The interpreter is chosen when Triton and a kernel module are imported (decoration time), so the
variable is set around the import and restored after, and a test module keeps it set only while its
own tests run (`TRITON_INTERPRET` is read again at launch). If Triton was already imported in this
process without the interpreter it cannot be switched: the test module then runs itself in a
subprocess with the variable set (`run_module_in_subprocess`).

A kernel test module sets `IN_SUBPROCESS = needs_subprocess()`, imports its kernels with
`import_kernels`, and imports `interpreter_while_testing` (an autouse fixture there) and
`test_module_under_interpreter_in_subprocess` from here.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()


def _interpreted() -> bool:
    import triton.language as tl

    return type(tl.standard.sum).__name__ == "InterpretedFunction"


def needs_subprocess() -> bool:
    """True when this process imported Triton without the interpreter and has no CUDA."""
    return not CUDA and "triton" in sys.modules and not _interpreted()


def import_kernels(names: tuple[str, ...], probe: str, in_subprocess: bool) -> list:
    """The kernel modules, under the interpreter when there is no CUDA; `probe` names a
    `@triton.jit` function of the first module (reloaded if it was imported compiled)."""
    if CUDA or in_subprocess:
        pytest.importorskip("triton")
        return [importlib.import_module(n) for n in names]
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        mods = [importlib.import_module(n) for n in names]
        if type(getattr(mods[0], probe)).__name__ != "InterpretedFunction":
            mods = [importlib.reload(m) for m in mods]  # imported earlier without the interpreter
        return mods
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def run_module_in_subprocess(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          cwd=Path(test_file).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


SUBPROCESS_TEST = "test_module_under_interpreter_in_subprocess"


def enter_test(request, monkeypatch, in_subprocess: bool) -> None:
    """For a test module's autouse fixture: in a process that must run the module in a subprocess,
    skip every test but that one; without CUDA keep the interpreter on while the test runs (Triton
    reads the variable again at launch), and only then."""
    if in_subprocess and request.node.name != SUBPROCESS_TEST:
        pytest.skip(f"runs in the subprocess of {SUBPROCESS_TEST}")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def interpreter_while_testing(request, monkeypatch):
    """Autouse in each kernel test module that imports it: `enter_test` with the module's
    IN_SUBPROCESS."""
    enter_test(request, monkeypatch, request.module.IN_SUBPROCESS)


def test_module_under_interpreter_in_subprocess(request):
    """Collected in each kernel test module that imports it: where this process cannot switch Triton
    to the interpreter, the module runs itself in a subprocess."""
    if not request.module.IN_SUBPROCESS:
        pytest.skip("the kernel tests run in this process")
    run_module_in_subprocess(str(request.module.__file__))
