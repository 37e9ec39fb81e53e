"""The zoo report: ``apsfast.convert`` on the classification CNNs of torchvision and timm.

``apsfast bench zoo`` builds every model (random weights, randomised batch-norm statistics,
eval mode) and converts it at ``2×3×S×S`` (``--size``, default 64) with
``widths=(0.5, 0.75, 1.0), round_to=8``, each in its own process under a time and an
address-space cap, and reports per model:

* **exact**: the standard arch computes what the model computes (max |difference| ≤ 1e-5 of
  the output's scale in float32), its MACs and parameters equal the original's (MACs counted
  by forward hooks on the original), and two random archs' exports compute what the supernet
  computes;
* **nothing searched**: exact, but with no decision (every width kept: the reason names the
  first op that pinned them);
* **refused**: convert's one-line ``ValueError`` (a branch on a tensor's values, memory that
  would not fit, …); where a memory refusal names ``meta_width="widest"`` as fitting, the model
  is converted again with it, as a user would, and the row says so; **failed**: anything else
  (an exception, a mismatch, the time or memory cap);
* the searched decisions, the ops convert pinned (no channel rule: kept at their widths),
  convert's time, and the peak memory of convert and of one training step of the supernet at
  batch 2, each as a multiple of the model's parameter memory.

A model that does not run at the input size is converted at the smallest of
:data:`LARGER_SIZES` it runs at (Inception-v3 needs 75×75), else listed as skipped.
``--meta-width`` converts with another ``meta_width=``. ``--quick``: three small models, a
smoke test.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from apsfast.benchmarks.common import environment, report

# torchvision's classification models that are not CNNs (attention throughout).
NOT_CNN_PREFIXES = ("vit_", "swin_", "maxvit_")
# One small model of each of timm's CNN families.
TIMM_CNNS = (
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "skresnet18", "resnest14d", "res2net50_14w_8s",
    "dpn68", "densenet121", "dla34", "hrnet_w18_small", "cspresnet50", "cspdarknet53", "darknet53",
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "mnasnet_100", "fbnetc_100", "spnasnet_100", "lcnet_050", "tinynet_e", "mixnet_s", "ghostnet_100",
    "rexnet_100", "regnetx_002", "regnety_002", "repvgg_a0", "mobileone_s0", "selecsls42b", "ese_vovnet19b_dw",
    "gernet_s", "hardcorenas_a", "convnext_atto", "convnextv2_atto", "nf_resnet26", "vgg11_bn", "xception41",
    "inception_v3", "hgnetv2_b0", "tresnet_m",
)
#: What convert's memory refusal says when ``meta_width="widest"`` fits (then taken).
FITS_AT_WIDEST = "meta_width='widest' would take"
#: The input sides tried, in order, for a model that does not run at ``--size``.
LARGER_SIZES = (75, 96, 128, 160, 224)
QUICK = ("torchvision:resnet18", "timm:efficientnet_b0", "torchvision:squeezenet1_1")
WIDTHS, ROUND_TO = (0.5, 0.75, 1.0), 8


def model_names(zoos: Sequence[str]) -> list[str]:
    """``zoo:name`` of every model the report covers."""
    from apsfast.models import zoo as zoo_module
    names = []
    if "torchvision" in zoos:
        models = zoo_module.import_torchvision().models
        names += [f"torchvision:{n}" for n in models.list_models(module=models)
                  if not n.startswith(NOT_CNN_PREFIXES)]
    if "timm" in zoos:
        names += [f"timm:{n}" for n in TIMM_CNNS]
    return names


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _pinned(messages: list[str]) -> tuple[int, str]:
    """The number of pinned ops in convert's warnings, and the first."""
    marker = "(the rest is searched): "  # convert's warning: a header, then the ops
    ops = [op for m in messages if marker in m for op in m.split(marker, 1)[1].split("; ")]
    return len(ops), (ops[0] if ops else "")


def _meta_width(text: str) -> Any:
    return text if text in ("sum", "widest") else float(text)


def check_one(spec: str, size: int, meta_width: Any = "sum") -> dict[str, Any]:
    """Convert one model and check it (run in a process of its own)."""
    import apsfast
    from apsfast.models import count_macs, zoo

    zoo_name, name = spec.split(":", 1)
    row: dict[str, Any] = {"model": spec}
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if zoo_name == "torchvision" and \
        name in ("googlenet", "inception_v3") else {}
    model = _randomised(zoo.build(zoo_name, name, **kwargs))
    params = sum(p.numel() for p in model.parameters())
    row["params_m"] = round(params / 1e6, 2)
    expected, tried = None, [size] + [s for s in LARGER_SIZES if s > size]
    for side in tried:
        x = torch.randn(2, 3, side, side)
        try:
            with torch.no_grad():
                expected = model(x)
            break
        except Exception as error:  # the model itself does not run at this size
            failure = f"does not run at {side}×{side}: {type(error).__name__}"
    if expected is None:
        row.update(outcome="skipped", reason=failure)
        return row
    if side != size:
        row["size"] = side
    before, started = _rss_mb(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            net = apsfast.convert(model, x, widths=WIDTHS, round_to=ROUND_TO, meta_width=meta_width)
        except ValueError as error:
            refusal = str(error).split("\n")[0]
            if FITS_AT_WIDEST not in refusal or "too much as well" in refusal:
                row.update(outcome="refused", reason=refusal)
                return row
            # A refusal for memory that names a meta width that fits: taken, as a user would.
            caught.clear()
            row["meta_width"] = "widest"
            try:
                net = apsfast.convert(model, x, widths=WIDTHS, round_to=ROUND_TO, meta_width="widest")
            except ValueError as again:
                row.update(outcome="refused", reason=str(again).split("\n")[0])
                return row
    row["convert_s"] = round(time.perf_counter() - started, 1)
    param_mb = params * 4 / 2**20
    row["convert_x"] = round((_rss_mb() - before) / param_mb, 1)
    row["estimate_x"] = round(net.peak_estimate / 2**20 / param_mb, 1)
    row["pinned"], first_pinned = _pinned([str(w.message) for w in caught])
    row["decisions"] = len(net.decisions())
    net.eval()
    standard = net.standard_arch()
    net.set_arch(standard)
    problems = []
    with torch.no_grad():
        got = net(x)
        scale = expected.abs().max().item() or 1.0
        if (got - expected).abs().max().item() > 1e-5 * scale:
            problems.append(f"standard arch differs by {(got - expected).abs().max().item():.2e}")
        static_macs = sum(count_macs(model, side).values())
        if net.flops(standard) != static_macs:
            problems.append(f"MACs {net.flops(standard)} vs {static_macs}")
        if net.params(standard) != params:
            problems.append(f"params {net.params(standard)} vs {params}")
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            arch = net.sample_uniform(generator)
            net.set_arch(arch)
            if (net.export(arch).eval()(x) - net(x)).abs().max().item() > 1e-5 * scale:
                problems.append("an export differs from the supernet")
    net.train()
    net.set_arch(net.sample_uniform(generator))
    loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(2, dtype=torch.long))
    loss.backward()
    row["step_x"] = round((_rss_mb() - before) / param_mb, 1)
    if problems:
        row.update(outcome="failed", reason="; ".join(problems))
    elif not row["decisions"]:
        row.update(outcome="nothing searched", reason=f"exact, every width kept: {first_pinned}"[:300])
    else:
        notes = [f"at {side}×{side} (does not run at {size}×{size})"] if side != size else []
        if "meta_width" in row:
            notes.append(f"at meta_width='widest' (convert's refusal at {meta_width!r}: {refusal.split(' (')[0]})")
        row.update(outcome="exact", reason="; ".join(notes))
    return row


def run_one(spec: str, size: int, timeout: float, memory_gb: float, meta_width: str = "sum") -> dict[str, Any]:
    """:func:`check_one` in a child process capped at ``timeout`` s and ``memory_gb`` GiB."""
    def cap() -> None:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-m", "apsfast.benchmarks.zoo", "--one", spec, "--size", str(size),
               "--meta-width", meta_width]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {"model": spec, "outcome": "failed", "reason": f"over the {timeout:.0f} s cap"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    if "MemoryError" in done.stderr or "can't allocate memory" in done.stderr:
        last = f"over the {memory_gb:g} GiB cap: {last}"
    return {"model": spec, "outcome": "failed", "reason": last[:300]}


def table(rows: list[dict]) -> str:
    """The per-model table, then the counts per zoo."""
    lines = ["| model | outcome | decisions | pinned ops | convert s | convert peak / params | step peak / params "
             "| estimate / params | params (M) | reason |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['outcome']} | {r.get('decisions', '')} | {r.get('pinned', '')} | "
                     f"{r.get('convert_s', '')} | {r.get('convert_x', '')} | {r.get('step_x', '')} | "
                     f"{r.get('estimate_x', '')} | "
                     f"{r.get('params_m', '')} | {r.get('reason', '').replace('|', '/')} |")
    outcomes = ("exact", "nothing searched", "refused", "failed", "skipped")
    lines += ["", "| zoo | models | " + " | ".join(outcomes) + " |", "|---|---:|" + "---:|" * len(outcomes)]
    for zoo in sorted({r["model"].split(":")[0] for r in rows}):
        mine = [r for r in rows if r["model"].startswith(zoo + ":")]
        counts = [sum(r["outcome"] == o for r in mine) for o in outcomes]
        lines.append(f"| {zoo} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench zoo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoos", default="torchvision,timm", help="comma-separated: torchvision, timm")
    parser.add_argument("--models", default=None, help="comma-separated zoo:name (default: every CNN of --zoos)")
    parser.add_argument("--size", type=int, default=64, help="input side (default 64)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space cap per model (default 8)")
    parser.add_argument("--meta-width", default="sum", type=_meta_width,
                        help="convert's meta_width: sum (default), widest or a number k >= 1")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.jsonl")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's model
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(check_one(args.one, args.size, args.meta_width)), flush=True)
        return 0
    specs = args.models.split(",") if args.models else list(QUICK) if args.quick else \
        model_names([z.strip() for z in args.zoos.split(",") if z.strip()])
    rows = []
    for index, spec in enumerate(specs, 1):
        row = run_one(spec, args.size, args.timeout, args.memory_gb, str(args.meta_width))
        print(f"[{index}/{len(specs)}] {spec}: {row['outcome']} {row.get('reason', '')}"[:200], flush=True)
        rows.append(row)
    command = "apsfast bench zoo " + " ".join(argv if argv is not None else sys.argv[1:])
    report("convert on the model zoos", environment(command), rows, table(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
