"""The search: the architecture controller and its REINFORCE training, the FLOPs-penalised
reward, and the beam search of the most likely architectures."""
from apsfast.search.controller import Controller, Reinforce, Rollout, flops_reward

__all__ = ["Controller", "Reinforce", "Rollout", "flops_reward"]
