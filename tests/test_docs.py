"""The examples users copy: README and docs/ code blocks (Python run, `edje` commands parsed),
their relative links, and the public docstrings run as written."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from edje.evaluation.zero_shot import HELD_OUT
from tests.helpers.paths import ROOT

DOCTESTED = [
    "edje.backbones",
    "edje.data",
    "edje.data.builtin",
    "edje.data.emoji",
    "edje.data.icon_captions",
    "edje.data.npm",
    "edje.data.load",
    "edje.evaluation.metrics",
    "edje.fusion",
    "edje.scoring",
    "edje.configuration_edje",
    "edje.modeling_edje",
    "edje.processing_edje",
    "edje.ranking",
    "edje.rerank",
    "edje.training.losses",
    "edje.training.sampling",
]


DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
# "text" blocks are diagrams and trees, not code; every other block is run or parsed.
LANGUAGES = {"python", "bash", "text"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(path: Path, language: str | None = None) -> list[str]:
    blocks = FENCE.findall(path.read_text())
    return [code for lang, code in blocks if language is None or lang.strip() == language]


def prose(path: Path) -> str:
    """The page without its fenced blocks (links and indented code are looked for here)."""
    return FENCE.sub("", path.read_text())


def run_python_blocks(path: Path, tmp_path, monkeypatch) -> dict:
    """Every Python block of a page, in order and in one namespace, as a reader runs them."""
    blocks = code_blocks(path, "python")
    assert blocks, page_id(path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, page_id(path), "exec"), namespace)
    return namespace


def check_readme(namespace: dict, tmp_path: Path) -> None:
    store, ranking = namespace["store"], namespace["ranking"]
    assert len(store) == 6 and store.gather(["test-0000-scene"]).shape == (1, 16, 384)
    # The caption's own scene comes first, and its picture (encoded on the fly) scores as its
    # stored tokens do (fp16 storage aside).
    scene, picture = store.ids.index("test-0000-scene"), len(store.ids)
    first, second = ranking[0], ranking[1]
    assert {first["corpus_id"], second["corpus_id"]} == {scene, picture}
    assert abs(first["score"] - second["score"]) < 1e-3 and ranking[2]["score"] < first["score"]


def check_model(namespace: dict, tmp_path: Path) -> None:
    assert (tmp_path / "my-edje" / "model.safetensors").is_file()
    assert namespace["tokens"].shape == (1, 64, 384) and namespace["scores"].shape == (8,)


def check_store(namespace: dict, tmp_path: Path) -> None:
    assert namespace["stored"].shape == (1, 16, 384)


def check_reranking(namespace: dict, tmp_path: Path) -> None:
    scores, ranking = namespace["scores"], namespace["ranking"]
    assert len(scores) == 2 and scores[0] > scores[1]  # a scene beats its colour swap
    assert ranking[0]["corpus_id"] == 0 and len(namespace["by_image"]) == 3
    exact = namespace["exact_ranking"]
    assert [e["corpus_id"] for e in exact] == [e["corpus_id"] for e in ranking]
    assert [e["score"] for e in exact] == pytest.approx([e["score"] for e in ranking], abs=1e-5)


def check_icons(namespace: dict, tmp_path: Path) -> None:
    table = namespace["table"]
    assert list(table.reports) == ["icons-validation", *HELD_OUT] and table.depth in (10, 20)


def icons_page_inputs(request, tmp_path: Path) -> None:
    """What docs/icons.md's example reads: a built corpus with its first stage (the fixture's)
    and a model (the shipped one) where the page says."""
    from edje.quickstart import shipped_checkpoint

    corpus, _ = request.getfixturevalue("icon_corpus")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "icons").symlink_to(corpus)
    shutil.copytree(shipped_checkpoint(), tmp_path / "outputs" / "pretrain_icons" / "model")


# What a page's examples must have made, beyond running without an error.
CHECKS = {
    "README.md": check_readme,
    "docs/model.md": check_model,
    "docs/store.md": check_store,
    "docs/reranking.md": check_reranking,
    "docs/icons.md": check_icons,
}
INPUTS = {"docs/icons.md": icons_page_inputs}  # made before a page's examples run


def test_every_page_with_python_is_checked():
    with_python = {page_id(p) for p in PAGES if code_blocks(p, "python")}
    assert with_python == set(CHECKS)


@pytest.mark.parametrize("page", sorted(CHECKS))
def test_python_examples_run(page, tmp_path, monkeypatch, request):
    if page in INPUTS:
        INPUTS[page](request, tmp_path)
    namespace = run_python_blocks(ROOT / page, tmp_path, monkeypatch)
    CHECKS[page](namespace, tmp_path)


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, split on
    `&&`, `||`, `|` and `;`."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", "|", ";"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def check_edje_command(argv: list[str], workdir: Path) -> None:
    """Parsed by edje's own parser in `workdir` (nothing run): the command and its options exist
    and their values are taken. A folder the example reads (`--images photos/`) is made empty
    first, as the reader would have it; only relative ones."""
    from edje.cli import build_parser

    args = [a for a in argv if a not in ("-v", "--verbose")]
    for _ in range(len(args) + 1):
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                parsed, rest = build_parser().parse_known_args(args)
            break
        except SystemExit:
            missing = re.search(r"no such (?:file or )?folder: (\S+) \(see", said.getvalue())
            if not missing or Path(missing.group(1)).is_absolute():
                raise AssertionError(f"edje {' '.join(argv)}: {said.getvalue()}") from None
            (workdir / missing.group(1)).mkdir(parents=True)
    assert getattr(parsed, "func", None), argv
    if not getattr(parsed, "pass_through", False):
        assert not rest, (argv, rest)
    if args[0] == "fit" and "--config" in args:  # a recipe by name or by its path
        recipe = args[args.index("--config") + 1]
        path = ROOT / recipe if recipe.endswith(".yaml") else ROOT / "recipes" / f"{recipe}.yaml"
        assert path.is_file(), argv


def shell_pages() -> list[str]:
    return [page_id(p) for p in PAGES if code_blocks(p, "bash")]


@pytest.mark.parametrize("page", shell_pages())
def test_shell_examples_name_real_commands(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for block in code_blocks(ROOT / page, "bash"):
        for argv in shell_commands(block):
            program = Path(argv[0]).name
            if program == "edje":
                check_edje_command(argv[1:], tmp_path)
                checked += 1
            elif program in ("python", "python3") and argv[1].endswith(".py"):
                assert (ROOT / argv[1]).is_file(), argv  # bench scripts
                checked += 1
            elif program == "bash":
                assert (ROOT / argv[1]).is_file(), argv
    assert checked, page


@pytest.mark.parametrize("page", [page_id(p) for p in PAGES])
def test_pages_hold_only_checked_code(page):
    """Every fenced block is Python (run), shell (parsed) or a text diagram; no indented code
    blocks, which neither would see."""
    for lang, _ in FENCE.findall((ROOT / page).read_text()):
        assert lang.strip() in LANGUAGES, (page, lang)
    lines = prose(ROOT / page).splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        assert not (before.strip() == "" and line.startswith("    ") and line.strip()), line


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", prose(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [page_id(p) for p in PAGES])
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), (page, target)
        assert ROOT in resolved.parents or resolved == ROOT, (page, target)
        if anchor:
            assert resolved.suffix == ".md" and anchor in anchors(resolved), (page, target)


@pytest.mark.parametrize("module_name", DOCTESTED)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
