"""CLIs generated from the configuration dataclasses: every field is a flag with the dataclass's
default and help, the parsed flags build the same object the library uses, bad values fail naming
the flag, and the Beam / pipeline CLIs take their options from the same classes."""

import argparse
import contextlib
import dataclasses
import io

import pytest

from tf_influence import cli
from tf_influence.analyzer import FactorArgs
from tf_influence.influence import InfluenceArgs
from tf_influence.presence import PresenceArgs
from tf_influence.solvers import SolverConfig


@pytest.mark.parametrize("cls", [InfluenceArgs, FactorArgs, PresenceArgs])
def test_every_field_is_a_flag_and_no_flags_give_the_defaults(cls):
    ap = argparse.ArgumentParser()
    cli.add_arguments(ap, cls)
    flags = {a.dest for a in ap._actions}
    assert {f.name for f in dataclasses.fields(cls)} <= flags
    assert cli.from_args(cls, ap.parse_args([])) == cls()
    text = ap.format_help()
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            assert f.metadata["help"].split()[0] in text, f.name


def test_values_reach_the_object_and_bad_values_name_the_flag():
    ap = argparse.ArgumentParser(prog="x")
    cli.add_arguments(ap, InfluenceArgs)
    ns = ap.parse_args(["--case", "updated", "--alpha", "0.1", "--hessian-samples", "none", "--no-check-fixed-embedding",
                        "--finetune-solver", '{"method": "dense", "damping": 0.5}'])
    args = cli.from_args(InfluenceArgs, ns)
    assert (args.case, args.alpha, args.hessian_samples, args.check_fixed_embedding) == ("updated", 0.1, None, False)
    assert args.finetune_solver == SolverConfig("dense", damping=0.5)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        ap.parse_args(["--pretrain-solver", '{"method": "cg", "dampnig": 1}'])
    assert "--pretrain-solver" in err.getvalue() and "dampnig" in err.getvalue()
    with pytest.raises(ValueError, match="case must be"):   # validation stays in the dataclass
        cli.from_args(InfluenceArgs, ap.parse_args(["--case", "frozen"]))
    with pytest.raises(ValueError, match="does not have"):
        cli.add_arguments(argparse.ArgumentParser(), PresenceArgs, defaults={"tau": 1.0})


def test_the_beam_and_pipeline_clis_take_the_dataclasses():
    from pipelines import presence_pipeline
    from tfx_components import beam_factors
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        beam_factors.main(["--help"])
    assert "--fisher {true,empirical}" in out.getvalue() and "FactorArgs" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        presence_pipeline.main(["--help"])
    assert "--presence-tau1" in out.getvalue() and "default: -1.0; PresenceArgs's: 1.0" in out.getvalue()


def test_the_pipelines_share_run_args_with_a_repeatable_beam_flag(monkeypatch):
    """The three pipelines' where-and-how flags come from one ``RunArgs``: each gives its own root, a
    repeatable ``--beam-arg`` keeps values that start with ``--`` in order, a bad runner is refused."""
    import importlib

    from pipelines.summary import RunArgs
    seen = {}
    for name, root in (("influence_pipeline", "reports/pipelines/influence"),
                       ("presence_pipeline", "reports/pipelines/presence"),
                       ("penguin_pipeline", "reports/pipelines/penguin")):
        module = importlib.import_module(f"pipelines.{name}")

        def fake_execute(n, make, root_, runner, image, report, extra, t0, verbose=False, name=name):
            seen[name] = (n, root_, runner, image, report)
        monkeypatch.setattr(module, "execute", fake_execute)
        if name == "influence_pipeline":
            monkeypatch.setattr("pipelines.digits_data.write", lambda *a, **k: {})
        if name == "presence_pipeline":
            monkeypatch.setattr("pipelines.text_data.write", lambda *a, **k: {})
        module.main(["--beam-arg=--direct_num_workers=3", "--beam-arg=--runner=DirectRunner",
                     "--runner", "kubeflow_v2", "--image", "img:1"])
        import os
        assert seen[name] == (name, os.path.abspath(root), "kubeflow_v2", "img:1", None), name
    ap = argparse.ArgumentParser()
    cli.add_arguments(ap, RunArgs, defaults={"root": "r"})
    run = cli.from_args(RunArgs, ap.parse_args(["--beam-arg=--a=1", "--beam-arg=--b"]))
    assert run == RunArgs(root="r", beam_args=["--a=1", "--b"])
    assert cli.from_args(RunArgs, ap.parse_args([])) == RunArgs(root="r")
    with pytest.raises(SystemExit):
        ap.parse_args(["--runner", "dataflow"])
    with pytest.raises(ValueError, match="RunArgs.runner must be one of"):
        RunArgs(root="r", runner="dataflow")


@pytest.mark.parametrize("module", ["tfx_components.beam_scoring", "tfx_components.beam_factors",
                                    "tfx_components.beam_index",
                                    "pipelines.influence_pipeline", "pipelines.presence_pipeline",
                                    "pipelines.penguin_pipeline", "pipelines.synthetic_corpus", "experiments.demo",
                                    "experiments.reproduce.cli", "experiments.presence_lm.cli",
                                    "experiments.presence_text"])
def test_every_flag_of_every_cli_is_documented(module, monkeypatch):
    """``--help`` documents every flag (deprecated aliases are hidden on purpose)."""
    import importlib
    parsers = []

    class Stop(Exception):
        pass

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise Stop
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Stop):
        importlib.import_module(module).main(["--help"])
    todo, undocumented = [parsers[0]], []
    while todo:
        parser = todo.pop()
        parser.format_help()                      # renders (a '%' in a help text would raise here)
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(a.choices.values())   # subcommands (beam_index build / query)
            elif a.option_strings and a.help is None:
                undocumented.append(a.option_strings)
    assert not undocumented, undocumented


def test_the_scoring_and_index_jobs_share_one_example_source(monkeypatch, capsys):
    """One name per concept: the examples / model / feature flags of the three Beam jobs are generated
    from ``ExampleSource`` (same flags, help texts, defaults; required where it has no default — the
    factor job's ``--examples`` alone takes several patterns), and a bad value is refused by the
    dataclass, naming the field."""
    import dataclasses
    import importlib

    from tfx_components.example_io import ExampleSource
    actions = {}
    for module, argv in (("tfx_components.beam_scoring", []), ("tfx_components.beam_index", ["build"]),
                         ("tfx_components.beam_factors", [])):
        parsers = []
        real = argparse.ArgumentParser.parse_known_args

        def capture(self, args=None, namespace=None, parsers=parsers):
            parsers.append(self)
            return real(self, args, namespace)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(SystemExit):
            importlib.import_module(module).main([*argv, "--examples", "x", "--model", "m", "--output", "o",
                                                  "--batch-size", "0"])
        assert "ExampleSource.batch_size must be ≥ 1, got 0" in capsys.readouterr().err
        monkeypatch.undo()
        parser = parsers[-1]
        actions[module] = {a.dest: (a.option_strings, a.help, a.default, a.required) for a in parser._actions}
    for f in dataclasses.fields(ExampleSource):
        scoring, index = actions["tfx_components.beam_scoring"][f.name], actions["tfx_components.beam_index"][f.name]
        assert scoring == index, f.name
        assert scoring[3] == (f.default is dataclasses.MISSING), f.name
        if f.name != "examples":
            assert actions["tfx_components.beam_factors"][f.name] == scoring, f.name


BENCHMARKS = {"engine": "EngineBenchArgs", "presence": "PresenceBenchArgs", "kfac_digits": "KfacDigitsBenchArgs",
              "beam_scale": "BeamScaleBenchArgs", "hub": "HubBenchArgs", "index": "IndexBenchArgs",
              "scale": "ScaleBenchArgs"}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_the_benchmark_flags_are_generated_from_their_dataclasses(name):
    """Every benchmark reads one arguments dataclass through the generated flags (no hand-written
    ``add_argument``): no flags give its defaults, and list flags convert their values."""
    import importlib
    import inspect

    from benchmarks.common import parse_args
    module = importlib.import_module(f"benchmarks.{name}")
    assert "add_argument(" not in inspect.getsource(module)
    cls = getattr(module, BENCHMARKS[name])
    assert parse_args(cls, [], None) == cls()
    with pytest.raises(SystemExit):                      # an unknown flag is a usage error
        parse_args(cls, ["--no-such-flag", "1"], None)


def test_benchmark_list_flags_take_typed_values():
    from benchmarks.common import parse_args
    from benchmarks.index import IndexBenchArgs
    args = parse_args(IndexBenchArgs, ["--models", "gpt2", "--gpt2-n", "10000", "--rerank", "500", "--parts",
                                       "quality", "--scale-sizes", "1000", "2000"], None)
    assert (args.models, args.gpt2_n, args.rerank, args.parts, args.scale_sizes) == (
        ["gpt2"], 10000, 500, ["quality"], [1000, 2000])
    with pytest.raises(SystemExit):                      # a choice outside the list
        parse_args(IndexBenchArgs, ["--models", "gpt3"], None)


def test_the_demo_takes_influence_args_flags_and_keeps_cg_iters_for_one_release():
    import tf_influence as tfi
    from experiments.demo import DemoArgs, parse
    demo, args = parse([])
    assert demo == DemoArgs() and args == tfi.InfluenceArgs()        # the library's defaults, not a copy
    demo, args = parse(["--case", "updated", "--alpha", "0.05", "--seed", "3", "--top", "2"])
    assert (args.case, args.alpha, args.seed, demo.seed, demo.top) == ("updated", 0.05, 3, 3, 2)
    with pytest.warns(DeprecationWarning, match="--cg-iters is deprecated"):
        _, args = parse(["--cg-iters", "50"])
    assert args.pretrain_solver.iterative.max_iter == args.finetune_solver.iterative.max_iter == 50
    with pytest.raises(SystemExit):
        parse(["--test-target", "each"])


def test_the_influence_pipeline_reads_influence_args_whole(monkeypatch):
    """Every InfluenceArgs field is a flag of the main job, with the pipeline's defaults; a solver
    flag takes a bare method name or JSON; the scorer gets exactly the parsed object."""
    import tf_influence as tfi
    from pipelines import influence_pipeline as ip
    seen = {}
    monkeypatch.setattr(ip, "execute", lambda name, make, *a, **k: seen.setdefault("extra", a[4]))
    monkeypatch.setattr("pipelines.digits_data.write", lambda *a, **k: {})
    ip.main(["--root", "/tmp/unused-influence-root", "--pretrain-solver", "ekfac",
             "--finetune-solver", '{"method": "cg_squared", "iterative": {"max_iter": 7}}', "--hessian-samples", "100"])
    args = tfi.InfluenceArgs.from_dict(seen["extra"]["influence_args"])
    assert args.pretrain_solver == tfi.SolverConfig("ekfac")
    assert (args.finetune_solver.method, args.finetune_solver.iterative.max_iter, args.hessian_samples) == (
        "cg_squared", 7, 100)
    seen.clear()
    ip.main(["--root", "/tmp/unused-influence-root"])
    assert tfi.InfluenceArgs.from_dict(seen["extra"]["influence_args"]) == ip.pipeline_influence_args()
    with pytest.raises(SystemExit):
        ip.main(["--root", "/tmp/unused-influence-root", "--case", "updated"])


def test_the_main_job_starts_without_library_noise():
    """``python -m pipelines.influence_pipeline``: TensorFlow is quieted before the configuration
    classes import it, so the first lines a person reads are the command's, not TensorFlow's."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-m", "pipelines.influence_pipeline", "--help"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: ")
    assert "Unable to register" not in out.stderr and "tensorflow/" not in out.stderr, out.stderr[:500]
