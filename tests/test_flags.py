"""The flags every model script shares (one interface: a command for one script works for another), spelled
alike in each script's --help, and every flag --help shows read somewhere, on every model script that exists."""
import importlib
import re

import pytest

from conftest import ROOT

SCRIPTS = [s for s in ("dcgan", "cgan", "wgan_clip", "wgan_gp", "sngan", "infogan", "sagan") if (ROOT / f"{s}.py").exists()]
SPEC_FLAGS = ["--dataset", "--data-root", "--image-size", "--batch-size", "--epochs", "--max-steps", "--max-minutes",
              "--lr-g", "--lr-d", "--beta1", "--beta2", "--latent-dim", "--n-dis", "--seed", "--device", "--out",
              "--sample-every", "--eval-every", "--eval-samples", "--resume", "--generate", "--checkpoint", "--n-gen",
              "--inception-weights"]
EMA_SCRIPTS = ("sngan", "sagan")  # --ema where the model has one


def help_text(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_spec_flags_are_spelled_as_in_spec(script, capsys):
    text = help_text(script, capsys)
    wanted = SPEC_FLAGS + (["--ema"] if script in EMA_SCRIPTS else [])
    missing = [f for f in wanted if not re.search(rf"{re.escape(f)}\b", text)]
    assert not missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_in_help_is_read_somewhere(script, capsys):
    """A flag that is parsed and never read is a lie in --help."""
    text = help_text(script, capsys)
    source = (ROOT / f"{script}.py").read_text() + (ROOT / "common.py").read_text()
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]+)", text)) - {"help"}
    unused = [f for f in sorted(flags) if f"args.{f.replace('-', '_')}" not in source]
    assert not unused
