"""`trainwatch demo | landscape | report | sync`: the command line. Thin: parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainwatch", description="Watch PyTorch Lightning training in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits with TrainWatch attached")
    demo.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--landscape-steps", type=int, default=31, help="points per landscape axis (odd)")
    land = sub.add_parser("landscape", help="compute a run's loss landscape and log it to the run")
    land.add_argument("run_id")
    land.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, then sqlite:///mlflow.db")
    land.add_argument("--name", default=None, help="folder under trainwatch/landscape/ (default: the --directions kind)")
    land.add_argument("--directions", choices=["random", "pca"], default="random", help="pca: the training path's principal plane")
    land.add_argument("--steps", type=int, default=51, help="points per axis, odd (default 51)")
    land.add_argument("--span", type=float, default=1.0, help="each axis covers [-span, span] (default 1)")
    land.add_argument("--seed", type=int, default=0)
    land.add_argument("--mode", choices=["auto", "loop", "vmap"], default="auto")
    land.add_argument("--bn-mode", choices=["eval", "train"], default="eval")
    land.add_argument("--ignore", choices=["biasbn", "none"], default="biasbn")
    land.add_argument("--loss", default=None, help="cross_entropy, mse, or a module attribute (default: inferred)")
    land.add_argument("--batch-size", type=int, default=512)
    land.add_argument("--chunk", type=int, default=64)
    land.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    land.add_argument("--devices", type=int, default=1, help="processes sharing the grid (one per GPU; gloo on CPU)")
    report = sub.add_parser("report", help="build the run dashboard (one run, or two side by side)")
    report.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="one run id, or two to compare")
    report.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, then sqlite:///mlflow.db")
    report.add_argument(
        "--out",
        default=None,
        help="write the page to this file instead of logging it to the (first) run (two runs: trainwatch/compare-RUN_B.html)",
    )
    sync = sub.add_parser("sync", help="deliver records spooled while the MLflow server was unreachable")
    sync.add_argument("spool_dir")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from trainwatch.demo import run_demo
        from trainwatch.landscape.job import LandscapeSpec, run_landscape
        from trainwatch.sink import absolute_sqlite_uri

        uri = absolute_sqlite_uri(args.tracking_uri)  # the printed command keeps the user's form
        run_id = run_demo(uri, epochs=args.epochs)
        run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=uri, steps=args.landscape_steps))
        _report([run_id], uri, None)  # again, now with the landscape
        print(f"\ntrainwatch demo finished: run {run_id} in {args.tracking_uri}")
        print(f"Open the MLflow UI with:\n  .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri} --port 5000")
        print("then browse http://127.0.0.1:5000 → experiment 'trainwatch-demo' → run 'digits-cnn' → Model metrics;")
        print("the dashboard is Artifacts → trainwatch/report.html; the loss landscape is under trainwatch/landscape/random/")
        print("(surface.html is interactive); the diagnosis is trainwatch/diagnosis.json and the run tag trainwatch.health.")
        return 0
    if args.command == "landscape":
        from trainwatch.landscape.job import LandscapeSpec, run_landscape

        try:
            spec = LandscapeSpec(
                run_id=args.run_id, tracking_uri=args.tracking_uri, name=args.name or args.directions, directions=args.directions, steps=args.steps, span=args.span, seed=args.seed,
                mode=args.mode, bn_mode=args.bn_mode, ignore=args.ignore, loss=args.loss, batch_size=args.batch_size,
                chunk=args.chunk, device=args.device, devices=args.devices,
            )  # fmt: skip
            run_landscape(spec)
        except (ValueError, FileNotFoundError, ConnectionError) as error:
            print(f"trainwatch landscape: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "report":
        return _report(args.run_ids, args.tracking_uri, args.out)
    if args.command == "sync":
        from trainwatch.sink import SyncIncomplete
        from trainwatch.sink import sync as sync_spool

        try:
            n = sync_spool(args.spool_dir)
        except SyncIncomplete as error:  # it says what was delivered and what is left
            print(f"trainwatch sync: {error}", file=sys.stderr)
            return 1
        except FileNotFoundError as error:
            print(f"trainwatch sync: {error} A spool holds run.json and ops.jsonl, and is removed once delivered.", file=sys.stderr)
            return 1
        except Exception as error:  # noqa: BLE001 - a CLI reports any failure as a message and exit code 1
            print(f"trainwatch sync: {error}", file=sys.stderr)
            print("Nothing was removed from the spool; run the command again once the server is reachable.", file=sys.stderr)
            return 1
        print(f"trainwatch sync: delivered {n} spooled operations from {args.spool_dir}")
        return 0
    return 2


def _report(run_ids: list[str], tracking_uri: str | None, out: str | None) -> int:
    from trainwatch.report import REPORT_PATH, build_report

    if len(run_ids) > 2 or len(set(run_ids)) < len(run_ids):
        print("trainwatch report: give one run id, or two different ones to compare", file=sys.stderr)
        return 2
    try:
        html = build_report(run_ids, tracking_uri)
        if out:
            Path(out).write_text(html, encoding="utf-8")
            print(f"trainwatch report: wrote {out} ({len(html) / 1e6:.2f} MB)")
        else:
            from trainwatch.runs import RunStore

            # a comparison goes beside the first run's own dashboard, not over it
            path = REPORT_PATH if len(run_ids) == 1 else f"trainwatch/compare-{run_ids[1]}.html"
            RunStore(run_ids[0], tracking_uri).write({path: html.encode()})
            print(f"trainwatch report: logged {path} to run {run_ids[0]} ({len(html) / 1e6:.2f} MB)")
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        print(f"trainwatch report: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
