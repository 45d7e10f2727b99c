"""The quickstart: the built-in scenes and the emoji, encoded once, a first stage, EDJE
reranking, recall on each set's test split.

Every step leaves its result in the output folder and is skipped when it is already there, so a
second run on the same folder reuses the store, the first stage and the model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from edje._utils import OWNED_MARK, atomic_folder, refuse_foreign_folder
from edje.backbones import OFFLINE_TEXT, OFFLINE_VISION
from edje.data import load_data

IMAGE_SIZE = 112  # 65 raw tokens per scene: CLS + 8 x 8 patches
SHIPPED_CHECKPOINT = "quickstart"  # edje/checkpoints/<name>
SHIPPED_FIRST_STAGES = "quickstart_first_stages"
DATA = "builtin+emoji"
DATA_SETS = {"builtin": "edje built-in scenes", "emoji": "Noto emoji (CLDR names)"}


class Steps:
    """Numbered, timed progress lines."""

    def __init__(self) -> None:
        self.count, self.start = 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.count += 1
        print(f"[{self.count}] {message} ({time.perf_counter() - self.start:.1f}s)", flush=True)


def shipped_checkpoint() -> Path:
    """The trained quickstart EDJE shipped inside the package."""
    return Path(str(resources.files("edje").joinpath("checkpoints", SHIPPED_CHECKPOINT)))


def shipped_first_stages() -> Path:
    """The first stages the shipped checkpoint is carded with, one folder per data set
    (`builtin/`, `emoji/`): the offline linear probe fitted on that set's train split."""
    return Path(str(resources.files("edje").joinpath("checkpoints", SHIPPED_FIRST_STAGES)))


def recipe_path(name: str = "quickstart.yaml") -> Path:
    """A recipe installed with the package as `edje.recipes` (`recipes/quickstart.yaml`)."""
    return Path(str(resources.files("edje.recipes").joinpath(name)))


def run_quickstart(
    out: str | Path,
    *,
    model: str | None = None,
    train: bool = False,
    builtin: dict[str, int] | None = None,
    k: int = 10,
    icons: str | Path | None = None,
) -> Path:
    """Run the quickstart into `out`; returns the report folder, with one folder per data set
    (`report/builtin`, `report/emoji`, and `report/icons` with `icons`).

    `model` is an EDJE folder to rerank with (by default the shipped checkpoint), over the
    shipped first stage; with `train=True` every split is encoded, a first stage fitted on the
    train splits and an EDJE trained here from `recipes/quickstart.yaml` then
    `recipes/quickstart_emoji.yaml`. `builtin` sizes a reduced built-in set (tests). `icons`
    is a built icon corpus with its first stage (`edje data build icons --out DIR`, `edje data
    first-stage DIR`): its held-out sets are reranked zero-shot too, at depth `k`, fused with
    weights chosen on its validation set (`edje.evaluation.zero_shot`).
    """
    from datasets import DatasetDict

    from edje.evaluation.zero_shot import corpus_first_stage

    icons_first_stage = corpus_first_stage(icons) if icons is not None else None  # before work
    out = Path(out).resolve()
    if model is None and not train and not (out / "model" / "config.json").is_file():
        refuse_foreign_folder(out / "model", "copy the shipped model into")  # before the work
    out.mkdir(parents=True, exist_ok=True)
    step = Steps()
    step("drawing the built-in scenes and the emoji")
    splits = load_data(DATA, builtin=builtin)
    sets = {name: DatasetDict({s: _only(splits[s], name) for s in splits}) for name in DATA_SETS}
    _encode_and_first_stages(out, train, splits, sets, step)
    step(f"raw token store ready: {out / 'raw.store'}; first stages: {out / 'first_stage'}")
    model_dir = _model_folder(out, model, train, builtin, step)
    report_root = out / "report"
    loaded = _load_model(model_dir)  # once, for every table
    suggestion = _reports(out, loaded, model_dir, sets, report_root, k, step)
    if icons is not None:
        _zero_shot_report(Path(icons), icons_first_stage, loaded, report_root, k, step)
    else:
        _drop_earlier_zero_shot(report_root, step)
    step(f"reports, plots and contact sheets in {report_root}")
    _print_next(out, model_dir, suggestion)
    return report_root


def _encode_and_first_stages(out: Path, train: bool, splits, sets: dict, step) -> None:
    """The raw store and one first stage per data set: all encoded and fitted here (`train`),
    or only the test images encoded beside a copy of the shipped first stages."""
    from edje.training import EDJEDataModule

    if train:
        step("encoding every split once with DINOv2-S (112 px), then fitting the first stages")
        for name, data in sets.items():  # each set's first stage fitted on its train split
            EDJEDataModule(
                data,
                store=str(out / "raw.store"),
                first_stage=str(out / "first_stage" / name),
                fit_first_stage=True,
                vision=OFFLINE_VISION,
                vision_image_size=IMAGE_SIZE,
                text=OFFLINE_TEXT,
            ).prepare_data()
    else:
        # The first stages the shipped model was carded with (they fit any EDJE on these
        # backbones), so only the test images need their tokens.
        step("encoding the test images once with DINOv2-S (112 px)")
        _encode(splits["test"], out / "raw.store")
        if not (out / "first_stage").is_dir():
            with atomic_folder(out / "first_stage") as partial:
                shutil.copytree(shipped_first_stages(), partial, dirs_exist_ok=True)
    for name in DATA_SETS:  # the test pictures and captions, for the search page
        if not (out / "images" / name).is_dir():
            _write_images(sets[name]["test"], out / "images" / name)


def _load_model(model_dir: Path):
    """The EDJE to rerank with and its processor, `(model, processor)`."""
    from edje import EDJEModel, EDJEProcessor

    return EDJEModel.from_pretrained(model_dir).eval(), EDJEProcessor.from_pretrained(model_dir)


def _reports(out: Path, loaded, model_dir: Path, sets: dict, report_root: Path, k: int, step):
    """Rerank each data set's first-stage top `k` with the model (`loaded`: model, processor),
    save and print the reports; returns the query `edje search` is suggested with (from the
    built-in set), or None."""
    from edje.evaluation import evaluate
    from edje.first_stage import load_embedding_model
    from edje.store import TokenStore

    edje, processor = loaded
    store = TokenStore.open(out / "raw.store")
    suggestion = None
    for name, title in DATA_SETS.items():
        step(f"{title}: reranking the test split's first-stage top {k} with EDJE from {model_dir}")
        test = sets[name]["test"]
        first_stage = load_embedding_model(out / "first_stage" / name)
        report = evaluate(
            test, first_stage, edje, processor, store, k=k, dataset_name=title
        )  # fmt: skip
        report.save(report_root / name, dataset=test, contact_sheet=4)
        if name == "builtin":  # the set `edje search` below searches with its first stage
            suggestion = suggested_query(report, test)
        print(report.to_markdown())
        if report.regressions():
            print(f"\nwarning: {report.regressions()}")
    return suggestion


def _zero_shot_report(corpus: Path, first_stage: Path, loaded, report_root, k, step):
    """The icon corpus's held-out sets, zero-shot with `loaded` (model, processor): printed, and
    saved as `report/icons/` `zero_shot.md` and `zero_shot.json`."""
    from edje.evaluation.zero_shot import zero_shot_icons
    from edje.first_stage import load_embedding_model

    def on_set(name: str) -> None:
        step(f"icon corpus, {name}: reranking the first-stage top {k} zero-shot")

    model, processor = loaded
    first = load_embedding_model(first_stage)
    table = zero_shot_icons(model, processor, first, corpus, depths=[k], on_set=on_set)
    markdown = table.to_markdown()
    with atomic_folder(report_root / "icons") as partial:
        (partial / "zero_shot.md").write_text(markdown + "\n")
        (partial / "zero_shot.json").write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    print(f"**zero-shot** on the icon corpus {corpus} (R@1 in percent)\n\n{markdown}")


def _drop_earlier_zero_shot(report_root: Path, step) -> None:
    """Remove the held-out table an earlier `--icons` run saved: the report folder is this
    run's, and that table may be another model's. A folder edje did not write stays."""
    folder = report_root / "icons"
    if (folder / OWNED_MARK).is_file():
        shutil.rmtree(folder)
        step(f"removed {folder}, an earlier --icons run's table (not measured with this model)")


def _print_next(out: Path, model_dir: Path, suggestion) -> None:
    print("\nTry next:")
    if suggestion:
        caption, image_id, rank = suggestion
        print(
            f'  # "{caption}", a test caption: its picture ({image_id}.png in '
            f"{out / 'images' / 'builtin'}) is the first stage's number {rank}, EDJE's first\n"
            f"  edje search --model {model_dir} --store {out / 'raw.store'} "
            f'--first-stage {out / "first_stage" / "builtin"} "{caption}"'
        )
    print(
        f"  edje serve --quickstart {out}    # then open http://127.0.0.1:8000/ (the search page)"
    )


def suggested_query(report, dataset) -> tuple[str, str, int] | None:
    """A test caption showing what the reranker adds: EDJE ranks its picture first among the
    first stage's candidates where the first stage does not (else where both do), by the
    widest margin of EDJE's logit over the best wrong candidate's; `(caption, image id, the
    first stage's 1-based rank)`, or None when EDJE ranks no caption's picture first."""
    import torch

    from edje.data import flatten_captions

    candidates = report.candidates
    if candidates is None or candidates.t2i_rerank is None:
        return None
    right = candidates.t2i == candidates.text_to_image[:, None]  # [captions, k]
    logits = candidates.t2i_rerank.float()
    margin = logits.masked_fill(~right, -torch.inf).amax(1) - logits.masked_fill(
        right, -torch.inf
    ).amax(1)
    won = margin > 0  # EDJE's first is the right picture (and it was among the candidates)
    shown = won & ~right[:, 0] if (won & ~right[:, 0]).any() else won
    if not shown.any():
        return None
    row = int(margin.masked_fill(~shown, -torch.inf).argmax())
    captions, _ = flatten_captions(dataset)
    image = int(candidates.text_to_image[row])
    return captions[row], dataset["image_id"][image], int(right[row].int().argmax()) + 1


def _only(split, name: str):
    """The rows of one data set in the combined split (emoji ids start with "emoji-")."""
    emoji = [i.startswith("emoji-") for i in split["image_id"]]
    return split.select([n for n, e in enumerate(emoji) if e == (name == "emoji")])


def _write_images(split, folder: Path) -> None:
    """`<image_id>.png` per test image and `captions.jsonl` (`{"caption", "image_id"}` each)."""
    with atomic_folder(folder) as partial, open(partial / "captions.jsonl", "w") as captions:
        for row in split:
            row["image"].save(partial / f"{row['image_id']}.png")
            for caption in row["captions"]:
                record = {"caption": caption, "image_id": row["image_id"]}
                captions.write(json.dumps(record) + "\n")


def _encode(split, store: Path) -> None:
    from edje.backbones import load_vision_encoder
    from edje.store.encode import encode_store

    vision, image_processor = load_vision_encoder(OFFLINE_VISION, image_size=IMAGE_SIZE)
    encode_store(
        split, store, vision_encoder=vision, image_processor=image_processor,
        id_column="image_id", image_column="image", devices=1,
    )  # fmt: skip


def _model_folder(out: Path, model, train, builtin, step) -> Path:
    if model is not None:
        return Path(model)
    trained = out / "outputs" / "quickstart-emoji" / "model"
    if train:
        if not (trained / "config.json").is_file():
            step("training EDJE from the quickstart recipes (minutes on a GPU, hours on a CPU)")
            _train(out, builtin)
        return trained
    # A copy in `out`, so the folder holds everything the printed `edje search` command needs.
    copied = out / "model"
    if not (copied / "config.json").is_file():
        copy_shipped_model(copied)
    return copied


def copy_shipped_model(dest: str | Path) -> Path:
    """The shipped checkpoint copied to `dest` with the code `save_pretrained` writes beside
    the weights (the package's copy needs none: edje is installed wherever it is), so the copy
    loads with `trust_remote_code=True` where edje is not installed. Written whole into a
    temporary folder first: a crash mid-copy leaves no half a model."""

    from transformers.dynamic_module_utils import custom_object_save

    from edje import EDJEConfig, EDJEProcessor

    dest = Path(dest)
    with atomic_folder(dest) as partial:
        shutil.copytree(shipped_checkpoint(), partial, dirs_exist_ok=True)
        config = json.loads((partial / "config.json").read_text())
        for obj in (EDJEConfig.from_pretrained(partial), _model_class_instance()):
            custom_object_save(obj, partial, config=config)
        custom_object_save(EDJEProcessor.from_pretrained(partial), partial)
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def _model_class_instance():
    """An uninitialised `EDJEModel`: what `custom_object_save` reads is its class."""
    from edje import EDJEModel

    return EDJEModel.__new__(EDJEModel)


def _train(out: Path, builtin: dict[str, int] | None) -> None:
    """The quickstart's two recipes (the shipped model's stages 1 and 2; its card's stages 3
    and 4 need the icon corpus): the built-in scenes alone, mining with their first stage, then
    the built-in scenes and the emoji together, mining with one fitted on both."""
    first = out / "outputs" / "quickstart"
    stages = [
        ("quickstart.yaml", ["--data.first_stage", str(out / "first_stage" / "builtin")]),
        ("quickstart_emoji.yaml", ["--data.first_stage", str(out / "first_stage" / "both")]),
    ]
    for recipe, options in stages:
        if recipe == "quickstart.yaml" and (first / "model" / "config.json").is_file():
            continue  # the first stage's model is there: a rerun goes on with the second
        command = [sys.executable, "-m", "edje.cli", "fit", "--config", str(recipe_path(recipe))]
        command += ["--data.store", str(out / "raw.store"), *options]
        if builtin:
            command += ["--data.builtin", str(builtin)]
        # The recipes' outputs (checkpoints, exported models) land under `out`.
        subprocess.run(command, cwd=out, check=True)
