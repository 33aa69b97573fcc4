"""``mgeo-service``: serve, predict, evaluate, train."""
from __future__ import annotations

import argparse
import json
import sys

from . import logs
from .config import load_settings_or_exit


def _matcher(args, settings):
    from .matcher import Matcher
    return Matcher(args.model or settings.model_dir or None, device=settings.device,
                   max_length=settings.max_length, batch_size=getattr(args, "batch_size", 64),
                   threads=settings.torch_threads or None, fp16=settings.fp16)


def _predict(args, settings) -> int:
    matcher = _matcher(args, settings)
    result = matcher.predict([(args.address1, args.address2)])[0].as_dict()
    print(json.dumps({**result, "model": matcher.model_id}, ensure_ascii=False))
    return 0


def _evaluate(args, settings) -> int:
    from .dataset import DatasetError, read_pairs
    from .evaluation import evaluate
    try:
        pairs = read_pairs(args.data)
    except (OSError, DatasetError) as exc:
        print(f"mgeo-service evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(_matcher(args, settings), pairs), ensure_ascii=False))
    return 0


def _train(args, settings) -> int:
    try:
        from .train.trainer import train
    except ImportError as exc:
        print(f"mgeo-service train needs the train extra (pip install '.[train]'): {exc}", file=sys.stderr)
        return 2
    summary = train(args.data, args.out, args.splits, layers=args.layers, epochs=args.epochs,
                    batch_size=args.batch_size, learning_rate=args.learning_rate,
                    max_length=settings.max_length, seed=args.seed, threads=args.threads, limit=args.limit,
                    shenzhen=args.shenzhen)
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
    predict = commands.add_parser("predict", help="score one address pair and print JSON")
    predict.add_argument("address1")
    predict.add_argument("address2")
    predict.add_argument("--model", help=model_help)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("evaluate", help="figures on a labelled TSV, as one JSON object")
    evaluate.add_argument("data", help="address1<TAB>address2<TAB>label (0/1/2 or label names)")
    evaluate.add_argument("--model", help=model_help)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.set_defaults(run=_evaluate)

    train = commands.add_parser("train", help="train the default model from shared/data")
    train.add_argument("--data", required=True, help="folder with ccks2021_address_pairs.tsv, shenzhen_address_pairs.tsv and admin_divisions/")
    train.add_argument("--out", required=True, help="where the model is written (Hugging Face layout)")
    train.add_argument("--splits", default="run/splits", help="where the train/validation/test splits are written")
    train.add_argument("--layers", type=int, default=4)
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=20211)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--shenzhen", type=int, default=16000,
                       help="also train on this many Shenzhen pairs (same place as exact_match; 0: none)")
    train.add_argument("--limit", type=int, default=None, help="use only the first N pairs of each split (smoke runs)")
    train.set_defaults(run=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings_or_exit("mgeo-service")
    logs.configure(settings.log_level)
    return args.run(args, settings)
