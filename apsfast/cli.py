"""The ``apsfast`` command line:
``apsfast search | train | export | analyze | compare | models | demo | bench | info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import apsfast
from apsfast import _backends
from apsfast._build import check_errors, collect_info


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.check:
        info["bad_input_raises"] = check_errors()
    status = 0 if all(r.startswith("ok") for r in info.get("bad_input_raises", {}).values()) else 1
    if args.json:
        print(json.dumps(info, indent=2))
        return status
    build = info["build"]
    print(f"apsfast {info['apsfast']}  (python {info['python']}, torch {info['torch']}, "
          f"CUDA {info['torch_cuda'] or 'none'}, triton {info['triton'] or 'not installed'})")
    if build:
        print(f"built against torch {build['torch']} on {build['built']}: extensions "
              f"{', '.join(build['extensions']) or 'none'}"
              + (f", CUDA archs {build['cuda_archs']}" if build.get("cuda_archs") else ""))
    else:
        print("not built by setup.py: only the reference backend is available")
    print("backends:")
    for name, state in info["backends"].items():
        print(f"  {name:<10} {state}")
    routes = ", ".join(f"{op} → {name}" for op, name in info["defaults"].items())
    print(f"default dispatch: {routes or 'nothing'} (where built); every other op → reference")
    if info["forced_backend"]:
        print(f"{_backends.ENV_VAR}={info['forced_backend']} forces that backend for every op")
    if args.check:
        print("bad input raises:")
        for name, result in info["bad_input_raises"].items():
            print(f"  {name:<10} {result}")
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from apsfast import demo
    try:
        demo.main(args.out, args.set or [])
    except _user_errors() as error:
        raise _fail("demo", error) from None
    return 0


def _fail(command: str, error: BaseException) -> SystemExit:
    return SystemExit(f"apsfast {command}: {error}")


# What a user gets wrong (a field, a path, a folder in use, a foreign checkpoint) and a run
# that diverged (its message names the step and the checkpoint to resume from): one clear
# line, no traceback. Anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from apsfast.search.checkpoint import CheckpointError
    from apsfast.search.config import ConfigError
    return (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
            FloatingPointError)


def cmd_search(args: argparse.Namespace) -> int:
    from apsfast.search import assemble
    from apsfast.search.explain import commented_yaml
    from apsfast.search.runs import saved_config
    from apsfast.search.schedule import search
    from apsfast.search.settings import load_config
    try:
        if args.resume and args.preset is None and args.config is None:
            if args.out is None:
                raise SystemExit("apsfast search: --resume needs --out RUN (the folder of the run to continue)")
            # The run's own settings; --model may only repeat its model.
            config = saved_config(args.out, ([("model.name", args.model)] if args.model else []) + (args.set or []))
        else:
            config = load_config(args.preset, args.config, args.set or [], model=args.model)
        if args.print_config:
            assemble.check(config, with_data=config.data.name == "embedded" or config.data.root is not None)
            print(commented_yaml(config), end="")
            return 0
        name = config.model.name.replace(":", ".") if args.model or not args.preset else args.preset
        out = args.out or os.path.join("runs", f"{name}-{config.sharing.strategy}")
        search(config, out, resume=args.resume)
    except _user_errors() as error:
        raise _fail("search", error) from None
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from apsfast.search.baselines import retrain_top, retrain_uniform
    from apsfast.search.retrain import retrain
    try:
        if args.uniform is not None:
            _train_uniform(args, retrain_uniform)
        elif args.run is None:
            raise SystemExit("apsfast train: pass RUN (a search's output folder), or --uniform RATIO with --preset")
        elif args.preset is not None or args.config is not None:
            raise SystemExit("apsfast train: --preset/--config go with --uniform; a search's retrain reads the "
                             "search's settings (change them with -s)")
        elif args.top is not None:
            retrain_top(args.run, args.top, args.out, args.set or [], resume=args.resume)
        else:
            retrain(args.run, args.out, args.set or [], resume=args.resume)
    except _user_errors() + (ValueError,) as error:
        raise _fail("train", error) from None
    return 0


def _train_uniform(args: argparse.Namespace, retrain_uniform) -> None:
    """``apsfast train --uniform RATIO``: the settings of ``--preset``/``--config`` or of RUN's search."""
    from apsfast.search.result import read_result
    from apsfast.search.settings import apply_overrides, config_from_dict, load_config
    if args.top is not None:
        raise SystemExit("apsfast train: --top and --uniform are two different retrains; pass one")
    overrides = args.set or []
    if args.run is not None:
        if args.preset is not None or args.config is not None:
            raise SystemExit("apsfast train: --uniform takes RUN or --preset/--config, not both")
        result, path = read_result(args.run)
        config = apply_overrides(config_from_dict(result["config"]), overrides)
        out = args.out or os.path.join(path.parent, "retrain", f"uniform-{args.uniform:g}")
        source = f"{path.parent} --uniform {args.uniform:g}"
    elif args.preset is None and args.config is None:
        raise SystemExit("apsfast train: --uniform needs --preset P (or --config FILE, or a search's RUN folder)")
    else:
        config = load_config(args.preset, args.config, overrides)
        name = args.preset or config.model.name
        out = args.out or os.path.join("runs", f"{name}-uniform-{args.uniform:g}")
        given = f"--preset {args.preset}" if args.preset else f"--config {args.config}"
        source = f"--uniform {args.uniform:g} {given}"
    retrain_uniform(config, args.uniform, out, resume=args.resume, source=source)


def cmd_export(args: argparse.Namespace) -> int:
    from apsfast.search import deploy
    if args.onnx is None and args.pt2 is None:
        raise SystemExit("apsfast export: pass --onnx PATH and/or --pt2 PATH (the files to write)")
    try:
        # Every path and package checked before any work.
        onnx, pt2 = (deploy.output_path(path) if path else None for path in (args.onnx, args.pt2))
        opset = deploy.OPSET if args.opset is None else args.opset
        if onnx:
            deploy.check_onnx_export(opset)
        model = deploy.load_model(args.run, searched=args.searched)
        print(f"exporting {model.source}: input [batch, {', '.join(map(str, model.input_shape))}], batch dynamic")
        if onnx:
            deploy.write_onnx(model, onnx, opset)
            try:
                note = f"; onnxruntime's outputs are within {deploy.onnx_difference(model, onnx):.1e} of PyTorch's"
            except ImportError:
                note = "; not run (pip install onnxruntime to check it)"
            print(f"wrote {onnx} (ONNX opset {opset}, input 'input', output 'logits'){note}")
        if pt2:
            deploy.write_pt2(model, pt2)
            print(f"wrote {pt2} (torch.export program with its weights: torch.export.load(PATH).module())")
    except _user_errors() + (ValueError, ImportError, IsADirectoryError) as error:
        raise _fail("export", error) from None
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from apsfast.analysis import AnalysisError, draw
    try:
        if args.compare is not None:
            from apsfast.analysis.compare import compare, parse_list
            if args.runs:
                raise SystemExit("apsfast analyze: --compare runs its own searches; pass no RUN with it")
            if args.preset is None and args.config is None:
                raise SystemExit("apsfast analyze: --compare needs --preset P (or --config FILE)")
            strategies = parse_list(args.compare, "--compare")
            seeds = parse_list(args.seeds, "--seeds", int)
            out = args.out or os.path.join("runs", f"{args.preset or 'config'}-compare")
            compare(strategies, out, preset=args.preset, config_file=args.config, overrides=args.set or [],
                    seeds=seeds, retrained=args.retrain)
            return 0
        if args.preset is not None or args.config is not None or args.set or args.retrain:
            raise SystemExit("apsfast analyze: --preset, --config, -s and --retrain go with --compare")
        if not args.runs:
            raise SystemExit("apsfast analyze: pass one or more search output folders (or --compare)")
        for path in draw(args.runs, args.out):
            print(path)
    except _user_errors() + (AnalysisError,) as error:
        raise _fail("analyze", error) from None
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from apsfast.search import compare
    try:
        return compare.main(args.rest, prog="apsfast compare")
    except _user_errors() as error:
        raise _fail("compare", error) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from importlib import import_module
    suite = import_module(f"apsfast.benchmarks.{args.suite.replace('-', '_')}")
    return suite.main(args.rest, prog=f"apsfast bench {args.suite}")


def _option(text: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (``widths=[8,16]``) or else a string (``residual=stage``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# The spaces of the paper's experiments: the table of docs/search-spaces.md.
PAPER_SPACES = (("resnet20_cifar", {}), ("resnet20_cifar", {"widths": "compact"}), ("resnet56_cifar", {}),
                ("resnet18_imagenet", {}), ("mobilenetv2_imagenet", {}))


def cmd_models(args: argparse.Namespace) -> int:
    from apsfast.models import summary
    options = dict(args.option or [])
    if args.name is None and options:
        raise SystemExit("apsfast models: -o/--option needs a model NAME")
    spaces = PAPER_SPACES if args.name is None else ((args.name, options),)
    try:
        rows = [summary.summary(name, **opts) for name, opts in spaces]
        decisions = None if args.name is None else summary.decisions_markdown(args.name, **options)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"apsfast models: {error}") from None
    if args.json:
        print(json.dumps(rows if args.name is None else rows[0], indent=2))
        return 0
    print(summary.markdown(rows))
    if decisions is not None:
        print("\n" + decisions)
    return 0


def _add_analyze(sub) -> None:
    """The ``analyze`` subcommand's parser."""
    from apsfast.search.config import presets
    analyze = sub.add_parser(
        "analyze", help="the paper's analysis figures (Fig. 3, 4, 5, 8, 9) from runs, or the §5.2 comparison",
        description="Draw the analysis figures of one or several search runs made with -s analysis.every=N "
                    "(runs overlaid, labelled by strategy), or with --compare run one search per strategy (and "
                    "seed) with the analysis on and write the §5.2 table and figures.")
    analyze.add_argument("runs", metavar="RUN", nargs="*", help="search output folders (one model)")
    analyze.add_argument("--out", metavar="DIR",
                         help="where the PNGs go (default: the run's folder; for several runs, their common folder; "
                              "with --compare runs/PRESET-compare)")
    analyze.add_argument("--compare", metavar="STRATEGIES",
                         help="comma-separated strategies to search and compare, e.g. ordinal,independent,transitional")
    analyze.add_argument("--preset", choices=presets(), help="with --compare: the settings of every search")
    analyze.add_argument("--config", metavar="FILE", help="with --compare: a YAML config")
    analyze.add_argument("-s", "--set", action="append", metavar="KEY=VALUE",
                         help="with --compare: override a field of every search (repeatable)")
    analyze.add_argument("--seeds", default="0", metavar="S,S,...", help="with --compare: run.seed of each "
                         "search per strategy (default: 0)")
    analyze.add_argument("--retrain", action="store_true",
                         help="with --compare: retrain every chosen arch and report test accuracy")
    analyze.set_defaults(func=cmd_analyze)


def _add_info_and_models(sub) -> None:
    """The ``info`` and ``models`` subcommands' parsers."""
    info = sub.add_parser("info", help="versions, build and available backends")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.add_argument("--check", action="store_true",
                      help="also check, in a fresh process per compiled backend, that bad input raises")
    info.set_defaults(func=cmd_info)
    models = sub.add_parser("models", help="the search spaces: decisions, candidates, MACs, supernet size")
    models.add_argument("name", nargs="?", help="one model (then its decisions too); default: the paper's spaces")
    models.add_argument("-o", "--option", action="append", type=_option, metavar="KEY=VALUE",
                        help="a build option, e.g. -o residual=stage -o widths=[8,16,32] (repeatable)")
    models.add_argument("--json", action="store_true", help="print machine-readable JSON")
    models.set_defaults(func=cmd_models)


def _add_search_and_train(sub) -> None:
    """The ``search`` and ``train`` subcommands' parsers."""
    from apsfast.search.config import presets
    search = sub.add_parser("search", help="search channel numbers: warm-up, transition and controller, beam "
                            "search, export", description="Run a search. Settings: the defaults, then --preset, "
                            "then --config, then each -s; `--print-config` shows the result, each field with its "
                            "meaning.")
    search.add_argument("--preset", choices=presets(), help="the paper's settings for a model (or `demo`)")
    search.add_argument("--config", metavar="FILE", help="a YAML config (sections as `--print-config` shows)")
    search.add_argument("--model", metavar="MODULE:FACTORY",
                        help="search a model of your own: package.module:factory returning an nn.Module (importable, "
                             "e.g. with PYTHONPATH=.), made a supernet by apsfast.convert; replaces the preset's "
                             "model section (set -s model.options.KEY=VALUE for the factory, -s model.convert.widths="
                             "[0.5,1.0] for convert)")
    search.add_argument("-s", "--set", action="append", metavar="KEY=VALUE",
                        help="override a field, e.g. -s train.epochs=10 -s data.root=~/cifar (repeatable)")
    search.add_argument("--out", metavar="DIR", help="output folder (default: runs/PRESET-STRATEGY)")
    search.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint, with its own settings (config.yaml); "
                             "-s may change only bookkeeping, train.epochs, train.lr and train.grad_clip")
    search.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit: every field with its meaning and allowed values "
                             "(the configuration reference of the docs, from the same metadata)")
    search.set_defaults(func=cmd_search)
    train = sub.add_parser("train", help="retrain a searched arch from scratch and report its test accuracy",
                           description="Retrain a search's chosen arch (RUN), its N most likely archs (--top N), or "
                                       "the uniformly scaled standard network (--uniform RATIO) from scratch.")
    train.add_argument("run", metavar="RUN", nargs="?", help="a search's output folder or its result.json")
    train.add_argument("--top", type=int, metavar="N",
                       help="retrain the N most likely archs of the beam, each into OUT/top-k/, and report the "
                            "mean ± std of their test accuracy (OUT/top.json; paper Fig. 8)")
    train.add_argument("--uniform", type=float, metavar="RATIO",
                       help="retrain the standard network with every width scaled by RATIO (the nearest candidate; "
                            "paper Fig. 9's baseline), with the settings of --preset/--config or of RUN's search")
    train.add_argument("--preset", choices=presets(), help="with --uniform: the settings to train with")
    train.add_argument("--config", metavar="FILE", help="with --uniform: a YAML config")
    train.add_argument("-s", "--set", action="append", metavar="KEY=VALUE",
                       help="override a field, e.g. -s retrain.epochs=30 (repeatable)")
    train.add_argument("--out", metavar="DIR", help="output folder (default: RUN/retrain; with --uniform "
                       "RUN/retrain/uniform-RATIO, or runs/PRESET-uniform-RATIO)")
    train.add_argument("--resume", action="store_true",
                       help="continue the retraining in --out with its own settings (-s may change bookkeeping, "
                            "retrain.epochs, retrain.lr and retrain.grad_clip)")
    train.set_defaults(func=cmd_train)


def _add_export(sub) -> None:
    """The ``export`` subcommand's parser."""
    export = sub.add_parser(
        "export", help="write a searched or retrained network for deployment: ONNX (--onnx) or a torch.export "
        "program (--pt2)", description="Write the network of RUN with its weights, in eval mode, for inputs "
        "[batch, C, H, W] (the search's input shape; batch dynamic). RUN is a search's folder (its retrained "
        "model, retrain/retrained.pt, if `apsfast train RUN` has finished one, else model.pt: the chosen arch with "
        "the supernet's weights), a retrain's folder (retrained.pt), or an exported model.pt / retrained.pt file.")
    export.add_argument("run", metavar="RUN", help="a search's folder, a retrain's folder, or a model.pt file")
    export.add_argument("--onnx", metavar="PATH", help="write an ONNX file (needs pip install onnx onnxscript "
                        "onnxruntime); checked against PyTorch with onnxruntime when it is installed")
    export.add_argument("--pt2", metavar="PATH", help="write a torch.export program with its weights (.pt2)")
    export.add_argument("--searched", action="store_true",
                        help="with a search's folder: its searched model.pt even where a retrained model exists")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset, at least 18 (the default)")
    export.set_defaults(func=cmd_export)


def _add_demo_and_compare(sub) -> None:
    """The ``demo`` and ``compare`` subcommands' parsers."""
    demo = sub.add_parser("demo", help="a complete short search on the embedded data, then a short retrain")
    demo.add_argument("--out", metavar="DIR", help="output folder (default: runs/demo/<date-time>)")
    demo.add_argument("-s", "--set", action="append", metavar="KEY=VALUE",
                      help="override a field of the demo preset, e.g. -s train.epochs=4 (repeatable)")
    demo.set_defaults(func=cmd_demo)
    compare = sub.add_parser("compare", help="the searchers (reinforce, tas, ista) side by side: chosen MACs, "
                             "retrained accuracy, time and memory", add_help=False)
    compare.add_argument("rest", nargs=argparse.REMAINDER, help="options (see apsfast compare --help)")
    compare.set_defaults(func=cmd_compare)


def _add_bench(sub) -> None:
    """The ``bench`` subcommand's parser."""
    bench = sub.add_parser("bench", help="benchmarks: `apsfast bench kernels|search|host|profile|data|latency|zoo|"
                                         "meta-width|transition-every|precision|weight-parts [--quick] [--out PATH]`")
    bench.add_argument("suite", choices=["kernels", "search", "host", "profile", "data", "latency", "zoo", "meta-width",
                                         "transition-every", "precision", "weight-parts"],
                       help="kernels: the fused ops against nn.Conv2d and plain PyTorch; search: one search step "
                            "against plain PyTorch and the static network; host: a search step's host cost "
                            "(tiny inputs) against the static network's; profile: where a search step's time "
                            "goes; data: the loaders' images/s; latency: the latency table's predictions against "
                            "the measured latency of exported networks; zoo: convert on torchvision's and timm's "
                            "CNNs (exact / refused / failed, memory); meta-width: memory, transition time and Φ's "
                            "floor per meta width; transition-every: Φ's path with a transition every k steps; "
                            "precision: the transition under each float32 matmul precision, per backend; "
                            "weight-parts: a weight step split into its parts")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see --help)")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apsfast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"apsfast {apsfast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_info_and_models, _add_search_and_train, _add_export, _add_analyze, _add_demo_and_compare,
                _add_bench):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:  # its own parser reads every option after the command
        return cmd_compare(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
