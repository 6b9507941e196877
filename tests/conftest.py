import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One data root for the session, so the fake dataset's classifier is trained once."""
    return tmp_path_factory.mktemp("data")


def run_script(module, argv, capsys=None):
    """Run `module.main(argv)` in-process; return (exit code, stderr text if capsys given)."""
    code = 0
    try:
        module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err if capsys else ""
    return code, err


def without(argv, *flags):
    """argv minus each flag and its value (e.g. --width for an architecture that has none)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out
