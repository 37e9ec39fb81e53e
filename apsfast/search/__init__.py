"""The search: the architecture controller and its REINFORCE training, the FLOPs-penalised
reward, the APS strategies, the search loop with its checkpoints and metrics, the beam search
of the most likely architectures, and retraining the chosen one from scratch."""
from apsfast.search.checkpoint import CheckpointError
from apsfast.search.config import Config, ConfigError, apply_overrides, load_config, presets
from apsfast.search.controller import Controller, Reinforce, Rollout, flops_reward
from apsfast.search.loop import Search, load_exported, search, select_arch
from apsfast.search.retrain import retrain
from apsfast.search.strategies import STRATEGIES

__all__ = ["CheckpointError", "Config", "ConfigError", "Controller", "Reinforce", "Rollout", "STRATEGIES", "Search",
           "apply_overrides", "flops_reward", "load_config", "load_exported", "presets", "retrain", "search",
           "select_arch"]
