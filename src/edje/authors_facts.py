"""The paper authors' released model in names and numbers, as their configs and weights give
them: what `edje convert` needs before it reads a file (no torch here, so `edje convert --help`
starts fast)."""

AUTHORS_REPO = "shahafw/edje-vl-image-retrieval-reranker"
AUTHORS_CODE = "https://github.com/shahafwa/EDJE"
AUTHORS_VISION = "google/siglip2-large-patch16-384"  # configs/retrieval.yaml: siglip_path
AUTHORS_TEXT = "microsoft/MiniLM-L12-H384-uncased"  # configs/retrieval.yaml: language_model_path
AUTHORS_IMAGE_SIZE, SIGLIP2_PATCH = 384, 16
SIGLIP2_LARGE_HEADS = 16  # the adapter's attention takes the vision encoder's head count
# SigLIP2 fixed-resolution towers by width: their name in Hub ids and their attention heads.
SIGLIP2_BY_WIDTH = {768: ("base", 12), 1024: ("large", SIGLIP2_LARGE_HEADS), 1152: ("so400m", 16)}
SIGLIP_LAYER_NORM_EPS = 1e-6  # the adapter's LayerNorm takes the vision encoder's eps
MINILM_L12_HEADS = 12  # not in the state dict's shapes
# The authors cap the whole pair at 64 + m tokens and truncate only the caption, so
# `[CLS] caption [SEP]` keeps at most 64 + m - (m <image> + [SEP]) = 63 tokens.
AUTHORS_MAX_CAPTION_LENGTH = 63
