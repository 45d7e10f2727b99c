"""What tests share besides fixtures (those are in tests/conftest.py), imported by name:

- `tests.helpers.tiny`: tiny random EDJE configs and models, weights that spread scores, and
  candidates that bf16 swaps (`make_tiny_config`, `make_tiny_model`, `spread_weights_`,
  `crowded_tokens`, `TINY_IMAGE_SIZE`);
- `tests.helpers.loopback`: one HTTP request to a test server on loopback (`http_json`);
- `tests.helpers.paths`: the repository's root (`ROOT`) and `absolute_paths` of saved files;
- `tests.helpers.data_files`: small data sets on disk (an imagefolder, Flickr30k parquet files);
- `tests.helpers.authors`: the authors' model re-implemented (`AuthorsLayout`, their tokenizer,
  the paper's forward as `reference_logits`);
- `tests.helpers.fake_hub`: a Hugging Face cache of tiny models under the real repo ids;
- `tests.helpers.training_callbacks`: Lightning callbacks a test adds to a recipe (imported by
  the training subprocess, hence trusted with `--trust-code-from`).

A subprocess imports them with the repository's root (`tests.helpers.paths.ROOT`) on its path.
Test modules never import each other or conftest.py: what two of them share lives here.
"""
