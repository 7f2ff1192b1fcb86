"""Compile every Triton launch of the CPU tests for an NVIDIA GPU as well (no GPU needed).

Under TRITON_INTERPRET=1 a kernel runs in Triton's CPU interpreter, which executes it with numpy
semantics and accepts code the GPU compiler rejects (tests/test_gpu_compile.py: a loop-carried value
whose type changes from int to float), and bf16 dot products only through the fp32 upcast of
kernels._common.f32_dot. A kernel checked only that way can still fail to compile on the first GPU
call of a session. With `install(90)` each launch is first compiled for
sm_90 (Triton's whole pipeline, ptxas included, down to a cubin: the wheel ships ptxas), then run
in the interpreter exactly as before, so a kernel that would not compile fails the CPU test that
launches it, and the resource use of every compiled kernel (registers, stack / spill bytes) is
reported at the end of the run (conftest.py).

How: the kernel modules are imported with TRITON_INTERPRET=0, so `@triton.jit` gives JITFunctions
(Triton's own `tl.cumsum` / `tl.sum` helpers too). A launch compiles through JITFunction.run with a
driver that only names the target, then swaps every JITFunction of Triton's language modules and
ours for an InterpretedFunction of the same Python function (what TRITON_INTERPRET=1 would have
built), runs the launch in the interpreter and swaps them back.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

KERNEL_PACKAGES = ("sglang_psa.kernels", "sglang_psa.memory")
KERNEL_MODULES = ("sglang_psa.access_log",)  # modules with kernels outside those packages
SWAPPED_PREFIXES = ("triton.language", "sglang_psa")

installed: int | None = None  # the target capability once install() ran
_compile_only = False  # compile_only(): launches compile and are not run
launches: Counter = Counter()  # kernel name -> launches compiled (cache hits included)
cubins: dict[tuple[str, str], bytes] = {}  # (kernel name, compile hash) -> cubin


def _fake_driver(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class TargetOnlyDriver(DriverBase):
        """Names the compile target; anything that would need a device raises."""

        target = GPUTarget("cuda", capability, 32)

        @classmethod
        def is_active(cls) -> bool:
            return False

        def get_current_target(self):
            return self.target

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_active_torch_device(self):
            raise RuntimeError("gpu_compile: no device")

        get_benchmarker = get_device_interface = get_empty_cache_for_benchmark = get_active_torch_device
        map_python_to_cpp_type = clear_cache = get_active_torch_device

    return TargetOnlyDriver()


def _import_kernel_modules() -> None:
    for name in KERNEL_PACKAGES:
        pkg = importlib.import_module(name)
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{name}.{m.name}")
    for name in KERNEL_MODULES:
        importlib.import_module(name)


def install(capability: int = 90) -> None:
    """Import triton and the kernel modules as compiled JITFunctions, then make every launch compile
    for sm_<capability> before the interpreter runs it. Call before any test module imports them;
    leaves TRITON_INTERPRET=1 set (the kernels' Python wrappers read it to pick CPU code paths)."""
    if "triton" in sys.modules:
        raise RuntimeError("gpu_compile.install must run before triton is imported")
    os.environ["TRITON_INTERPRET"] = "0"
    import triton.language as tl
    from triton.runtime import driver
    from triton.runtime import interpreter as itp
    from triton.runtime.jit import JITFunction

    _import_kernel_modules()
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(tl.standard.cumsum, JITFunction):
        raise RuntimeError("gpu_compile: triton was imported in interpreter mode")
    target_driver = _fake_driver(capability)
    interpreted: dict[int, tuple[Any, Any]] = {}  # id(JITFunction) -> (it, its InterpretedFunction)

    def as_interpreted(jf):
        if id(jf) not in interpreted:  # by id: hashing a JITFunction walks its dependencies' globals
            interpreted[id(jf)] = (jf, itp.InterpretedFunction(jf.fn))
        return interpreted[id(jf)][1]

    # the globals a kernel can call: every JITFunction of triton.language and of our modules, all
    # imported by now (kernels and their helpers live in the modules _import_kernel_modules imports)
    jit_globals = [
        (mod, key, val)
        for name, mod in list(sys.modules.items())
        if mod is not None and name.startswith(SWAPPED_PREFIXES)
        for key, val in vars(mod).items()
        if isinstance(val, JITFunction)
    ]

    @contextlib.contextmanager
    def interpreter_globals():
        for mod, key, val in jit_globals:
            setattr(mod, key, as_interpreted(val))
        try:
            yield
        finally:
            for mod, key, val in jit_globals:
                setattr(mod, key, val)

    compile_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        active, env = driver._active, os.environ["TRITON_INTERPRET"]
        driver.set_active(target_driver)
        os.environ["TRITON_INTERPRET"] = "0"  # constexpr functions wrap their results when compiling
        try:
            kernel = compile_run(self, *args, grid=grid, warmup=True, **kwargs)
        finally:
            driver._active = active
            os.environ["TRITON_INTERPRET"] = env
        name = self.fn.__name__
        launches[name] += 1
        cubins.setdefault((name, kernel.hash), kernel.asm["cubin"])
        if warmup or _compile_only:
            return kernel
        with interpreter_globals():
            return as_interpreted(self).run(*args, grid=grid, warmup=False, **kwargs)

    def call_device_function(self, *args, **kwargs):
        # the interpreter's own __call__ patches triton.language for a device-function call and never
        # restores it, which would leave the next compile with interpreter semantics
        scope = itp._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise itp.InterpreterError(repr(e)) from e
        finally:
            scope.restore()

    JITFunction.run = run
    itp.InterpretedFunction.__call__ = call_device_function
    global installed
    installed = capability


@contextlib.contextmanager
def compile_only():
    """Launches inside compile for the target and do not run (their outputs stay as allocated): for
    what the interpreter cannot execute, e.g. bf16 dot products, at the shapes the server uses.
    TRITON_INTERPRET is 0 inside, so the wrappers pick their GPU variants (kernels._common.f32_dot
    upcasts bf16 dot products only for the interpreter)."""
    global _compile_only
    env = os.environ.get("TRITON_INTERPRET")
    _compile_only = True
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        _compile_only = False
        if env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = env


def resource_usage(names: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Per kernel (all, or those named) over its compiled specializations: count, max registers, max
    per-thread stack + local bytes (spills live there), from the bundled cuobjdump."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (name, h), blob in cubins.items():
            if names is not None and name not in names:
                continue
            path = Path(tmp) / f"{h}.cubin"
            path.write_bytes(blob)
            text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
            line = next(x for x in text.splitlines() if "REG:" in x)  # REG:80 STACK:0 SHARED:1024 LOCAL:0 ...
            use = {k: int(v) for k, v in (f.split(":", 1) for f in line.split()) if v.isdigit()}
            row = out.setdefault(name, {"specializations": 0, "max_registers": 0, "max_stack_bytes": 0})
            row["specializations"] += 1
            row["max_registers"] = max(row["max_registers"], use["REG"])
            row["max_stack_bytes"] = max(row["max_stack_bytes"], use.get("STACK", 0) + use.get("LOCAL", 0))
    return out
