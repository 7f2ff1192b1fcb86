"""Run the interpreter's programs of a launch in a shuffled order (CPU tests).

Triton's interpreter runs a launch's programs one after another in grid order, while a GPU runs them
concurrently in any order. A kernel whose result depends on which program runs first (one program
reading what another writes in the same launch, a count claimed by atomics assumed to follow program
ids) passes in grid order and can fail on the device. With `install()`, every launch visits its
programs in a fresh permutation (seeded by the launch's number, so a run is reproducible): each program
still runs exactly once, and a test comparing a kernel with its reference then also says that the
kernel does not depend on program order.

How: the interpreter announces the grid (`set_grid_dim`) and then each program's ids in order
(`set_grid_idx`); the k-th announcement is mapped to the k-th grid point of the permutation.
"""

from __future__ import annotations

import random

installed = False
launches = 0  # launches seen (the seed of each one's permutation)


def install() -> None:
    """Shuffle the program order of every interpreted launch from now on (idempotent)."""
    global installed
    if installed:
        return
    from triton.runtime.interpreter import interpreter_builder as builder

    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state = {"dims": (1, 1, 1), "order": [0]}

    def set_grid_dim(nx: int, ny: int, nz: int) -> None:
        global launches
        order = list(range(nx * ny * nz))
        random.Random(launches).shuffle(order)
        launches += 1
        state["dims"], state["order"] = (nx, ny, nz), order
        set_dim(nx, ny, nz)

    def set_grid_idx(x: int, y: int, z: int) -> None:
        _, ny, nz = state["dims"]
        k = state["order"][(x * ny + y) * nz + z]  # the grid loop's k-th program runs grid point order[k]
        set_idx(k // (ny * nz), (k // nz) % ny, k % nz)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    installed = True
