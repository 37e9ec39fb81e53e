"""The search configuration: every hyper-parameter in one typed tree, and the values its
fields allow. It knows nothing of how a run uses it.

A config is a :class:`Config` of sections (``model``, ``data``, ``train``, ``sharing``,
``controller``, ``tas``, ``ista``, ``reward``, ``result``, ``retrain``, ``analysis``, ``run``).
:func:`apsfast.search.settings.load_config` starts from the defaults, applies a preset
(``apsfast/search/presets/<name>.yaml``), then a YAML file, then ``section.key=value``
overrides, and checks every field's type and range; errors name the field, the value and what
was expected (the reading and type checks: :mod:`apsfast.search.overrides`; the ranges:
:mod:`apsfast.search.validation`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from apsfast.search.overrides import ConfigError  # noqa: F401  (the settings' one error, imported from here)

PRESET_DIR = Path(__file__).with_name("presets")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16", "fp16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
SEARCHER_KINDS = ("reinforce", "tas", "ista")  # apsfast.search.searchers.SEARCHERS
BASELINES = ("moving_average", "leave_one_out")  # controller.baseline: apsfast.search.controller.Reinforce
SELECTS = ("likely", "closest")  # result.select: apsfast.search.result.select_arch


@dataclass
class ModelConfig:
    """The search space: a registered model (``apsfast models``) and its build options
    (``sharing``, ``device`` and ``dtype`` come from the strategy and the run); or a model of
    your own, ``name: package.module:factory`` (a name with a colon), built by
    ``factory(**options)`` and made a supernet by :func:`apsfast.convert` with the ``convert``
    settings (``widths``, ``round_to``, ``exclude``; ``input_size``, the example input's side,
    defaults to the data's image size). ``convert`` applies to such a model only."""

    name: str = "resnet20_cifar"
    options: dict = field(default_factory=dict)
    convert: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """The data: ``embedded`` (generated, nothing to pass), ``cifar10`` (``root``: the folder
    holding ``cifar-10-batches-py``) or ``folder`` (alias ``imagenet``: ``root`` with
    ``train/`` and ``val/`` class folders; ``image_size`` read from the images when not set).
    ``root`` expands ``~`` and environment variables. A folder set's training transform is
    ``augment`` (``auto``: CIFAR's pad-crop-flip up to 64 px, ImageNet's random resized crop
    above; or ``crop-flip``, ``resized-crop``, ``none``) and its normalisation ``normalize``
    (``auto``: the set's own statistics up to 64 px, ImageNet's above; or ``data``,
    ``imagenet``). The train split is divided into weight-training and controller-validation
    parts."""

    name: str = "embedded"
    root: Optional[str] = None
    image_size: Optional[int] = None
    val_fraction: float = 0.5
    workers: Optional[int] = None
    augment: str = "auto"
    normalize: str = "auto"
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The meta-weights during the search: SGD with a cosine schedule over all epochs; the
    first ``warmup_epochs`` sample archs uniformly. ``steps_per_epoch`` caps an epoch.
    ``widest_every`` = k > 0 trains the widest arch instead of the sampled one at every k-th
    weight step, warm-up and search (the sandwich rule's upper bound): on a short search the
    wide candidates otherwise stay undertrained and the controller cannot tell them from the
    narrow ones. 0 (the default) samples every step, as the paper does."""

    epochs: int = 600
    warmup_epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    grad_clip: Optional[float] = None
    steps_per_epoch: Optional[int] = None
    widest_every: int = 0


@dataclass
class SharingConfig:
    """The APS strategy. ``tau`` is APS-T's transition rate (eq. 5 at the width-free rate, one
    step per weight step after warm-up): ``null`` (the default) steers it so that Φ
    falls by ``transition_fall`` (a fraction of its start; APS-I's Φ is 59% below APS-O's on the
    demo's space) along a line that ends at the fraction ``transition_end`` of the search phase,
    whatever its length, and then holds, so that the meta-weights adapt to the transforms they
    end with; a number fixes it.
    ``transforms_lr`` is the SGD rate of P, Q under ``learned`` (default: ``train.lr``).
    ``transition_every`` = k > 1 takes one step of k·τ every k weight steps instead of one of τ
    after each: a k-th of the transition's cost, for a coarser path of P, Q.
    ``transition_precision``: torch's float32 matmul precision for the transition's products
    (``highest``, ``high``: TF32 on GPUs, ``medium``: bf16 gradient products); ``null`` leaves
    the process's setting (README, the transition's cost)."""

    strategy: str = "transitional"
    tau: Optional[float] = None
    transition_fall: float = 0.35
    transition_end: float = 0.65
    transforms_lr: Optional[float] = None
    transition_every: int = 1
    transition_precision: Optional[str] = None


@dataclass
class ControllerConfig:
    """The searcher (``kind``: ``reinforce``, the paper's LSTM trained by REINFORCE) and its
    training: ``samples`` archs per search step, one search step every ``every`` weight steps
    after warm-up. The LSTM has ``layers`` layers of ``hidden_size``; ``layer_input`` and
    ``flops_input`` feed it the decision's index and the MACs budget left (the authors'
    controller); ``weight_decay`` is Adam's. ``baseline``: REINFORCE's, ``moving_average`` (the
    paper's, decay ``baseline_decay``) or ``leave_one_out`` (each arch against the others
    scored on the same batch; needs ``samples`` ≥ 2)."""

    kind: str = "reinforce"
    hidden_size: int = 64
    layers: int = 1
    layer_input: bool = False
    flops_input: bool = False
    lr: float = 1.6e-4
    betas: list = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    baseline_decay: float = 0.99
    baseline: str = "moving_average"
    entropy_weight: float = 4e-3
    samples: int = 1
    every: int = 1


@dataclass
class TasConfig:
    """The ``tas`` searcher (``controller.kind=tas``): width logits trained by Adam (``lr``,
    ``betas``, ``weight_decay``) on validation batches; two widths per decision sampled by
    Gumbel-softmax at a temperature falling by a cosine from ``tau_max`` to ``tau_min`` over the
    search phase's weight steps; ``flops_weight`` times the FLOPs loss (``±log`` of the expected
    MACs) while the most likely arch is outside ``[reward.flops_target − flops_tolerance·(the
    widest arch's MACs), target]``."""

    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.1
    flops_weight: float = 2.0
    flops_tolerance: float = 0.05


@dataclass
class IstaConfig:
    """The ``ista`` searcher (``controller.kind=ista``): the compressed code ``b = A z`` with
    ``ratio`` times as many rows as width candidates in all, recovered by solving the LASSO with
    L1 weight ``sparsity`` to its KKT conditions in at most ``iterations`` (accelerated) ISTA
    steps (a few hundred on the built-in spaces); ``b`` trained by Adam (``lr``, ``betas``)
    with ``flops_weight`` and ``flops_tolerance`` as in ``tas``."""

    ratio: float = 0.75
    iterations: int = 2000
    sparsity: float = 0.01
    lr: float = 0.01
    betas: list = field(default_factory=lambda: [0.5, 0.999])
    flops_weight: float = 2.0
    flops_tolerance: float = 0.05


@dataclass
class RewardConfig:
    """``acc·(F/T)^α`` at or below the target ``flops_target`` (MACs; ``40M``, ``1.2G`` are
    accepted), ``acc·(F/T)^β`` above it; no target: the accuracy alone. ``latency_target``
    instead (one of the two, or neither): ``F`` and ``T`` are milliseconds at
    ``latency_batch`` images on ``latency_runtime`` (``torch``: eager PyTorch on the run's
    device; ``torch.compile``; ``onnxruntime``: its CPU provider, the graph ``apsfast export
    --onnx`` writes) with ``latency_threads`` intra-op threads (null: the run's), predicted from
    a per-layer table measured when the run starts (``latency.json`` in the run's folder;
    :mod:`apsfast.search.budget`), or read from ``latency_table``: a table measured once
    elsewhere (``apsfast bench latency --table PATH`` on the machine the network will run on);
    the searchers' cost loss and the result's choice then work in milliseconds too."""

    flops_target: Optional[float] = None
    latency_target: Optional[float] = None
    latency_batch: int = 1
    latency_runtime: str = "torch"
    latency_threads: Optional[int] = 1
    latency_table: Optional[str] = None
    alpha: float = 0.0
    beta: float = -0.1


@dataclass
class ResultConfig:
    """The beam search of the ``beam`` most likely archs the result is chosen from, and the
    rule that chooses under a target (``select``): ``likely`` (the default), the most likely arch
    of the beam within the budget, or ``closest``, the beam's arch closest to the target without
    exceeding it (TAS and ISTA export their argmax whatever the rule). On the demo both retrain
    to the same accuracy, ``likely`` at 15% fewer MACs (``bench/results/cpu-select.md``).
    ``portable``: every ``model.pt`` (the search's and the retrain's) also holds a
    ``torch.export`` program of the network, so that it loads with torch alone (tracing it
    takes about a second at the end of a run)."""

    beam: int = 10
    select: str = "likely"
    portable: bool = True


@dataclass
class RetrainConfig:
    """Training the chosen arch from scratch (``apsfast train``) on the whole train split:
    SGD with a cosine schedule, optional gradient clipping and label smoothing, and optional
    knowledge distillation (TAS's recipe) from ``distill``: ``widest`` (the search's supernet
    at its widest arch) or the path of an exported ``model.pt``, weighted ``distill_alpha`` at
    temperature ``distill_temperature``."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    distill: Optional[str] = None
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    steps_per_epoch: Optional[int] = None


@dataclass
class AnalysisConfig:
    """The paper's analysis measured during a search (off while ``every`` is 0): every
    ``every`` weight steps, the gradient alignment cos(g, g̃) of eq. 3 over ``pairs`` pairs of
    sampled archs on one batch, the coupled-gradient norm of §3.3, Φ, the mean and max
    validation accuracy of ``samples`` sampled archs, and each decision's probabilities."""

    every: int = 0
    pairs: int = 4
    samples: int = 8


@dataclass
class RunConfig:
    """Seed, device, precision and bookkeeping: a checkpoint every ``checkpoint_every`` weight
    steps and at every epoch's end, a metrics line every ``log_every`` steps, and per epoch
    the accuracy of the controller's most likely arch on ``eval_batches`` validation batches.
    ``amp``: ``bf16`` or ``fp16`` autocast (float32 master weights; fp16 with a loss scaler);
    ``channels_last``: that memory format for the supernet and its inputs; ``dist_backend``:
    the process group's under ``torchrun`` (``auto``: NCCL on GPUs, gloo on CPUs)."""

    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    dist_backend: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 20
    eval_batches: int = 10
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    tas: TasConfig = field(default_factory=TasConfig)
    ista: IstaConfig = field(default_factory=IstaConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    result: ResultConfig = field(default_factory=ResultConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the whole config: a checkpoint records it so that a resume with
        other settings is refused."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def presets() -> list[str]:
    """The names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def dump_config(config: Config) -> str:
    """The config as YAML (what ``apsfast search`` writes beside its results)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
