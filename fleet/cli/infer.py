"""`edge-fleet infer`: send one OIP v2 job built from a .npy or .npz file and print the
result (a summary per output tensor, or the raw response with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeinfer.cliargs import Parser, UsageError, duration
from edgeinfer.fleet.cli.common import PROG, device_id, topic_prefix
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InferenceError
from edgeinfer.fleet.oip import InferResult, datatype_of
from edgeinfer.fleet.tls_options import security_from_args


def add_infer_parser(sub: Any, common: Parser) -> None:
    p = sub.add_parser(
        "infer", parents=[common], help="send one inference job and print the result",
        description="Send one OIP v2 job built from a .npy or .npz file.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="send to this device")
    target.add_argument("--pool", help="send to any device of this pool")
    p.add_argument("--model", required=True, metavar="NAME")
    p.add_argument("--version", metavar="V", help="model version (default: the served one)")
    p.add_argument("--input", required=True, type=Path, metavar="FILE",
                   help=".npy (one tensor, named by --input-name) or .npz (keys are names)")
    p.add_argument("--input-name", metavar="NAME", help="the model input a .npy file feeds")
    p.add_argument("--output", action="append", metavar="NAME",
                   help="ask for this output only (repeatable; default: all)")
    p.add_argument("--timeout", type=duration, default=10.0, metavar="DURATION",
                   help="how long to wait for the answer, e.g. 10 (seconds), 500ms, 1m "
                        "(default: 10s)")
    p.add_argument("--json", action="store_true", help="print the raw OIP response")
    p.set_defaults(func=cmd_infer)


def load_inputs(path: Path, input_name: str | None) -> dict[str, np.ndarray[Any, Any]]:
    """Named input tensors from a .npy (with a name) or a .npz (names are its keys)."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as .npy/.npz: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            inputs = {k: loaded[k] for k in loaded.files}
        if input_name is not None:
            if input_name not in inputs:
                raise UsageError(f"{path} has no array {input_name!r} (has: {', '.join(inputs)})")
            inputs = {input_name: inputs[input_name]}
        if not inputs:
            raise UsageError(f"{path} holds no arrays")
        return inputs
    if input_name is None:
        raise UsageError(
            f"{path} holds one unnamed array: say which model input it feeds with "
            "--input-name (or use a .npz whose keys are the input names)"
        )
    return {input_name: np.asarray(loaded)}


def summarize(array: np.ndarray[Any, Any]) -> str:
    """Small tensors in full; large ones as range, mean and argmax over the last axis."""
    head = f"{datatype_of(array)} {list(array.shape)}"
    if array.size <= 16:
        return f"{head} {np.array2string(array, separator=', ', threshold=16)}"
    if array.dtype.kind not in "biuf":
        return f"{head} (first: {array.ravel()[0].item()!r})"
    parts = [head, f"min {array.min():.4g}", f"max {array.max():.4g}",
             f"mean {array.mean():.4g}"]
    if array.ndim >= 1:
        argmax = array.argmax(axis=-1).ravel()
        more = ", ..." if argmax.size > 10 else ""
        parts.append(f"argmax[-1] [{', '.join(str(i) for i in argmax[:10])}{more}]")
    return "  ".join(parts)


def _print_result(result: InferResult, round_trip_ms: float) -> None:
    p = result.parameters

    def ms(key: str) -> str:
        v = p.get(key)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "?"

    print(f"{result.model_name}:{result.model_version} via {p.get('runtime', '?')}/"
          f"{p.get('device', '?')}: queue {ms('queue_ms')} ms, infer {ms('infer_ms')} ms, "
          f"round trip {round_trip_ms:.2f} ms")
    width = max((len(n) for n in result.outputs), default=0)
    for name, array in result.outputs.items():
        print(f"  {name.ljust(width)}  {summarize(array)}")


def cmd_infer(args: argparse.Namespace) -> int:
    prefix = topic_prefix(args)
    if args.device:
        device_id(args.device)
    inputs = load_inputs(args.input, args.input_name)
    with InferenceClient(args.broker, prefix=prefix, security=security_from_args(args)) as client:
        started = time.perf_counter()
        try:
            result = client.infer(
                args.model, inputs, device=args.device, pool=args.pool, version=args.version,
                outputs=args.output, timeout=args.timeout,
            )
        except InferenceError as exc:
            if args.json and exc.response is not None:
                print(json.dumps(exc.response))
            print(f"{PROG}: job failed: {exc}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"{PROG}: {exc} (is the device online and serving {args.model}?)",
                  file=sys.stderr)
            return 1
        except ValueError as exc:  # inputs OIP cannot carry
            raise UsageError(str(exc)) from None
        round_trip_ms = (time.perf_counter() - started) * 1000
    if args.json:
        print(json.dumps(result.raw))
    else:
        _print_result(result, round_trip_ms)
    return 0
