import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOKE = "test_smoke.py"  # the smoke tier; every other test that is not `slow` is in the `full` tier


def pytest_collection_modifyitems(config, items):
    """Mark every test outside test_smoke.py, and not already `slow`, with `full`. pyproject's addopts deselect
    `full` and `slow` (`python -m pytest` runs the smoke tier); `-m full` on the command line replaces addopts'
    -m, as pytest takes the last one."""
    for item in items:
        if item.path.name != SMOKE and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.full)


@pytest.fixture(autouse=True)
def figures_only_where_looked_at(request, monkeypatch):
    """Drawing a run's figures (losses.png, class_histogram.png, progress.gif: common.plot_run; sagan's
    attention.png: sagan.save_attention_figure) is matplotlib's layout work, about 40% of a few-step in-process run.
    The smoke tier and the tests marked `figures` draw them and look at them; in every other test the run reaches
    the drawing functions (sagan computes its attention maps) and nothing is drawn. Subprocess runs draw."""
    if request.node.path.name != SMOKE and request.node.get_closest_marker("figures") is None:
        import common
        import sagan
        monkeypatch.setattr(common, "plot_run", lambda run: None)
        monkeypatch.setattr(sagan, "save_attention_figure", lambda *a, **k: None)


@pytest.fixture(autouse=True)
def ema_statistics_from_two_batches(request, monkeypatch):
    """sngan's and sagan's --ema recompute the average's BatchNorm statistics before each use (a grid, an
    evaluation, a save) from 8 batches of 256 noise vectors: at the tests' widths, most of a few-step run. Outside
    the smoke tier, from 2 (a resumed run and its straight reference both use 2; test_sngan.py checks the
    recomputation itself). Subprocess runs use 8."""
    if request.node.path.name != SMOKE:
        import common
        monkeypatch.setattr(common.EMA, "batches", 2)


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


def assert_same_training_state(a, b):
    """Two checkpoints hold the same training state: G, D, both optimisers' per-parameter state (Adam's step,
    exp_avg and exp_avg_sq; RMSProp's square_avg) and hyperparameters, the data position, the CPU RNG stream
    and the sample grid's noise. A resume that restores the weights but not, say, opt_d passes a weights-only
    check for a step or two and fails this one."""
    import torch

    assert (a["step"], a["position"]) == (b["step"], b["position"])
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys()
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs"
    for opt in ("opt_g", "opt_d"):
        sa, sb = a[opt]["state"], b[opt]["state"]
        assert sa and sa.keys() == sb.keys(), opt
        for i, entry in sa.items():
            assert entry.keys() == sb[i].keys()
            for k, v in entry.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), f"{opt} state[{i}].{k} differs"
        assert a[opt]["param_groups"] == b[opt]["param_groups"], opt
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"]), "CPU random stream differs"
    assert torch.equal(a["fixed_z"], b["fixed_z"])


RESUME_KEPT = ("eval_samples", "log_every", "sample_every", "eval_every")


def check_bare_resume_kept_logging_flags(module, run_dir, before):
    """After a bare `--resume run_dir/checkpoint.pt --max-steps N`, run_dir/args.json still has the checkpoint's
    logging flags (`before`: the args.json of the first run), not the parser's defaults. Every one of them must
    differ from its default, or the check could not fail."""
    import json

    after = json.loads((Path(run_dir) / "args.json").read_text())
    defaults = vars(module.parse_args([]))
    for k in RESUME_KEPT:
        assert before[k] != defaults[k], f"{k}: use a non-default value, or this check cannot fail"
        assert after[k] == before[k], f"a bare --resume replaced {k}={before[k]} by {after[k]}"
