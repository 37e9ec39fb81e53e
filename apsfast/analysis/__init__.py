"""The paper's analysis of parameter sharing (§3.3, §5.2, Fig. 3–5, 8): measurements taken
during a search (:mod:`~apsfast.analysis.measure`), the figures drawn from runs
(:mod:`~apsfast.analysis.plots`) and the §5.2 experiment comparing the strategies
(:mod:`~apsfast.analysis.compare`). ``apsfast analyze`` is its command line."""
from apsfast.analysis.plots import AnalysisError, draw, read_run

__all__ = ["AnalysisError", "draw", "read_run"]
