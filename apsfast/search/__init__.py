"""The search and the retrain, in parts with one job each (who imports whom, top down):

* :mod:`~apsfast.search.schedule` — the search: warm-up, then weight steps on the searcher's
  archs with APS-T's transition and the searcher's steps; ``Search``, ``search``;
* :mod:`~apsfast.search.retrain` — training a searched arch from scratch; ``retrain``;
* :mod:`~apsfast.search.result` — the beam, the choice, ``result.json``, export and plots;
* :mod:`~apsfast.search.deploy` — ONNX and ``torch.export`` files of a run's network, and
  ``model.pt``'s program that loads with torch alone; ``export_onnx``, ``export_pt2``;
* :mod:`~apsfast.search.searchers` — what samples archs and learns which are good (the
  paper's LSTM, :mod:`~apsfast.search.controller`, and its REINFORCE,
  :mod:`~apsfast.search.policy_gradient`), behind one small interface;
* :mod:`~apsfast.search.steps` — the weight step and the validation scoring, plain functions;
* :mod:`~apsfast.search.strategies` — how P, Q evolve (APS-O/I/T, learned);
* :mod:`~apsfast.search.session` — process group, device, precision, checkpoints and exact
  resume, metrics, progress; :mod:`~apsfast.search.runs` — what a resume may change;
* :mod:`~apsfast.search.assemble` — data and supernet from the settings, checked before any
  work; :mod:`~apsfast.search.config` — the settings.
"""
from apsfast.search.checkpoint import CheckpointError
from apsfast.search.config import Config, ConfigError, presets
from apsfast.search.controller import Controller, Rollout
from apsfast.search.policy_gradient import Reinforce, flops_reward
from apsfast.search.deploy import export_onnx, export_pt2
from apsfast.search.result import load_exported, select_arch
from apsfast.search.retrain import retrain
from apsfast.search.schedule import Search, search
from apsfast.search.searchers import SEARCHERS, Searcher
from apsfast.search.settings import apply_overrides, load_config
from apsfast.search.strategies import STRATEGIES

__all__ = ["CheckpointError", "Config", "ConfigError", "Controller", "Reinforce", "Rollout", "SEARCHERS", "STRATEGIES",
           "Search", "Searcher", "apply_overrides", "export_onnx", "export_pt2", "flops_reward", "load_config",
           "load_exported", "presets", "retrain", "search", "select_arch"]
