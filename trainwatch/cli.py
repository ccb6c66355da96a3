"""`trainwatch demo | sync`: the command line. Thin: parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainwatch", description="Watch PyTorch Lightning training in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits with TrainWatch attached")
    demo.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    demo.add_argument("--epochs", type=int, default=5)
    sync = sub.add_parser("sync", help="deliver records spooled while the MLflow server was unreachable")
    sync.add_argument("spool_dir")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from trainwatch.demo import run_demo

        run_id = run_demo(args.tracking_uri, epochs=args.epochs)
        print(f"\ntrainwatch demo finished: run {run_id} in {args.tracking_uri}")
        print(f"Open the MLflow UI with:\n  .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri} --port 5000")
        print("then browse http://127.0.0.1:5000 → experiment 'trainwatch-demo' → run 'digits-cnn' → Model metrics.")
        return 0
    if args.command == "sync":
        from trainwatch.sink import sync as sync_spool

        try:
            n = sync_spool(args.spool_dir)
        except Exception as error:  # noqa: BLE001 - a CLI reports any failure as a message and exit code 1
            print(f"trainwatch sync: {error}", file=sys.stderr)
            print("Nothing was removed from the spool; run the command again once the server is reachable.", file=sys.stderr)
            return 1
        print(f"trainwatch sync: delivered {n} spooled operations from {args.spool_dir}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
