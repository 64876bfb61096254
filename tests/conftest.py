import os

# Tests never reach a model hub: every model is built in-process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

TEXTS = [
    "What colour is the red circle? The answer is blue square top left.",
    "Is there a green triangle? yes no. How many objects are there? 1 2 3 4",
    "Describe the picture. A small purple square at the bottom right.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen2 LLaVA model directory (random weights, trained tokenizer)."""
    from alignti.models.family import save_model_dir
    from alignti.models.llava import TinySpec, build_tiny_llava
    from alignti.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    model, processor = build_tiny_llava(TinySpec(), tokenizer)
    return save_model_dir(model, processor, out)

# Tiny models: one thread is as fast as two and does not collapse when the 2 cores are shared.
import torch  # noqa: E402

torch.set_num_threads(1)
