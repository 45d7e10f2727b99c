"""Web-scale data on tiny tar shards made here (PIL images + captions, img2dataset's layout) and
a tiny random DINOv2: brace patterns, encode from shards equal to encode from a folder, a
stream split across nodes and workers without duplicates, the online-vision mode giving the
raw-store mode's loss, and real training runs (2-process gloo DDP; a run killed mid-epoch and
resumed) that see every sample exactly once an epoch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edje import EDJEModel
from edje.data.shards import ShardImages, expand_shards, stream_shards
from edje.training.datamodule import stable_key
from tests.helpers.paths import ROOT
from tests.helpers.tiny import make_tiny_config

SHARDS, PER_SHARD = 4, 6
WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "dog",
    "cat",
    "sits",
    "runs",
    "near",
]


def write_shards(folder: Path) -> tuple[str, Path]:
    """4 tar shards of 6 samples (`key.jpg`/`key.png`, `key.txt`, `key.json`), and the same
    pictures as files in `folder/images` (`key.png`). Returns (pattern, images folder)."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    for shard in range(SHARDS):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                picture = Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
                picture.save(images / f"{key}.png")
                encoded = io.BytesIO()
                picture.save(encoded, "PNG")
                caption = " ".join(rng.choice(WORDS, 4))
                members = {"png": encoded.getvalue(), "txt": caption.encode(),
                           "json": json.dumps({"key": key}).encode()}  # fmt: skip
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "shard-{00000..00003}.tar"), images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


ALL_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(SHARDS) for i in range(PER_SHARD))


def test_brace_patterns_expand_in_order_and_an_empty_range_is_refused():
    assert expand_shards("d/{8..11}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar", "d/11.tar"]
    assert expand_shards("{a,b}-{01..02}") == ["a-01", "a-02", "b-01", "b-02"]
    with pytest.raises(ValueError, match="empty"):
        expand_shards("d/{5..3}.tar")


def test_shard_images_index_keys_captions_and_refuse_a_key_twice(shards, tmp_path):
    pattern, _ = shards
    samples = ShardImages(pattern)
    assert sorted(samples.ids) == ALL_KEYS and all(samples.captions)
    assert Image.open(io.BytesIO(samples[0])).size == (24, 20)
    first = expand_shards(pattern)[0]
    with pytest.raises(ValueError, match="keys must be unique"):
        ShardImages([first, first])
    with pytest.raises(ValueError, match="is a URL"):
        ShardImages("https://example.com/{0..1}.tar")


def test_encode_from_shards_equals_encode_from_the_same_images_in_a_folder(
    shards, tiny_vision_encoder, tiny_image_processor, tmp_path
):
    from edje.store import TokenStore
    from edje.store.encode import encode_images

    pattern, images = shards
    options = dict(vision_encoder=tiny_vision_encoder, image_processor=tiny_image_processor,
                   devices=1, progress=False, batch_size=5)  # fmt: skip
    assert encode_images(ShardImages(pattern), tmp_path / "from-shards", **options).ok
    assert encode_images(str(images), tmp_path / "from-folder", **options).ok
    from_shards = TokenStore.open(tmp_path / "from-shards")
    from_folder = TokenStore.open(tmp_path / "from-folder")
    assert sorted(from_shards.ids) == sorted(from_folder.ids) == ALL_KEYS  # one id rule
    for key in ALL_KEYS:
        assert torch.equal(from_shards.gather([key]), from_folder.gather([key])), key


def test_edje_encode_shards_resumes_skipping_what_the_store_holds(
    shards, vision_folder, tmp_path, capsys
):
    from edje.cli import main
    from edje.store import TokenStore

    pattern, _ = shards
    first_two = expand_shards(pattern)[:2]
    argv = ["encode", "--vision", str(vision_folder), "--out", str(tmp_path / "s"), "--devices",
            "1", "--no-progress"]  # fmt: skip
    assert main([*argv, "--shards", *first_two]) == 0
    assert len(TokenStore.open(tmp_path / "s")) == 2 * PER_SHARD
    capsys.readouterr()
    assert main([*argv, "--shards", pattern]) == 0  # the next two shards, the first two skipped
    printed = capsys.readouterr().out
    assert f"{2 * PER_SHARD} encoded now" in printed.replace(",", ""), printed
    assert sorted(TokenStore.open(tmp_path / "s").ids) == ALL_KEYS


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_stream_splits_across_nodes_and_workers_without_duplicates(shards, world_size):
    pattern, _ = shards
    seen = []
    for rank in range(world_size):
        stream = stream_shards(pattern, rank=rank, world_size=world_size)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=2, collate_fn=lambda row: row["__key__"]
        )
        seen += list(loader)
    assert sorted(seen) == ALL_KEYS  # every sample once: none twice, none missing


def write_parquet(folder: Path) -> list[str]:
    """Two parquet files of 12 rows (image, caption, no id), as a Hub data set is stored."""
    import datasets

    rng = np.random.default_rng(3)
    files = []
    for part in range(2):
        pictures = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                    for _ in range(12)]  # fmt: skip
        table = datasets.Dataset.from_dict(
            {"image": pictures, "caption": [f"picture {part}-{i}" for i in range(12)]},
            features=datasets.Features(
                {"image": datasets.Image(), "caption": datasets.Value("string")}
            ),
        )
        files.append(str(folder / f"part-{part}.parquet"))
        table.to_parquet(files[-1])
    return files


def test_a_hub_style_dataset_streams_split_across_nodes_and_trains(
    vision_folder, tmp_path, tiny_vision_encoder
):
    from lightning.pytorch import Trainer

    from edje.data.shards import stream_dataset
    from edje.training import EDJEForPreTraining, EDJETrainingModule
    from edje.training.streaming import ShardDataModule

    files = write_parquet(tmp_path)
    seen = []
    for rank in range(2):
        stream = stream_dataset("parquet", data_files=files, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=2, collate_fn=lambda row: row["caption"]
        )
        seen += list(loader)
    assert sorted(seen) == sorted(f"picture {p}-{i}" for p in range(2) for i in range(12))
    with pytest.raises(ValueError, match="no column 'text'"):
        stream_dataset("parquet", data_files=files, caption_column="text")

    torch.manual_seed(0)
    edje = EDJEModel(make_tiny_config(30523, 30522), vision_encoder=tiny_vision_encoder)
    module = EDJETrainingModule(EDJEForPreTraining(edje, mlm=False), mlm_weight=0,
                                text_recovery_weight=0, negatives={"random": 1.0})  # fmt: skip
    data = ShardDataModule(dataset="parquet", data_files=files, vision=str(vision_folder),
                           batch_size=4, samples_per_epoch=24, shuffle_buffer=0)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3


def test_online_vision_and_raw_store_modes_give_the_same_loss_on_the_same_batch(
    tiny_processor, tiny_vision_encoder
):
    """Every objective, distillation from an EDJE teacher (the local variant's way) included."""
    from edje.training import EDJEForPreTraining, EDJETeacher, EDJETrainingModule

    torch.manual_seed(0)
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    edje = EDJEModel(config, vision_encoder=tiny_vision_encoder)
    network = EDJEForPreTraining(edje, text_embedding_dim=8)
    teacher = EDJETeacher(EDJEModel(config))
    module = EDJETrainingModule(
        network, negatives={"hardest": 0.5, "random": 0.5}, teacher=teacher,
        distillation_weight=1.0,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in "1234"]
    pixels = tiny_processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    captions = tiny_processor.tokenizer(
        ["a red dog", "two cats", "a blue square", "green"], padding="max_length",
        max_length=12, return_tensors="pt",
    )  # fmt: skip
    common = {
        "caption_ids": captions["input_ids"],
        "caption_mask": captions["attention_mask"],
        "image_key": torch.arange(4),
        "caption_key": torch.arange(4),
        "text_embedding": torch.randn(4, 8),
        "image_embedding": torch.randn(4, 8),
    }
    with torch.no_grad():
        raw = {
            **common,
            "vision_tokens": tiny_vision_encoder(pixel_values=pixels).last_hidden_state,
        }
    online = {**common, "pixel_values": pixels}
    for train in (True, False):
        torch.manual_seed(2)  # the same dropout draws for both (the module is in train mode)
        raw_terms, raw_accuracy = module._losses(raw, train=train)
        torch.manual_seed(2)
        online_terms, online_accuracy = module._losses(online, train=train)
        assert raw_terms.keys() == online_terms.keys() >= {"itm", "mlm", "distillation"}
        for name in raw_terms:
            assert torch.equal(raw_terms[name], online_terms[name]), name
        assert torch.equal(raw_accuracy, online_accuracy)
    assert not any(p.requires_grad for p in tiny_vision_encoder.parameters())


RECIPE = """
seed_everything: 0
trainer: {{accelerator: cpu, max_steps: 2, logger: false, enable_checkpointing: false,
          default_root_dir: {root},
          callbacks: [{{class_path: edje.training.ExportEDJE, init_args: {{dirpath: {out}}}}}]}}
model:
  network:
    class_path: edje.training.EDJEForPreTraining
    init_args:
      vision: {vision}
      text: edje:all-minilm-l6-v2
      config: {{num_image_tokens: 4, adapter_mlp_size: 64}}
  optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 1.0e-4}}}}
  negatives: {{random: 1.0}}
  mlm_weight: 0
  text_recovery_weight: 0
data:
  class_path: edje.training.ShardDataModule
  init_args: {{shards: "{pattern}", batch_size: 4}}
"""


def test_edje_fit_trains_from_a_shard_recipe_and_exports_a_model(shards, vision_folder, tmp_path):
    """The CLI path of recipes/pretrain_webdataset.yaml: `data: class_path: ShardDataModule`,
    the backbones linked from the network, the frozen vision encoder run in the step."""
    from edje.cli import main

    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "model"
    recipe.write_text(
        RECIPE.format(root=tmp_path, out=out, vision=vision_folder, pattern=shards[0])
    )
    assert main(["fit", "--config", str(recipe)]) == 0
    model = EDJEModel.from_pretrained(out)
    assert model.config.image_token_shape == (4, 384)


# ---- real training runs in subprocesses ---------------------------------------------------------

TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    sys.path.insert(0, {root!r})
    from tests.helpers.tiny import make_tiny_config
    from edje import EDJEModel
    from edje.backbones import load_vision_encoder
    from edje.training import EDJEForPreTraining, EDJETrainingModule
    from edje.training.streaming import ShardDataModule

    devices, kill_at, resume = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None

    class Record(EDJETrainingModule):  # the image keys of every batch a step trains on
        def training_step(self, batch, batch_idx):
            with open({out!r} + f"/seen-{{self.global_rank}}.jsonl", "a") as file:
                file.write(json.dumps(batch["image_key"].tolist()) + "\\n")
            return super().training_step(batch, batch_idx)

    class Kill(Callback):  # a crash mid-epoch: SIGKILL before the step after the checkpoint
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    vision, _ = load_vision_encoder({vision!r})
    edje = EDJEModel(make_tiny_config(30523, 30522), vision_encoder=vision)
    network = EDJEForPreTraining(edje, mlm=False)
    module = Record(network, negatives={{"hardest": 0.5, "random": 0.5}}, mlm_weight=0,
                    text_recovery_weight=0)
    data = ShardDataModule({pattern!r}, vision={vision!r}, batch_size=3, shuffle_buffer=8,
                           num_workers=2, seed=0)
    checkpoints = ModelCheckpoint({out!r} + "/ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Kill(), checkpoints])
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    """
)


def train(tmp_path: Path, shards: tuple[str, Path], vision: Path, devices=1, kill_at=-1,
          resume="") -> subprocess.CompletedProcess:  # fmt: skip
    script = TRAIN.format(root=str(ROOT), out=str(tmp_path),
                          vision=str(vision), pattern=shards[0])  # fmt: skip
    (tmp_path / "train.py").write_text(script)  # a file: DDP starts the other rank from it
    return subprocess.run(
        [sys.executable, str(tmp_path / "train.py"), str(devices), str(kill_at), resume],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def seen_per_epoch(tmp_path: Path, per_epoch: int) -> list[list[int]]:
    """Image keys trained on, in step order across ranks, cut into epochs."""
    steps = [
        json.loads(line)
        for file in sorted(tmp_path.glob("seen-*.jsonl"))
        for line in file.read_text().splitlines()
    ]
    ranks = len(list(tmp_path.glob("seen-*.jsonl")))
    per_rank = [
        steps[r * len(steps) // ranks : (r + 1) * len(steps) // ranks] for r in range(ranks)
    ]
    epochs = []
    for epoch in range(len(per_rank[0]) // per_epoch):
        keys = [k for rank in per_rank for step in rank[epoch * per_epoch:(epoch + 1) * per_epoch]
                for k in step]  # fmt: skip
        epochs.append(sorted(keys))
    return epochs


def test_two_gloo_processes_in_online_mode_train_on_every_sample_once_an_epoch(
    shards, vision_folder, tmp_path
):
    result = train(tmp_path, shards, vision_folder, devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    every = sorted(stable_key(k) for k in ALL_KEYS)
    epochs = seen_per_epoch(tmp_path, per_epoch=len(ALL_KEYS) // (2 * 3))
    assert epochs == [every, every]  # 24 samples, 2 processes x 4 batches of 3, twice


def test_a_run_killed_mid_epoch_and_resumed_sees_exactly_the_rest_of_the_epoch(
    shards, vision_folder, tmp_path
):
    killed = train(tmp_path, shards, vision_folder, kill_at=2)  # after the step-2 checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]
    before = [json.loads(line) for line in (tmp_path / "seen-0.jsonl").read_text().splitlines()]
    assert len(before) == 2
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    resumed = train(tmp_path, shards, vision_folder, resume=str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning knows the loader resumes exactly
    epochs = seen_per_epoch(tmp_path, per_epoch=len(ALL_KEYS) // 3)
    every = sorted(stable_key(k) for k in ALL_KEYS)
    assert epochs == [every, every]  # nothing seen twice or skipped, in either epoch


def test_online_mining_embeds_the_steps_raw_tokens_with_the_data_modules_first_stage(
    tiny_processor, tiny_vision_encoder, vision_folder
):
    """Without precomputed image embeddings, the online step asks the data module's first stage
    for them (from the raw tokens it just computed): the loss equals the raw-store mode's with
    those embeddings given."""
    from types import SimpleNamespace

    from edje.first_stage import LinearProbeEmbedding
    from edje.training import EDJEForPreTraining, EDJETrainingModule

    torch.manual_seed(0)
    probe = LinearProbeEmbedding(vision=str(vision_folder), vision_dim=32, embedding_dim=8,
                                 image_size=28)  # fmt: skip
    config = make_tiny_config(len(tiny_processor.tokenizer), tiny_processor.image_token_id)
    network = EDJEForPreTraining(EDJEModel(config, vision_encoder=tiny_vision_encoder), mlm=False)
    module = EDJETrainingModule(network, mlm_weight=0, text_recovery_weight=0,
                                negatives={"hardest": 1.0})  # fmt: skip
    module._datamodule = lambda: SimpleNamespace(first_stage=probe)
    rng = np.random.default_rng(2)
    pictures = [
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in "123456"
    ]
    pixels = tiny_processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    captions = tiny_processor.tokenizer([f"caption {i}" for i in range(6)], padding=True,
                                        return_tensors="pt")  # fmt: skip
    common = {"caption_ids": captions["input_ids"], "caption_mask": captions["attention_mask"],
              "image_key": torch.arange(6), "caption_key": torch.arange(6),
              "text_embedding": torch.randn(6, 8)}  # fmt: skip
    with torch.no_grad():
        tokens = tiny_vision_encoder(pixel_values=pixels).last_hidden_state
        embeddings = probe.encode_vision_tokens(tokens)
    raw = {**common, "vision_tokens": tokens, "image_embedding": embeddings}
    module.eval()  # no dropout: the two calls compare mining alone
    raw_terms, _ = module._losses(raw, train=True)
    online_terms, _ = module._losses({**common, "pixel_values": pixels}, train=True)
    assert torch.equal(raw_terms["itm"], online_terms["itm"])
    shuffled, _ = module._losses({**raw, "image_embedding": embeddings.roll(1, 0)}, train=True)
    assert not torch.equal(shuffled["itm"], raw_terms["itm"])  # the embeddings steer mining


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def png(seed: int) -> bytes:
    encoded = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(encoded, "PNG")
    return encoded.getvalue()


@pytest.mark.parametrize(
    "members, refused",
    [
        ([("a.png", png(0)), ("a.PNG", png(1)), ("a.txt", b"x")], "a.png and a.PNG"),
        ([("a.png", png(0)), ("a.txt", b"x"), ("a.png", png(1))], "a.png and a.png"),
        ([("a.png", png(0)), ("b.png", png(1)), ("a.txt", b"x")], "'a' are not together"),
    ],
    ids=["case", "twice", "apart"],
)
def test_a_shard_whose_samples_a_stream_would_read_otherwise_is_refused(tmp_path, members, refused):
    with pytest.raises(ValueError, match=refused):
        ShardImages(write_tar(tmp_path / "s.tar", members))


def test_shard_images_hold_exactly_the_samples_the_stream_yields(tmp_path):
    members = [("_name.png", png(0)), ("_name.txt", b"underscore"), ("b.png", png(1)),
               ("b.txt", b"plain"), ("__meta__.json", b"{}"), (".hidden.png", png(2)),
               ("sub/c.png", png(3)), ("sub/c.txt", b"in a folder")]  # fmt: skip
    shard = write_tar(tmp_path / "s.tar", members)
    indexed = ShardImages(shard)
    streamed = [row["__key__"] for row in stream_shards(shard)]
    assert indexed.ids == streamed == ["_name", "b", "sub/c"]
    assert indexed.captions == ["underscore", "plain", "in a folder"]


def test_a_bad_image_in_a_stream_is_skipped_listed_and_counted_and_resume_goes_past_it(
    vision_folder, tmp_path
):
    from edje.training import ShardDataModule

    members = []
    for n in range(6):
        image = b"not an image at all" if n == 2 else png(n)
        members += [(f"s{n}.png", image), (f"s{n}.txt", f"caption {n}".encode())]
    shard = write_tar(tmp_path / "s.tar", members)
    data = ShardDataModule(shard, vision=str(vision_folder), batch_size=3, shuffle_buffer=0)
    data.setup()
    batches = list(data.train_dataloader())
    assert [len(b["image_key"]) for b in batches] == [2, 3]  # s2 left out of the first
    assert list(data.skipped) == ["s2"] and "UnidentifiedImageError" in data.skipped["s2"]
    assert all(b["pixel_values"].shape[0] == len(b["caption_ids"]) for b in batches)
    data.skipped.clear()
    data.load_state_dict({"epoch": 0, "batches": 1})  # a checkpoint after the bad batch
    resumed = list(data.train_dataloader())
    assert len(resumed) == 1 and torch.equal(resumed[0]["image_key"], batches[1]["image_key"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_passes_the_trained_batches_without_decoding_them_and_yields_the_rest_exactly(
    shards, vision_folder, workers
):
    from edje.training import ShardDataModule

    pattern, _ = shards
    data = ShardDataModule(pattern, vision=str(vision_folder), batch_size=3, shuffle_buffer=5,
                           num_workers=workers)  # fmt: skip
    data.setup()
    full = [batch["image_key"].tolist() for batch in data.train_dataloader()]
    assert len(full) == len(ALL_KEYS) // 3
    decoded = []
    collate = data.collate
    data.collate = lambda rows: decoded.append(len(rows)) or collate(rows)
    data.load_state_dict({"epoch": 0, "batches": 5})
    resumed = [batch["image_key"].tolist() for batch in data.train_dataloader()]
    assert resumed == full[5:]
    if workers == 0:  # in workers the calls happen in other processes
        assert len(decoded) == len(full) - 5
