"""``python -m diffopt.bench --worker JSON``: one configuration's memory in a fresh process
(:func:`diffopt.bench.subprocess_worker` starts it); anything else is ``diffopt bench``.

An entry point, like ``diffopt/__main__.py``: it sits above the command line it
hands over to, and nothing imports it.
"""
import json
import sys

from .._measure import worker_reply


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        from .measuring import worker

        worker_reply(worker(json.loads(argv[1])))
        return 0
    from ..cli.bench import main as bench_command

    return bench_command(argv)


if __name__ == "__main__":
    sys.exit(main())
