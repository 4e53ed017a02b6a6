"""The `pagoda` command line: it parses without the server's imports, and `serve` starts the
forkserver its workers come from with their modules."""

import subprocess
import sys

from pagoda.engine.core import run_engine_core
from pagoda.engine.embedding_worker import run_embedding_worker
from pagoda.engine.image_worker import run_image_worker
from pagoda.server.cli import WORKER_MODULES


def test_worker_modules_are_those_of_the_workers_entry_points():
    targets = {
        "chat": run_engine_core,
        "embedding": run_embedding_worker,
        "image": run_image_worker,
    }
    assert {kind: target.__module__ for kind, target in targets.items()} == WORKER_MODULES


def test_parsing_and_the_keys_command_do_not_import_torch():
    code = (
        "import sys\n"
        "from pagoda.server.cli import parse_args\n"
        "args = parse_args(['keys', 'list', '--database', 'sqlite:///unused.db'])\n"
        "parse_args(['serve', '--port', '1'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'uvicorn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
