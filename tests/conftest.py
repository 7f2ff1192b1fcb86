import os

import pytest
import torch

# Without a GPU, Triton kernels run in the CPU interpreter, and every launch is first compiled for
# the H100 / H200 (sm_90, Triton's pipeline down to a cubin) so that a kernel the GPU compiler would
# reject fails here, not on the device (tests/gpu_compile.py). PSA_TEST_COMPILE=off skips the compile
# (faster local runs); PSA_TEST_COMPILE=<capability> picks another target, e.g. 100.
COMPILE_TARGET = None if torch.cuda.is_available() else os.environ.get("PSA_TEST_COMPILE", "90")
if COMPILE_TARGET == "off":
    COMPILE_TARGET = None
if COMPILE_TARGET is not None:
    import gpu_compile

    gpu_compile.install(int(COMPILE_TARGET))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # ... and a launch's programs run in a shuffled order, as a GPU may run them (tests/program_order.py);
    # PSA_TEST_PROGRAM_ORDER=grid keeps the interpreter's own order
    if os.environ.get("PSA_TEST_PROGRAM_ORDER", "shuffled") != "grid":
        import program_order

        program_order.install()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if COMPILE_TARGET is None or not gpu_compile.launches:
        return
    usage = gpu_compile.resource_usage()
    rep = terminalreporter
    rep.section(f"Triton kernels compiled for sm_{COMPILE_TARGET}")
    n_launches, n_compiled = sum(gpu_compile.launches.values()), len(gpu_compile.cubins)
    rep.write_line(f"{n_launches} launches, {n_compiled} specializations")
    for name, row in sorted(usage.items()):
        spill = f", stack / spills <= {row['max_stack_bytes']} B" if row["max_stack_bytes"] else ""
        regs = row["max_registers"]
        rep.write_line(f"  {name}: {row['specializations']} compiled, <= {regs} registers{spill}")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
