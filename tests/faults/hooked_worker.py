"""A real `tandem` worker with faults injected (tests.faults.engine_hooks):

python -m tests.faults.hooked_worker [--fail-token T --record PATH] [--hold-file PATH]
    -- ROLE FLAGS...
"""

from __future__ import annotations

import argparse
import sys

from tests.faults.engine_hooks import fail_token, hold_steps


def main(argv: list[str]) -> int:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-token", type=int)
    parser.add_argument("--record", default="")
    parser.add_argument("--hold-file", default="")
    hooks = parser.parse_args(argv[:split])
    if hooks.fail_token is not None:
        fail_token(hooks.fail_token, hooks.record)
    if hooks.hold_file:
        hold_steps(hooks.hold_file)
    from tandem.cli import main as tandem_main

    return tandem_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
