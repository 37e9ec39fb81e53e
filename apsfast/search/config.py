"""The search configuration: every hyper-parameter in one typed tree, and the values its
fields allow. It knows nothing of how a run uses it.

A config is a :class:`Config` of sections (``model``, ``data``, ``train``, ``sharing``,
``controller``, ``tas``, ``ista``, ``reward``, ``result``, ``retrain``, ``analysis``, ``run``).
:func:`apsfast.search.settings.load_config` starts from the defaults, applies a preset
(``apsfast/search/presets/<name>.yaml``), then a YAML file, then ``section.key=value``
overrides, and checks every field's type and range; errors name the field, the value and what
was expected (the reading and type checks: :mod:`apsfast.search.overrides`; the ranges:
:mod:`apsfast.search.validation`). Every field carries its meaning in one line and its allowed
values (:func:`setting`): the configuration reference of the docs and ``--print-config``'s
comments are rendered from them (:mod:`apsfast.search.explain`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from apsfast.data import AUGMENTS, NORMALIZE
from apsfast.models.runtime import RUNTIMES
from apsfast.search.overrides import ConfigError  # noqa: F401  (the settings' one error, imported from here)
from apsfast.search.strategies import STRATEGIES, TransitionRate
from apsfast.sharing import PRECISIONS

PRESET_DIR = Path(__file__).with_name("presets")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16", "fp16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
SEARCHER_KINDS = ("reinforce", "tas", "ista")  # apsfast.search.searchers.SEARCHERS
BASELINES = ("moving_average", "leave_one_out")  # controller.baseline: apsfast.search.controller.Reinforce
SELECTS = ("likely", "closest")  # result.select: apsfast.search.result.select_arch


def setting(default: Union[Any, Callable[[], Any]], doc: str, allowed: Union[tuple, str, None] = None) -> Any:
    """A field of the config with its meaning in one line (``doc``) and, where its values are a
    fixed set or a range, ``allowed``: what the configuration reference and ``--print-config``
    show (:mod:`apsfast.search.explain`). A callable ``default`` makes each config its own
    (a fresh dict or list)."""
    metadata = {"doc": doc, "allowed": allowed}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The search space: a registered model (``apsfast models``) and its build options
    (``sharing``, ``device`` and ``dtype`` come from the strategy and the run); or a model of
    your own, ``name: package.module:factory`` (a name with a colon), built by
    ``factory(**options)`` and made a supernet by :func:`apsfast.convert` with the ``convert``
    settings (``widths``, ``round_to``, ``exclude``; ``input_size``, the example input's side,
    defaults to the data's image size). ``convert`` applies to such a model only."""

    name: str = setting("resnet20_cifar", "a registered search space (`apsfast models`), or `package.module:factory` "
                        "for a model of your own")
    options: dict = setting(dict, "the space's build options (`widths`, `layer_widths`, `residual`, `num_classes`, "
                            "`input_size`, `meta_width`, …), or the factory's keyword arguments")
    convert: dict = setting(dict, "`apsfast.convert`'s settings for a model of your own: `widths`, `round_to`, "
                            "`exclude`, `input_size`, `in_channels`")


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

    name: str = setting("embedded", "the image set: `embedded` (generated), `cifar10`, `folder` (alias `imagenet`), "
                        "or `package.module:factory` returning `(train, val)` sets")
    root: Optional[str] = setting(None, "the set's folder (`~` and environment variables expand); null for `embedded`")
    image_size: Optional[int] = setting(None, "a built-in set's image side; null: read from the images",
                                        allowed="> 0, or null")
    val_fraction: float = setting(0.5, "the part of the train split that scores archs for the controller (the rest "
                                  "trains the weights)", allowed="in (0, 1)")
    workers: Optional[int] = setting(None, "loader processes of a folder set or a data set of yours; null: chosen "
                                     "from the cores", allowed="≥ 0, or null")
    augment: str = setting("auto", "a folder set's training transform; `auto`: CIFAR's pad-crop-flip up to 64 px, a "
                           "random resized crop above", allowed=AUGMENTS)
    normalize: str = setting("auto", "a folder set's normalisation; `auto`: the set's own statistics up to 64 px, "
                             "ImageNet's above", allowed=NORMALIZE)
    options: dict = setting(dict, "the set's own options (`embedded`: `num_train`, `num_test`, `num_classes`; a "
                            "factory: its keyword arguments)")


@dataclass
class TrainConfig:
    """The meta-weights during the search: SGD with a cosine schedule over all epochs; the
    first ``warmup_epochs`` sample archs uniformly. ``steps_per_epoch`` caps an epoch.
    ``widest_every`` = k > 0 trains the widest arch instead of the sampled one at every k-th
    weight step, warm-up and search (the sandwich rule's upper bound): on a short search the
    wide candidates otherwise stay undertrained and the controller cannot tell them from the
    narrow ones. 0 (the default) samples every step, as the paper does."""

    epochs: int = setting(600, "epochs of the search, warm-up included", allowed="> 0")
    warmup_epochs: int = setting(200, "first epochs on uniformly sampled archs with P, Q frozen",
                                 allowed="in [0, epochs)")
    batch_size: int = setting(256, "global batch of a weight step (divided among the processes under torchrun)",
                              allowed="> 0")
    lr: float = setting(0.1, "SGD learning rate of the meta-weights, on a cosine schedule over all epochs",
                        allowed="> 0")
    momentum: float = setting(0.9, "SGD momentum", allowed="in [0, 1)")
    weight_decay: float = setting(2e-4, "SGD weight decay", allowed="≥ 0")
    nesterov: bool = setting(False, "Nesterov momentum")
    grad_clip: Optional[float] = setting(None, "clip the weights' gradient norm to this; null: no clipping",
                                         allowed="> 0, or null")
    steps_per_epoch: Optional[int] = setting(None, "cap on the weight steps of an epoch; null: the whole "
                                             "weight-training part", allowed="> 0, or null")
    widest_every: int = setting(0, "train the widest arch at every k-th weight step instead of the sampled one; 0: "
                                "never", allowed="≥ 0")


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
    the process's setting (docs/transition-cost.md)."""

    strategy: str = setting("transitional", "how P, Q evolve: APS-O, APS-I, APS-T (the transition) or trained by the "
                            "task loss (`learned`)", allowed=STRATEGIES)
    tau: Optional[float] = setting(None, "APS-T's transition rate (width-free eq. 5); null: steered so that Φ falls "
                                   "over the search phase", allowed="> 0, or null")
    transition_fall: float = setting(TransitionRate.FALL, "steered rate: the fraction of its start that Φ falls by",
                                     allowed="in (0, 1)")
    transition_end: float = setting(TransitionRate.END, "steered rate: the fraction of the search phase by which Φ "
                                    "has fallen, then holds", allowed="in (0, 1]")
    transforms_lr: Optional[float] = setting(None, "SGD rate of P, Q under `learned`; null: `train.lr`",
                                             allowed="> 0, or null")
    transition_every: int = setting(1, "one transition step of k·τ every k weight steps (a k-th of its cost)",
                                    allowed="≥ 1")
    transition_precision: Optional[str] = setting(None, "float32 matmul precision of the transition's products; null: "
                                                  "the process's", allowed=PRECISIONS)


@dataclass
class ControllerConfig:
    """The searcher (``kind``: ``reinforce``, the paper's LSTM trained by REINFORCE) and its
    training: ``samples`` archs per search step, one search step every ``every`` weight steps
    after warm-up. The LSTM has ``layers`` layers of ``hidden_size``; ``layer_input`` and
    ``flops_input`` feed it the decision's index and the MACs budget left (the authors'
    controller); ``weight_decay`` is Adam's. ``baseline``: REINFORCE's, ``moving_average`` (the
    paper's, decay ``baseline_decay``) or ``leave_one_out`` (each arch against the others
    scored on the same batch; needs ``samples`` ≥ 2). The entropy bonus ``entropy_weight`` holds
    over the first ``entropy_from`` of the search phase's weight steps, then falls linearly to
    ``entropy_end`` of itself at the phase's last step: the policy explores while the supernet
    changes and commits once it has settled."""

    kind: str = setting("reinforce", "the searcher: the paper's LSTM with REINFORCE, TAS or ISTA",
                        allowed=SEARCHER_KINDS)
    hidden_size: int = setting(64, "LSTM hidden size", allowed="> 0")
    layers: int = setting(1, "LSTM layers", allowed="> 0")
    layer_input: bool = setting(False, "feed the LSTM each decision's index (the authors' controller)")
    flops_input: bool = setting(False, "feed the LSTM the MACs budget left (the authors' controller)")
    lr: float = setting(1.6e-4, "Adam learning rate of the controller", allowed="> 0")
    betas: list = setting(lambda: [0.5, 0.999], "Adam betas of the controller", allowed="two numbers in [0, 1)")
    weight_decay: float = setting(0.0, "Adam weight decay of the controller", allowed="≥ 0")
    baseline_decay: float = setting(0.99, "decay of the moving-average baseline", allowed="in [0, 1)")
    baseline: str = setting("moving_average", "REINFORCE's baseline: a moving average, or each arch against the "
                            "others of its batch", allowed=BASELINES)
    entropy_weight: float = setting(4e-3, "weight of the policy's entropy bonus", allowed="≥ 0")
    entropy_end: float = setting(0.0, "the entropy bonus at the search phase's end, a fraction of `entropy_weight` "
                                 "(reached linearly from `entropy_from`)", allowed="in [0, 1]")
    entropy_from: float = setting(0.4, "the fraction of the search phase after which the entropy bonus falls "
                                  "towards `entropy_end`", allowed="in [0, 1)")
    samples: int = setting(1, "archs scored per search step (`leave_one_out` needs ≥ 2)", allowed="> 0")
    every: int = setting(1, "one search step every this many weight steps after warm-up", allowed="> 0")


@dataclass
class TasConfig:
    """The ``tas`` searcher (``controller.kind=tas``): width logits trained by Adam (``lr``,
    ``betas``, ``weight_decay``) on validation batches; two widths per decision sampled by
    Gumbel-softmax at a temperature falling by a cosine from ``tau_max`` to ``tau_min`` over the
    search phase's weight steps; ``flops_weight`` times the FLOPs loss (``±log`` of the expected
    MACs) while the most likely arch is outside ``[reward.flops_target − flops_tolerance·(the
    widest arch's MACs), target]``."""

    lr: float = setting(1e-3, "Adam learning rate of the width logits", allowed="> 0")
    betas: list = setting(lambda: [0.5, 0.999], "Adam betas of the width logits", allowed="two numbers in [0, 1)")
    weight_decay: float = setting(1e-3, "Adam weight decay of the width logits", allowed="≥ 0")
    tau_max: float = setting(5.0, "Gumbel-softmax temperature at the search phase's start (cosine to `tau_min`)",
                             allowed="≥ tau_min")
    tau_min: float = setting(0.1, "Gumbel-softmax temperature at the search phase's end", allowed="> 0")
    flops_weight: float = setting(2.0, "weight of the FLOPs loss on the expected MACs", allowed="≥ 0")
    flops_tolerance: float = setting(0.05, "the band below the target, as a fraction of the widest arch's MACs, where "
                                     "the FLOPs loss is off", allowed="in [0, 1)")


@dataclass
class IstaConfig:
    """The ``ista`` searcher (``controller.kind=ista``): the compressed code ``b = A z`` with
    ``ratio`` times as many rows as width candidates in all, recovered by solving the LASSO with
    L1 weight ``sparsity`` to its KKT conditions in at most ``iterations`` (accelerated) ISTA
    steps (a few hundred on the built-in spaces); each decision's probabilities the softmax of
    its candidates' scores over ``temperature``, which also weights the mixture of its two
    most probable widths in the validation forward; ``b`` trained by Adam (``lr``, ``betas``)
    with ``flops_weight`` and ``flops_tolerance`` as in ``tas``."""

    ratio: float = setting(0.75, "rows of the dictionary per width candidate (fewer measurements than candidates)",
                           allowed="in (0, 1)")
    iterations: int = setting(2000, "cap on the (accelerated) ISTA steps of one recovery", allowed="> 0")
    sparsity: float = setting(0.01, "L1 weight of the LASSO", allowed="≥ 0")
    temperature: float = setting(0.1, "softmax temperature of each decision's recovered scores: its probabilities "
                                 "and mixture weights", allowed="> 0")
    lr: float = setting(0.01, "Adam learning rate of the code `b`", allowed="> 0")
    betas: list = setting(lambda: [0.5, 0.999], "Adam betas of the code `b`", allowed="two numbers in [0, 1)")
    flops_weight: float = setting(2.0, "weight of the FLOPs loss, as in `tas`", allowed="≥ 0")
    flops_tolerance: float = setting(0.05, "the FLOPs loss's band below the target, as in `tas`", allowed="in [0, 1)")


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

    flops_target: Optional[float] = setting(None, "MACs budget (`40.8M`, `1.2G`); null: none",
                                            allowed="> 0, or null; not with latency_target")
    latency_target: Optional[float] = setting(None, "budget in milliseconds at `latency_batch` images on the run's "
                                              "device, from a measured per-layer table; null: none",
                                              allowed="> 0, or null; not with flops_target")
    latency_batch: int = setting(1, "images per timed forward of the latency table", allowed="≥ 1")
    latency_runtime: str = setting("torch", "the runtime the milliseconds are measured on: eager PyTorch on the run's "
                                   "device, `torch.compile`, or onnxruntime's CPU provider", allowed=RUNTIMES)
    latency_threads: Optional[int] = setting(1, "intra-op threads while the latency table is timed (pinned); null: "
                                             "the run's", allowed="≥ 1, or null")
    latency_table: Optional[str] = setting(None, "a latency table measured elsewhere (`apsfast bench latency --table "
                                           "PATH`) to read instead of measuring one; null: measured when the run "
                                           "starts")
    alpha: float = setting(0.0, "exponent of `F/T` in the reward at or under the target")
    beta: float = setting(-0.1, "exponent of `F/T` in the reward above the target (−0.1: soft, −1: MnasNet's hard "
                          "form)")


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

    beam: int = setting(10, "the most likely archs the result is chosen from", allowed="> 0")
    select: str = setting("likely", "the choice under a target: likely, the beam's most likely arch within it; "
                          "closest, its arch closest to it without exceeding it", allowed=SELECTS)
    portable: bool = setting(True, "store a weight-free `torch.export` program in every `model.pt`, so that it loads "
                             "with torch alone")


@dataclass
class RetrainConfig:
    """Training the chosen arch from scratch (``apsfast train``) on the whole train split:
    SGD with a cosine schedule, optional gradient clipping and label smoothing, and optional
    knowledge distillation (TAS's recipe) from ``distill``: ``widest`` (the search's supernet
    at its widest arch) or the path of an exported ``model.pt``, weighted ``distill_alpha`` at
    temperature ``distill_temperature``."""

    epochs: int = setting(200, "epochs of the retrain from scratch", allowed="> 0")
    batch_size: int = setting(128, "batch of the retrain", allowed="> 0")
    lr: float = setting(0.1, "SGD learning rate of the retrain, cosine schedule", allowed="> 0")
    momentum: float = setting(0.9, "SGD momentum", allowed="in [0, 1)")
    weight_decay: float = setting(5e-4, "SGD weight decay", allowed="≥ 0")
    nesterov: bool = setting(True, "Nesterov momentum")
    grad_clip: Optional[float] = setting(None, "clip the gradient norm to this; null: no clipping",
                                         allowed="> 0, or null")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", allowed="in [0, 1)")
    distill: Optional[str] = setting(None, "knowledge distillation from `widest` (the search's supernet at its widest "
                                     "arch) or an exported `model.pt`; null: none",
                                     allowed="widest, a model.pt path, or null")
    distill_alpha: float = setting(0.9, "weight of the distillation loss", allowed="in [0, 1]")
    distill_temperature: float = setting(4.0, "distillation temperature", allowed="> 0")
    steps_per_epoch: Optional[int] = setting(None, "cap on the steps of an epoch; null: the whole train split",
                                             allowed="> 0, or null")


@dataclass
class AnalysisConfig:
    """The paper's analysis measured during a search (off while ``every`` is 0): every
    ``every`` weight steps, the gradient alignment cos(g, g̃) of eq. 3 over ``pairs`` pairs of
    sampled archs on one batch, the coupled-gradient norm of §3.3, Φ, the mean and max
    validation accuracy of ``samples`` sampled archs, and each decision's probabilities."""

    every: int = setting(0, "record the paper's analysis (eq. 3's alignment, the coupled norm, Φ, sampled archs' "
                         "accuracy) every this many weight steps; 0: off", allowed="≥ 0")
    pairs: int = setting(4, "pairs of sampled archs for the gradient alignment", allowed="> 0")
    samples: int = setting(8, "sampled archs scored on a fixed validation batch", allowed="> 0")


@dataclass
class RunConfig:
    """Seed, device, precision and bookkeeping: a checkpoint every ``checkpoint_every`` weight
    steps and at every epoch's end, a metrics line every ``log_every`` steps, and per epoch
    the accuracy of the controller's most likely arch on ``eval_batches`` validation batches.
    ``amp``: ``bf16`` or ``fp16`` autocast (float32 master weights; fp16 with a loss scaler);
    ``channels_last``: that memory format for the supernet and its inputs; ``dist_backend``:
    the process group's under ``torchrun`` (``auto``: NCCL on GPUs, gloo on CPUs)."""

    seed: int = setting(0, "seed of every random stream of the run", allowed="≥ 0")
    device: str = setting("auto", "`auto`: CUDA where there is one, else CPU; or `cuda:N`", allowed=DEVICES)
    amp: str = setting("none", "autocast of the forward passes (float32 master weights; fp16 with a loss scaler)",
                       allowed=AMP)
    channels_last: bool = setting(False, "the supernet and its inputs in channels_last memory format")
    dist_backend: str = setting("auto", "process group under torchrun; `auto`: NCCL on GPUs, gloo on CPUs",
                                allowed=DIST_BACKENDS)
    checkpoint_every: int = setting(500, "a checkpoint every this many weight steps (and at every epoch's end)",
                                    allowed="> 0")
    log_every: int = setting(20, "a metrics line every this many weight steps", allowed="> 0")
    eval_batches: int = setting(10, "validation batches of the per-epoch accuracy of the most likely arch",
                                allowed="> 0")
    progress: bool = setting(True, "a progress bar per epoch where stderr is a terminal")


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
