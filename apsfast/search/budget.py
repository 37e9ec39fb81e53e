"""What a search's budget counts and the target it must meet, chosen in one place.

* ``reward.flops_target`` (or no target): an arch's cost is its MACs (``Supernet.flops``).
* ``reward.latency_target``: its cost is its predicted latency in milliseconds at
  ``reward.latency_batch`` images on the run's device, from a per-layer table
  (:mod:`apsfast.models.latency`) measured once when the run starts and kept in the run's
  folder as ``latency.json`` (read back on a resume; measured again when it was measured for
  another device, batch, thread count or space).

Every searcher (REINFORCE's reward, TAS's and ISTA's cost loss on the expected cost) and the
result's choice (:func:`apsfast.search.result.select_arch`) read the :class:`Budget`, so all of
them work in the budget's unit. The latency target can only be checked against the space
once the table is measured, which needs the device: that check runs right after measuring,
before any training (the MACs target is checked with the rest of the settings, before the
run's folder is created).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from apsfast import models
from apsfast.models.latency import LatencyTable, load_or_measure, read_table
from apsfast.search.config import Config, ConfigError

Arch = list[int]
LATENCY = "latency.json"


@dataclass(frozen=True)
class Budget:
    """An arch's cost and the target (``None``: unconstrained) in one unit.

    ``unit`` is ``MACs`` or ``ms``; ``key`` the field of a result candidate that holds the
    cost (``flops`` or ``latency_ms``); ``layer_costs(arch)`` (``{layer: cost}``, summing to
    ``cost(arch)``) and ``layer_keys(arch)`` (``{layer: what its cost depends on}``) let TAS
    and ISTA compute the expected cost (``None``: the layers' MACs)."""

    cost: Callable[[Arch], float]
    target: Optional[float] = None
    unit: str = "MACs"
    key: str = "flops"
    layer_costs: Optional[Callable[[Arch], dict[str, float]]] = None
    layer_keys: Optional[Callable[[Arch], dict[str, Any]]] = None
    table: Optional[LatencyTable] = None

    @property
    def setting(self) -> str:
        """The setting the target comes from."""
        return "reward.latency_target" if self.key == "latency_ms" else "reward.flops_target"


def macs_budget(config: Config, flops: Callable[[Arch], float]) -> Budget:
    """MACs against ``reward.flops_target``."""
    return Budget(flops, config.reward.flops_target)


def resolve_budget(config: Config, flops: Callable[[Arch], float], budget: Optional[Budget]) -> Budget:
    """What a searcher weighs: ``budget``, or by default MACs against ``reward.flops_target``; a
    latency target without its budget (which measures the table) is an error."""
    if budget is not None:
        return budget
    if config.reward.latency_target is not None:
        raise ValueError("reward.latency_target is set: pass budget= (apsfast.search.budget.search_budget, which "
                         "measures the latency table) to the searcher")
    return macs_budget(config, flops)


def latency_budget(table: LatencyTable, target: Optional[float]) -> Budget:
    """Predicted milliseconds (``table``) against ``target``."""
    return Budget(table.predict, target, "ms", "latency_ms", table.layer_latency, table.layer_keys, table)


def check_latency_target(config: Config, net: models.Supernet, table: LatencyTable) -> None:
    """The latency target must be reachable: at least the narrowest arch's predicted latency."""
    target, smallest = config.reward.latency_target, table.predict(net.min_arch())
    if target is not None and target < smallest:
        raise ConfigError(f"reward.latency_target = {target:.4g} ms is below the predicted latency of the narrowest "
                          f"arch of {net.name} ({smallest:.4g} ms at {table.batch} images on "
                          f"{table.key['device']}): no arch can meet it")


def search_budget(config: Config, net: models.Supernet, session) -> Budget:
    """The budget of a search run in ``session``: MACs, or (``reward.latency_target``) the
    latency table read from or measured into the run's folder (process 0 measures, the others
    read its file), then the target checked against it."""
    reward = config.reward
    if reward.latency_target is None:
        budget = macs_budget(config, net.flops)
        _warn_above_widest(session, budget, net)
        return budget
    path = session.out / LATENCY
    if session.main:
        session.log(f"reward.latency_target = {reward.latency_target:g} ms at {reward.latency_batch} images on "
                    f"{reward.latency_runtime}: the per-layer latency table comes first, then the target is checked "
                    f"against it, before training")
        if reward.latency_table is not None:  # measured elsewhere: copied into the run, read from there on a resume
            source = path if path.is_file() else reward.latency_table
            try:
                table, note = read_table(source, net, reward.latency_batch, reward.latency_runtime, session.device)
            except ValueError as error:
                raise ConfigError(f"reward.latency_table: {error}") from None
            if source != path:
                path.parent.mkdir(parents=True, exist_ok=True)
                table.save(path)
        else:
            table, note = load_or_measure(path, net, reward.latency_batch, session.device,
                                          runtime=reward.latency_runtime, threads=reward.latency_threads,
                                          progress=lambda total, desc: session.progress(total, 0, desc))
        session.log(note)
    session.processes.barrier()
    if not session.main:  # process 0's table, so every process computes the same rewards
        table = LatencyTable.from_json(net, json.loads(path.read_text()), session.device)
    check_latency_target(config, net, table)
    session.log(f"predicted latency: {table.predict(net.min_arch()):.4g} ms (narrowest arch) to "
                f"{table.predict(net.max_arch()):.4g} ms (widest); target {reward.latency_target:g} ms")
    budget = latency_budget(table, reward.latency_target)
    _warn_above_widest(session, budget, net)
    return budget


def _warn_above_widest(session, budget: Budget, net: models.Supernet) -> None:
    """A ``warning:`` line where the target is at or above the widest arch's cost: every arch
    meets it, so it steers nothing (the search runs as without one)."""
    if budget.target is None:
        return
    widest = budget.cost(net.max_arch())
    if budget.target >= widest:
        session.log(f"warning: {budget.setting} = {budget.target:.4g} {budget.unit} is at or above the widest arch's "
                    f"{widest:.4g} {budget.unit}: every arch meets it, so it steers nothing (lower it below "
                    f"{widest:.4g} to search under a budget)")
