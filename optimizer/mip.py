"""MIP solving shared by the planners: pulp's HiGHS (through highspy) warm-started from a known solution, else
CBC, quiet either way."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import pulp


class _WarmHiGHS(pulp.HiGHS):
    """pulp's HiGHS, started from a known solution (pulp 3 passes no warm start to HiGHS)."""

    def __init__(self, start: Sequence[float], **options):
        super().__init__(**options)
        self.start = list(start)

    def createAndConfigureSolver(self, lp):
        with quiet_stdout():  # HiGHS prints its banner from C++ when constructed, before any option applies
            super().createAndConfigureSolver(lp)

    def callSolver(self, lp):
        import highspy

        solution = highspy.HighsSolution()
        solution.col_value = self.start
        solution.value_valid = True
        lp.solverModel.setSolution(solution)
        lp.solverModel.run()


@contextlib.contextmanager
def quiet_stdout():
    """Silence file descriptor 1 (C and C++ writes included) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def warm_solver(values: dict[str, float], model: pulp.LpProblem, time_limit: float) -> pulp.LpSolver:
    """HiGHS through highspy when present, else CBC; both warm-started from the heuristic plan."""
    if pulp.HiGHS().available():
        ordered = [values.get(variable.name, 0) for variable in model.variables()]
        return _WarmHiGHS(ordered, msg=False, timeLimit=time_limit, threads=1)
    for variable in model.variables():
        variable.setInitialValue(values.get(variable.name, 0))
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=True)
