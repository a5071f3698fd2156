"""torchrun's worker, one per training process: `python -m tessera.core.entry.worker --params params.yaml`
(core/runtime/launch.py builds the command). A user's mistake ends it with the message alone, status 2, and is
left in train.out/user_error.txt so that the launcher reports it once and does not restart."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from tessera.core.config import load_params
from tessera.core.data.files import atomic_write_text
from tessera.core.errors import UserError
from tessera.core.stages.train import train_model, user_error_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m " + __spec__.name, description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params.yaml to read")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        try:
            train_model(params)
        except UserError as e:
            if os.environ.get("RANK", "0") == "0":
                user_error_file(params).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(user_error_file(params), str(e))
            raise
    except UserError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
