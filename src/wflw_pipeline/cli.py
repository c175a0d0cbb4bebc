"""`wflw <command>`: thin argument parsing over the pipeline's stages."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import PipelineError, exit_code, interrupted_exit_code, signals_interrupt, write_error_file
from .outputs import (
    EVAL,
    MODEL,
    PARQUET,
    RAW,
    REGISTER,
    TRAIN,
    ConvertOutputs,
    EvalOutputs,
    RegisterInputs,
    RegisterOutputs,
    TrainOutputs,
)
from .params import Params, add_params_options, load_params

logger = logging.getLogger("wflw_pipeline")


def _fetch(params: Params, args: argparse.Namespace) -> None:
    from .fetch import run_fetch

    run_fetch(params.data, Path(args.out))


def _convert(params: Params, args: argparse.Namespace) -> None:
    from .convert import run_convert

    summary = run_convert(params.convert, Path(args.raw), Path(args.out))
    logger.info("wrote %s: %s", args.out, summary["faces"])


def _train(params: Params, args: argparse.Namespace) -> None:
    from .train import run_train, tracking

    parquet, outputs = Path(args.parquet), TrainOutputs(Path(args.model_dir), Path(args.train_dir))
    with tracking(params, parquet, outputs) as on_epoch_end:
        metrics = run_train(params, parquet, outputs, on_epoch_end)
    logger.info("train metrics: %s", metrics)


def _register(params: Params, args: argparse.Namespace) -> None:
    from .register import run_register

    train = TrainOutputs(train_dir=Path(args.train_dir))
    splits, evaluation = ConvertOutputs(Path(args.parquet)), EvalOutputs(Path(args.eval))
    run_register(
        params, RegisterInputs(train, Path(args.model), evaluation, splits), RegisterOutputs(Path(args.out))
    )


def _predict(params: Params, args: argparse.Namespace) -> None:
    from .serving.predict import run_predict

    run_predict(params, args.model, [Path(path) for path in args.paths], args.bbox, Path(args.out))


def _export(params: Params, args: argparse.Namespace) -> None:
    from .serving.export import run_export

    run_export(params, args.model, Path(args.out))


def _promote(params: Params, args: argparse.Namespace) -> None:
    from .mlops.registry import PromotionRefused, promote

    try:
        print(promote(params, args.version, force=args.force, reason=args.reason))
    except PromotionRefused as refused:
        print(refused.report)
        raise


def _rollback(params: Params, args: argparse.Namespace) -> None:
    from .mlops.registry import rollback

    print(rollback(params, args.reason))


def _models(params: Params, args: argparse.Namespace) -> None:
    from .mlops.registry import models

    print(models(params))


def _evaluate(params: Params, args: argparse.Namespace) -> None:
    from .evaluate import run_evaluate

    metrics = run_evaluate(params.evaluate, Path(args.checkpoint), Path(args.parquet), Path(args.out))
    logger.info("test NME %.3f %% (%d faces)", metrics["test"]["nme"], metrics["test"]["n"])


def _preview(params: Params, args: argparse.Namespace) -> None:
    from .data.preview import write_preview

    write_preview(Path(args.parquet), Path(args.out), per_row=args.per_row)
    logger.info("wrote %s", args.out)


def _bench(params: Params, args: argparse.Namespace) -> None:
    from .bench.cli import run

    run(params, args, command=" ".join(["wflw", *args.argv]))


def _parse_bench(rest: Sequence[str], top: argparse.Namespace) -> argparse.Namespace:
    """`wflw bench ...`: bench/cli.py has its own parser, loaded only here (no stage depends on it)."""
    from .bench.cli import build_parser as bench_parser

    args = bench_parser().parse_args(rest)
    args.verbose, args.run = top.verbose, _bench
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wflw",
        description="WFLW landmark pipeline. fetch, convert, train and evaluate are the DVC stages "
        "(dvc.yaml runs them: `dvc repro`); params come from params.yaml, overridden by --set.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch",
        help="get the WFLW archives: download (wflw), copy (local) or generate (synthetic)",
        description="Stage fetch: writes WFLW_images.tar.gz, WFLW_annotations.tar.gz and "
        "manifest.json (source, bytes, SHA-256) into --out. Reads params data.*.",
    )
    fetch.add_argument("--out", default=str(RAW), help="output folder (default: %(default)s)")
    fetch.set_defaults(run=_fetch)

    convert = commands.add_parser(
        "convert",
        help="archives -> Parquet face crops (train, val, test)",
        description="Stage convert: streams the archives in --raw, crops every face and writes "
        "{train,val,test}.parquet, summary.json and preview.png into --out. Reads params convert.*.",
    )
    convert.add_argument("--raw", default=str(RAW), help="folder of the archives (default: %(default)s)")
    convert.add_argument("--out", default=str(PARQUET), help="output folder (default: %(default)s)")
    convert.set_defaults(run=_convert)

    train = commands.add_parser(
        "train",
        help="train DeepPose on the Parquet crops (GPU when there is one; DDP under torchrun)",
        description="Stage train: fits the model on train.parquet, selects the epoch on val.parquet "
        "(never on test), writes --model-dir/model.pt and --train-dir/{checkpoint.pt,history.csv,"
        "metrics.json}. Reads params model.*, loss.*, augment.*, train.*. Several GPUs or nodes: "
        "torchrun --nproc_per_node N -m wflw_pipeline.cli train.",
    )
    train.add_argument("--parquet", default=str(PARQUET), help="splits folder (default: %(default)s)")
    train.add_argument("--model-dir", default=str(MODEL), help="(default: %(default)s)")
    train.add_argument("--train-dir", default=str(TRAIN), help="(default: %(default)s)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a trained model on the test split (and val): NME, FR, AUC per subset, plots",
        description="Stage evaluate: predicts --parquet's test.parquet (and val.parquet when it has rows) "
        "with --checkpoint, maps the points back to the original images and writes metrics.json, "
        "per_face.parquet, ced.csv, results.md, ced.png, nme_subsets.png and best_worst.png into --out. "
        "Reads params evaluate.*. Works on any checkpoint written by `wflw train`, inside DVC or not.",
    )
    evaluate.add_argument(
        "--checkpoint", default=str(TrainOutputs().model), help="trained model file (default: %(default)s)"
    )
    evaluate.add_argument("--parquet", default=str(PARQUET), help="splits folder (default: %(default)s)")
    evaluate.add_argument("--out", default=str(EVAL), help="output folder (default: %(default)s)")
    evaluate.set_defaults(run=_evaluate)

    preview = commands.add_parser(
        "preview",
        help="PNG grid of sample faces with landmarks, one row per subset",
        description="Draws faces of a converted Parquet split with their 98 landmarks.",
    )
    preview.add_argument(
        "--parquet", default=str(ConvertOutputs().split("test")), help="(default: %(default)s)"
    )
    preview.add_argument("--out", default=str(ConvertOutputs().preview), help="(default: %(default)s)")
    preview.add_argument("--per-row", type=int, default=8, help="faces per row (default: %(default)s)")
    preview.set_defaults(run=_preview)

    register = commands.add_parser(
        "register",
        help="complete the MLflow run and register the model (alias challenger)",
        description="Stage register: completes the pipeline's MLflow run from the DVC outputs (results, "
        "artifacts, the model as a pyfunc; a new run when train was cached or its run is not on this "
        "server), creates a version of registry.model_name and points alias challenger at it. Writes "
        "--out/registered.json. Reads params tracking.*, registry.model_name.",
    )
    register.add_argument("--train-dir", default=str(TRAIN), help="(default: %(default)s)")
    register.add_argument("--model", default=str(TrainOutputs().model), help="(default: %(default)s)")
    register.add_argument("--eval", default=str(EVAL), help="evaluate's folder (default: %(default)s)")
    register.add_argument("--parquet", default=str(PARQUET), help="(default: %(default)s)")
    register.add_argument("--out", default=str(REGISTER), help="(default: %(default)s)")
    register.set_defaults(run=_register)

    promote = commands.add_parser(
        "promote",
        help="move alias champion to a version only if it beats the champion on the same faces",
        description="Compares the candidate (--version, default: alias challenger) with the champion: same "
        "test data, lower test NME, no subset worse by more than registry.max_subset_regression, and (when "
        "registry.require_significant) a paired-bootstrap interval of per-face NME differences below zero. "
        "Prints the comparison; exit code 1 when refused.",
    )
    promote.add_argument("--version", help="the candidate version (default: alias challenger)")
    promote.add_argument("--force", action="store_true", help="move champion even if the gate refuses")
    promote.add_argument("--reason", help="why (required with --force; recorded on the versions)")
    promote.set_defaults(run=_promote)

    rollback = commands.add_parser("rollback", help="move alias champion back to the previous champion")
    rollback.add_argument("--reason", help="why (recorded on the versions)")
    rollback.set_defaults(run=_rollback)

    models = commands.add_parser(
        "models", help="registered versions: aliases, metrics, data source, champion history"
    )
    models.set_defaults(run=_models)

    predict = commands.add_parser(
        "predict",
        help="landmarks on your own photos: JSON and an overlay PNG per image",
        description="Finds the faces in each image (files, or folders of JPEG, PNG, WebP; or takes --bbox), "
        "crops them as the model was trained and predicts their 98 points. Writes <name>.json (each face's "
        "box, detector score, 98 points in image pixels) and <name>.overlay.png into --out. Reads params "
        "predict.*. An image that cannot be read or shows no face is reported in one line and the rest go "
        "on; the exit code is 1 when any did.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument(
        "--model",
        help="models:/<name>@<alias> or models:/<name>/<version>, runs:/<run id>/model, or a local model.pt "
        "(default: models:/<registry.model_name>@champion)",
    )
    predict.add_argument(
        "--bbox", metavar="X1,Y1,X2,Y2", help="the face box, the same for every image (default: detect faces)"
    )
    predict.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    predict.set_defaults(run=_predict)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch), checked against PyTorch with onnxruntime",
        description="Writes the model as ONNX: uint8 crops (N, S, S, 3) in, float32 landmarks (N, 98, 2) "
        "in crop pixels out, as the registered pyfunc; onnxruntime's predictions are checked against "
        "PyTorch's (max abs difference below 1e-3 px) before it is kept.",
    )
    export.add_argument("--format", choices=("onnx",), default="onnx", help="(default: %(default)s)")
    export.add_argument("--model", help="as for predict (default: models:/<registry.model_name>@champion)")
    export.add_argument("--out", default="model.onnx", help="(default: %(default)s)")
    export.set_defaults(run=_export)

    commands.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: loader, train-step, epoch, start, precision, predict, ab (see `wflw bench --help`)",
    )

    for sub in (
        fetch,
        convert,
        train,
        evaluate,
        preview,
        register,
        promote,
        rollback,
        models,
        predict,
        export,
    ):
        add_params_options(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args = _parse_bench(rest, args) if args.command == "bench" else parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[Params, argparse.Namespace], None] = args.run
    try:
        with signals_interrupt():
            params = load_params(args.params, args.overrides)
            run(params, args)
    except PipelineError as err:
        logger.error("%s", err)
        write_error_file(str(err), exit_code(err))
        return exit_code(err)
    except KeyboardInterrupt as err:
        message = f"wflw {args.command}: interrupted by {err.args[0] if err.args else 'SIGINT'}"
        logger.error("%s", message)
        write_error_file(message, interrupted_exit_code(err))
        return interrupted_exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
