"""The `ptuning-fast` command: `verify` (fused ops vs reference) and `bench` (throughput)."""
from __future__ import annotations

import sys

USAGE = """usage: ptuning-fast {verify,bench} [options]

  verify   run every fused op against its reference (forward and gradients); exit 1 on failure
  bench    time the fused ops against naive concatenation, SDPA and FlexAttention

Run `ptuning-fast <command> --help` for the options of each."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # Imported per command: `verify` must set TRITON_INTERPRET before any kernel is imported.
    if command == "verify":
        from .verify import main as run
    elif command == "bench":
        from .benchmarks import main as run
    else:
        print(f"ptuning-fast: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
