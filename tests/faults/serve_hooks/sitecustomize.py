"""Test-only: faults for the workers of `tandem serve` (tests/service/test_serve_faults.py).

A test starts `tandem serve` with this directory first on PYTHONPATH, so every Python
process it starts runs this module at interpreter start, and with TANDEM_TEST_HOOKS set
to a JSON object mapping a role's subcommand ("prefill", "decode", "worker") to the
hooks of tests.faults.engine_hooks it gets and their arguments, e.g.
    {"decode": {"fail_token": [4242, "/tmp/record"]}, "prefill": {"hold_steps": ["/tmp/hold"]}}
A process whose subcommand is not named (serve itself, the gateway) is left as it is.
Nothing in the service reads this variable: the hooks patch the engine from outside.
"""

import json
import os
import sys

_HOOKS = json.loads(os.environ.get("TANDEM_TEST_HOOKS") or "{}")
# The first subcommand on the command line is the process's own: serve's and the
# gateway's come before any flag value that might spell a worker's.
_COMMANDS = ("serve", "gateway", "prefill", "decode", "worker")
_command = next((arg for arg in sys.argv[1:] if arg in _COMMANDS), None)

if _command in _HOOKS:
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    sys.path.insert(0, os.path.abspath(_root))  # the repository: for tests.faults
    from tests.faults import engine_hooks

    for _name, _args in _HOOKS[_command].items():
        getattr(engine_hooks, _name)(*_args)
