"""Split a released OpenSora v1.0 STDiT checkpoint's qkv linears into q, k, v (pipeline stage 1).

    python -m t2v.scripts.split_ckpt --src OpenSora-v1-HQ-16x512x512.pth \
        --dst OpenSora-v1-HQ-16x512x512-split.safetensors [--config config.json] [--overwrite]

The output is a safetensors file (whatever the --dst suffix) without the deterministic sin-cos
tables; the STDiT config (inferred from the shapes, updated with --config) is stored in its
metadata under ``stdit_config``, so ``STDiT.from_pretrained(dst)`` loads it directly. The input is
read with ``torch.load(weights_only=True)`` (or safetensors): a pickle holding code is refused.
Errors print one line to stderr and exit with code 2.
"""
import argparse
import sys

from t2v.models.checkpoint import CheckpointError, convert_checkpoint, read_config_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m t2v.scripts.split_ckpt", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--src", required=True, help="original checkpoint (.pth/.pt/.safetensors; 'ema'/'model' wrappers are fine)"
    )
    parser.add_argument(
        "--dst",
        required=True,
        help="output safetensors file, e.g. logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors",
    )
    parser.add_argument(
        "--config",
        help="JSON object of STDiT keywords overriding the inferred ones (e.g. num_heads, input_size)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = read_config_file(args.config) if args.config else None
        resolved = convert_checkpoint(args.src, args.dst, config=config, overwrite=args.overwrite)
    except CheckpointError as error:
        print(f"split_ckpt: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        return 2
    except OSError as error:
        print(f"split_ckpt: error: cannot write {args.dst}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} (STDiT config: {resolved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
