"""README.md and docs/*.md against the code: every command parses, every flag named exists, the file table and the
import graph are true, and the README stays a newcomer's page."""
import ast
import dataclasses
import glob
import os
import re
import shlex

import pytest

import bench
import config
import rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
OTHER_TOOLS = {"--index-url", "--nproc_per_node", "--system-site-packages"}  # pip's, torchrun's, venv's
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def page_text(path):
    return open(path, encoding="utf-8").read()


def commands(text):
    """Every shell command on a page: the lines of fenced code blocks (continuations joined) and inline code."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        out += [line for line in block.replace("\\\n", " ").split("\n") if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    out += re.findall(r"`([^`\n]+)`", prose.replace("\n", " "))  # inline code may wrap across a line end
    return out


def args_after(cmd, script):
    """The arguments of `script` in a command line that runs it (python or torchrun), without a trailing comment;
    None for a command that does not run it."""
    if script not in cmd:
        return None
    words = shlex.split(re.split(r"\s#\s", cmd)[0])
    for i, w in enumerate(words):
        if w == script and i and (words[i - 1] in ("python", "python3") or words[0] == "torchrun"):
            return [a for a in words[i + 1:] if a != "..."]  # "..." stands for more flags
    return None


def train_flags():
    """Every flag train.py takes: one per TrainConfig field, --no-X for the booleans, and --help."""
    fs = dataclasses.fields(config.TrainConfig)
    return {"--" + f.name.replace("_", "-") for f in fs} | \
        {"--no-" + f.name.replace("_", "-") for f in fs if isinstance(f.default, bool)} | {"--help"}


def bench_flags():
    """Every flag bench.py takes, from its BenchConfig the same way."""
    fs = dataclasses.fields(bench.BenchConfig)
    return {"--" + f.name.replace("_", "-") for f in fs} | \
        {"--no-" + f.name.replace("_", "-") for f in fs if f.type is bool}


@pytest.mark.parametrize("path", PAGES, ids=os.path.basename)
def test_every_train_and_bench_command_parses(path):
    """Each `python train.py ...` and `python bench.py ...` on the page is accepted by that script's own parser."""
    ran = 0
    for cmd in commands(page_text(path)):
        for script, parse in (("train.py", config.parse_args), ("bench.py", bench.parse_args)):
            argv = args_after(cmd, script)
            if argv is None:
                continue
            try:
                parse(argv)
            except SystemExit as e:  # argparse's exit: 0 after --help, 2 for a command it refuses
                if e.code == 0:
                    continue
                raise AssertionError(f"{os.path.basename(path)}: {script} refuses: {cmd}") from e
            ran += 1
    if path.endswith("README.md"):
        assert ran >= 8  # the two commands, the quick start, training usage, benchmarks


def viewer_flags():
    """Every flag rollouts.py (the rollout log's viewer) takes."""
    return {s for a in rollouts.build_parser()._actions for s in a.option_strings}


@pytest.mark.parametrize("path", PAGES, ids=os.path.basename)
def test_every_flag_named_exists(path):
    """A flag named anywhere on the page, in prose or in a table, is a field of TrainConfig (or another tool's)."""
    known = train_flags() | bench_flags() | viewer_flags() | OTHER_TOOLS
    named = set(FLAG.findall(page_text(path)))
    assert named, path
    assert named <= known, f"{os.path.basename(path)} names flags that do not exist: {sorted(named - known)}"


def test_the_flag_check_catches_a_stale_flag():
    assert "--max-new-tokens" in train_flags() and "--max-new-token" not in train_flags()
    assert set(FLAG.findall("`--judge-weight 0.5` and --gone-flag")) == {"--judge-weight", "--gone-flag"}
    with pytest.raises(SystemExit):
        config.parse_args(args_after("python train.py --task arith --steps many", "train.py"))


def project_imports():
    """{module: the project modules it imports} for every top-level .py file."""
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + ".py")).read())
        found = set()
        for node in ast.walk(tree):  # also imports inside functions (bench imports train lazily)
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
        graph[m] = found & mods - {m}
    return graph


def test_import_graph_is_as_the_readme_states():
    g = project_imports()
    for leaf in ("model", "grpo", "rewards", "report"):  # a forker lifts these alone
        assert g[leaf] == set(), (leaf, g[leaf])
    assert g["sample"] == {"model"}  # sample, lifted with model, imports nothing new either
    assert {m for m, deps in g.items() if "train" in deps} == {"bench"}
    for low in ("model", "grpo", "rewards", "sample", "tokenizer", "lora", "judge", "tasks", "wordle", "play"):
        assert "config" not in g[low]  # BadInput belongs to the training side; lower files raise standard errors
    # no cycle: repeatedly remove the modules that import nothing left
    left = dict(g)
    while left:
        free = {m for m, deps in left.items() if not deps & set(left)}
        assert free, f"import cycle among {sorted(left)}"
        left = {m: d for m, d in left.items() if m not in free}
    readme = page_text(PAGES[0])
    for m, deps in g.items():  # the README's file table lists every file
        assert f"| `{m}.py` |" in readme, m


def test_readme_is_a_newcomers_page():
    text = page_text(PAGES[0])
    assert len(text.split("\n")) < 300
    head = text[:text.index("## CPU quick start")]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in head  # a CPU user's torch first
    assert head.index("--index-url") < head.index("pip install -r requirements.txt && python -m pytest -q tests")
    for path in PAGES:  # relative links to other pages and pictures resolve
        for target in re.findall(r"\]\(((?!https?:)[^)#]+)", page_text(path)):
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), (path, target)
