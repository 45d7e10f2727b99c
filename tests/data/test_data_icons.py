"""The icon corpus on a fixture of real icons (tests/fixtures/icons: a few icons of twelve iconify
sets with their licences, and the side packages' entries for them): readable captions, the
zero-shot hold-out (checked over a whole built corpus by `edje data check`), shards that
edje's shard readers and `edje encode --shards` read, deterministic and resumable builds, and
npm fetches that fail clearly and leave nothing behind."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from edje.data.icon_captions import icon_caption, icon_concept
from edje.data.icon_shards import build_icon_corpus, check_icon_corpus
from edje.data.icons import catalogue
from edje.data.npm import NpmFetchError, NpmPackage, fetch_npm_package
from tests.helpers.icons import fixture_icon_source
from tests.helpers.paths import ROOT


@pytest.fixture(scope="module")
def source():
    return fixture_icon_source()


@pytest.fixture(scope="module")
def icons(source):
    return {icon.key: icon for icon in catalogue(source)}


@pytest.fixture
def corpus(icon_corpus):
    """The session's built fixture corpus (with its first stage), read only."""
    return icon_corpus


def test_names_read_as_words_with_style_words_written_out_and_sizes_dropped():
    assert icon_caption("arrow-left-bold-circle-outline") == "arrow left bold circle outline"
    assert icon_caption("home-fill-24px") == "home filled"
    assert icon_caption("clock-16-filled") == "clock filled"
    assert icon_caption("zap-sharp-two-tone") == "zap sharp two-tone"
    assert icon_caption("sharp-save-alt") == "sharp save alternative"
    assert icon_caption("42") == ""  # nothing readable: left out
    assert icon_concept("home-outline-rounded") == icon_concept("home-fill") == "home"


def test_captions_come_from_names_aliases_tags_and_cldr(icons):
    cook = icons["twemoji__woman-cook-medium-light-skin-tone"]
    assert cook.caption == "a woman cook with medium-light skin"  # edje's emoji caption rule
    assert cook.codepoints == "1f469-1f3fc-200d-1f373"
    assert "woman cook, medium-light skin tone" in cook.captions  # emojibase's label
    assert any("chef" in c for c in cook.captions)  # and its keywords
    # a set without code points joins through the name ("-1" is a variant number)
    angel = icons["streamline-emojis__baby-angel-1"]
    assert angel.caption == "a baby angel" and angel.concept == "baby angel"
    mdi = icons["mdi__account-network-outline"]
    assert mdi.caption == "account network outline"
    assert "user network outline" in mdi.captions  # an MDI alias
    acorn = icons["ph__acorn-bold"]
    assert acorn.caption == "acorn bold" and any("savings" in c for c in acorn.captions)
    assert all(c == c.strip() and c for icon in icons.values() for c in icon.captions)


def test_the_hold_out_puts_each_icon_where_the_protocol_says(icons, source):
    assert source.held_concepts["baby angel"] == "test"  # a held-out concept of load_emoji
    assert source.held_concepts["airplane departure"] == "validation"
    split = {key: icon.split for key, icon in icons.items()}
    for style in ("twemoji", "fluent-emoji", "streamline-emojis"):
        assert split[f"{style}__{'baby-angel-1' if 'streamline' in style else 'baby-angel'}"] == (
            "heldout-concepts"
        )
    assert split["twemoji__airplane-departure"] == "validation"
    assert split["fluent-emoji__airplane-departure"] == "validation"
    # "airplane" is a one-word keyword of the validation concept "airplane departure"
    assert split["streamline-emojis__airplane"] == "validation"
    assert split["twemoji__duck"] == split["mdi__home"] == split["ph__acorn"] == "train"
    assert split["noto__baby-angel"] == "heldout-noto"
    assert split["emojione__baby-angel"] == "heldout-emojione"
    assert split["noto__duck"] == split["emojione__duck"] == "excluded"  # edje's own artwork
    assert {split[k] for k in icons if k.startswith("openmoji__")} == {"heldout-style"}
    assert {split[k] for k in icons if k.startswith("game-icons__")} == {"heldout-set"}
    # "baby" is a one-word CLDR keyword of the held-out "baby angel": icons named so are out
    assert split["ph__baby"] == split["twemoji__baby"] == "excluded"
    assert icons["ph__baby"].reason == "a held-out label"
    assert split["typcn__home"] == "excluded" and "CC-BY-SA" in icons["typcn__home"].reason
    assert not any(k.startswith(("logos__", "ps__")) for k in icons)  # logos; non-commercial


def test_a_built_corpus_passes_its_hold_out_check_and_lists_sets_and_licences(corpus, icons):
    out, manifest = corpus
    counts = check_icon_corpus(out, show_progress=False)
    assert counts == {"train": manifest["splits"]["train"],
                      "validation": manifest["splits"]["validation"]}  # fmt: skip
    assert manifest["failed"] == {}
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["twemoji"]["license"]["spdx"] == "CC-BY-4.0"
    assert "Twitter" in (out / "ATTRIBUTION.md").read_text()
    record = json.loads(_member(out / manifest["shards"][0]["path"], ".json"))
    assert {"set", "licence", "attribution", "captions", "concept", "codepoints"} <= set(record)
    twemoji = next(icon for icon in icons.values() if icon.set == "twemoji")
    assert twemoji.attribution.startswith("Twitter Emoji by Twitter (") and "CC BY 4.0" in (
        twemoji.attribution
    )


def test_the_check_finds_a_held_out_sample_slipped_into_a_training_shard(corpus, tmp_path):
    import shutil

    out, manifest = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    shard = copy / manifest["shards"][0]["path"]
    with tarfile.open(shard, "a") as tar:
        record = {"key": "openmoji__duck", "set": "openmoji", "name": "duck",
                  "codepoints": "1f986", "split": "train"}  # fmt: skip
        data = json.dumps(record).encode()
        info = tarfile.TarInfo("openmoji__duck.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="set openmoji is held out") as caught:
        check_icon_corpus(copy, show_progress=False)
    assert "sha256 differs" in str(caught.value)


def test_shards_are_what_shard_images_stream_shards_and_encode_read(
    corpus, vision_folder, tmp_path
):
    from edje.cli import main
    from edje.data.shards import ShardImages, stream_shards
    from edje.store import TokenStore

    out, manifest = corpus
    train = sorted(str(p) for p in (out / "train").glob("*.tar"))
    samples = ShardImages(train)
    assert len(samples) == manifest["splits"]["train"] and all(samples.captions)
    streamed = list(stream_shards(train))
    assert sorted(row["__key__"] for row in streamed) == sorted(samples.ids)
    assert {row["caption"] for row in streamed} == set(samples.captions)
    store = tmp_path / "store"
    argv = ["encode", "--vision", str(vision_folder), "--shards", *train, "--out", str(store),
            "--devices", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(TokenStore.open(store).ids) == sorted(samples.ids)


def test_the_build_is_deterministic_and_resumes_without_rendering_kept_shards(
    corpus, source, tmp_path
):
    _, manifest = corpus
    again = tmp_path / "again"
    first = build_icon_corpus(again, source=source, shard_size=4, workers=1, show_progress=False)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in manifest["shards"]]
    kept = again / first["shards"][0]["path"]
    os.utime(kept, (1, 1))
    (again / first["shards"][1]["path"]).unlink()  # a run stopped before this shard
    second = build_icon_corpus(again, source=source, shard_size=4, workers=1, show_progress=False)
    assert kept.stat().st_mtime == 1  # kept, not rendered again
    assert second["shards"] == first["shards"]
    with pytest.raises(ValueError, match="other image_size"):  # shards of another size stay
        build_icon_corpus(again, source=source, image_size=64, shard_size=4, workers=1)


def test_evaluation_sets_load_by_name(corpus):
    from edje.data import load_data

    out, manifest = corpus
    style = load_data("icons-heldout-style", data_dir=str(out))
    assert (
        list(style) == ["test"]
        and len(style["test"]) == manifest["eval_sets"]["icons-heldout-style"]
    )
    assert style["test"][0]["captions"][0].startswith(("a ", "an ", "the "))
    concepts = load_data("icons-heldout-concepts", data_dir=str(out))["test"]
    captions = [c for row in concepts["captions"] for c in row]
    assert len(captions) == len(set(captions)) == len(concepts)  # one image per caption
    assert len(concepts) < manifest["splits"]["heldout-concepts"]  # baby angel in 3 styles: one
    with pytest.raises(ValueError, match="edje data build icons"):
        load_data("icons-heldout-set", data_dir=str(out / "nothing"))


def test_edje_data_check_says_intact_or_refuses_in_one_line(corpus, tmp_path):
    import subprocess
    import sys

    out, _ = corpus
    check = [sys.executable, "-c", "import edje_cli; edje_cli.run()", "data", "check"]
    done = subprocess.run([*check, str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and "intact" in done.stdout, done.stderr
    done = subprocess.run([*check, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "manifest.json" in done.stderr


# ---- npm fetches ------------------------------------------------------------------------------


def _member(shard: Path, suffix: str) -> bytes:
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(suffix))
        return tar.extractfile(member).read()


def _tarball(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _sri(path.read_bytes())


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _fake_npm(folder: Path, tarball: Path | None, fail: str = "") -> str:
    """An `npm` that answers `npm pack SPEC --json --pack-destination D` as npm does: it copies
    `tarball` into D and prints the JSON, or fails with `fail` on stderr."""
    script = folder / "npm"
    body = (
        f'echo "{fail}" >&2; exit 1'
        if fail
        else f'cp {tarball} "$5/{tarball.name}"; echo \'[{{"filename": "{tarball.name}"}}]\''
    )
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_package_is_fetched_checked_and_unpacked_once(tmp_path):
    tarball = tmp_path / "pkg-1.0.0.tgz"
    integrity = _tarball(tarball, {"package/data.json": b"{}"})
    package = NpmPackage("@x/pkg", "1.0.0", integrity)
    folder = fetch_npm_package(package, tmp_path / "cache", npm=_fake_npm(tmp_path, tarball))
    assert (folder / "data.json").read_bytes() == b"{}"
    assert fetch_npm_package(package, tmp_path / "cache", npm="no-such-npm") == folder  # cached


@pytest.mark.parametrize("case", ["npm fails", "no npm", "other bytes", "corrupt tarball"])
def test_a_failed_fetch_names_the_package_and_leaves_nothing(tmp_path, case):
    tarball = tmp_path / "pkg-1.0.0.tgz"
    integrity = _tarball(tarball, {"package/data.json": b"{}"})
    npm = _fake_npm(tmp_path, tarball)
    if case == "npm fails":
        npm = _fake_npm(tmp_path, None, fail="npm error 404 Not Found - @x/pkg@1.0.0")
    elif case == "no npm":
        npm = str(tmp_path / "missing-npm")
    elif case == "other bytes":
        integrity = _sri(b"x")
    else:
        tarball.write_bytes(b"\x1f\x8b not a gzip stream")
        integrity = (
            "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        )
    cache = tmp_path / "cache"
    with pytest.raises(NpmFetchError, match=r"@x/pkg@1\.0\.0"):
        fetch_npm_package(NpmPackage("@x/pkg", "1.0.0", integrity), cache, npm=npm)
    assert not cache.exists() or not any((cache / "npm").iterdir())


# ---- the pretraining recipe on the fixture's shards ---------------------------------------------


def test_pretrain_icons_runs_a_few_steps_on_the_corpus_shards(
    corpus, offline_dinov2_dir, tmp_path, monkeypatch
):
    """recipes/pretrain_icons.yaml as shipped (real offline backbones, online vision, negatives
    from a first stage fitted on the shards by `edje data first-stage`), two steps."""
    from edje import EDJEModel
    from edje.cli import main

    out, manifest = corpus  # its first stage: `edje data first-stage` on 16 of its images
    monkeypatch.chdir(tmp_path)
    train = sorted(str(p) for p in (out / "train").glob("*.tar"))
    recipe = ROOT / "recipes" / "pretrain_icons.yaml"
    argv = ["fit", "--config", str(recipe), "--trainer.max_steps", "2",
            "--trainer.precision", "32-true", "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "0",
            "--data.init_args.first_stage", str(out / "first_stage"),
            "--data.init_args.samples_per_epoch", str(manifest["splits"]["train"]),
            "--data.init_args.shards", json.dumps(train)]  # fmt: skip
    assert main(argv) == 0
    model = EDJEModel.from_pretrained(tmp_path / "outputs" / "pretrain_icons" / "model")
    assert model.config.image_token_shape == (32, 384)  # the recipe's stored tokens
    assert (tmp_path / "outputs" / "pretrain_icons" / "last.ckpt").is_file()  # resumable
