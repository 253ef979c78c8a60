"""Vectara's HHEM-2.1-open factual-consistency classifier (hub: vectara/hallucination_evaluation_model),
rebuilt from its files with transformers' T5 classes: no code from its directory runs.

HHEM's directory ships its own model code (configuration_hhem_v2.py, modeling_hhem_v2.py), which
transformers runs only with trust_remote_code and which breaks under transformers 5 (the class lacks
`all_tied_weights_keys`; once that is patched, users report the encoder's embedding left untied
from the loaded `shared` table, i.e. random, so that every score is noise). What that code does
is small, and is reproduced here:
  - a T5ForTokenClassification built from the foundation's config (google/flan-t5-base), 2 labels;
  - input: config.json's prompt template filled with text1 = premise (the article), text2 =
    hypothesis (the summary), tokenized by the foundation's tokenizer (AutoTokenizer, i.e. the
    fast tokenizer of its tokenizer.json), padded to the longest in the batch, not truncated
    (HHEM-2.1 has no 512-token limit; T5's relative positions extend to any length);
  - score: softmax of the logits at the first position (the template's leading `<pad>`), class 1.

Layout of `path` (the `--fc-model` directory):
  config.json                 HHEM's: model_type, prompt, foundation
  model.safetensors           HHEM's weights: `t5.` + the T5ForTokenClassification parameter names
  foundation/config.json      the foundation's T5 config
  foundation/tokenizer.json   the foundation's tokenizer
Other files there (HHEM's .py files, the foundation's spiece.model, tokenizer_config.json,
special_tokens_map.json) are not read.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smoothkd.errors import SmoothkdError

HUB_ID = "vectara/hallucination_evaluation_model"
FOUNDATION = "foundation"  # subdirectory holding the foundation's config and tokenizer
# HHEMv2Config declares model_type "HHEMv2"; reports of its transformers-5 breakage quote the
# published config.json as saying "HHEMv2Config".
MODEL_TYPES = ("HHEMv2", "HHEMv2Config")
PREFIX = "t5."  # HHEMv2ForSequenceClassification keeps its T5ForTokenClassification as `self.t5`
# T5's encoder embeds with the shared table; HHEM's file (saved by transformers 4) holds `shared` only.
ALIASES = {"transformer.encoder.embed_tokens.weight": "transformer.shared.weight"}


def _fetch_hhem(path: Path) -> str:
    return (f"on a machine with hub access: `hf download {HUB_ID} config.json model.safetensors --local-dir {path}` "
            "(`huggingface-cli download` in older huggingface_hub; the repository is gated: accept its terms on "
            "the hub and log in first)")


def _fetch_foundation(path: Path, foundation: str) -> str:
    return (f"HHEM's code loads its foundation {foundation} from the hub; fetch its files once, on a machine with "
            f"hub access: `hf download {foundation} config.json tokenizer.json --local-dir {path / FOUNDATION}`")


def read_config(path: Path) -> dict[str, Any]:
    """HHEM's config.json, checked: an HHEM-2.1-open model, a prompt with {text1} and {text2}, a foundation."""
    file = path / "config.json"
    if not file.is_file():
        raise SmoothkdError(f"{file}: missing; {_fetch_hhem(path)}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmoothkdError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("model_type") not in MODEL_TYPES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise SmoothkdError(f"{file}: model_type {found!r}, expected one of {', '.join(MODEL_TYPES)}: "
                            f"this directory is not HHEM-2.1-open ({HUB_ID})")
    problems = []
    prompt = config.get("prompt")
    fields = ({f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
              if isinstance(prompt, str) else None)
    if fields != {"text1", "text2"}:
        problems.append(f"prompt {prompt!r} is not a template with exactly the fields {{text1}} and {{text2}}")
    if not isinstance(config.get("foundation"), str) or not config["foundation"]:
        problems.append(f"foundation {config.get('foundation')!r} is not a model name")
    if problems:
        raise SmoothkdError(f"{file}: " + "; ".join(problems))
    return config


def _weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.safetensors under `model`'s parameter names; every key of the file and of the model accounted for."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    if not file.is_file():
        pickled = [p.name for p in (path / "pytorch_model.bin", path / "model.pt") if p.is_file()]
        why = f" ({', '.join(pickled)} is a pickle, which smoothkd does not load)" if pickled else ""
        raise SmoothkdError(f"{file}: missing{why}; {_fetch_hhem(path)}")
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as e:
        raise SmoothkdError(f"{file}: not a readable safetensors file ({e})") from e
    want = {k: v.shape for k, v in model.state_dict().items()}
    weights = {k[len(PREFIX):]: v for k, v in stored.items() if k.startswith(PREFIX) and k[len(PREFIX):] in want}
    unexpected = sorted(k for k in stored if not (k.startswith(PREFIX) and k[len(PREFIX):] in want))
    for alias, name in ALIASES.items():
        if alias in weights and name in weights:
            if not torch.equal(weights[alias], weights[name]):
                raise SmoothkdError(f"{file}: {PREFIX}{alias} differs from {PREFIX}{name}; T5 ties them")
        elif alias in weights:
            weights[name] = weights[alias]
        elif name in weights:
            weights[alias] = weights[name]
    missing = sorted(PREFIX + k for k in want if k not in weights)
    misshapen = sorted(f"{PREFIX}{k} {tuple(v.shape)} (expected {tuple(want[k])})"
                       for k, v in weights.items() if v.shape != want[k])
    problems = [f"{len(keys)} {what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("unexpected keys", unexpected), ("missing keys", missing),
                                   ("tensors of the wrong shape", misshapen)) if keys]
    if problems:
        raise SmoothkdError(f"{file}: not HHEM-2.1-open weights for the T5 of {path / FOUNDATION / 'config.json'}: "
                            + "; ".join(problems))
    return weights


class HHEM:
    """Scores (premise, hypothesis) pairs: HHEM's probability that the hypothesis is consistent with the premise."""

    def __init__(self, model: Any, tokenizer: Any, prompt: str, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer: no padding, no truncation
        self.pad_id = tokenizer.token_to_id("<pad>")
        self.prompt = prompt
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        ids = [e.ids for e in self.tokenizer.encode_batch([self.prompt.format(text1=p, text2=h) for p, h in pairs])]
        device = next(self.model.parameters()).device
        # Batches of similar lengths pad little. As in HHEM (padding=True), padding goes on the right
        # and the attention mask hides it, so a pair's score does not depend on its batch.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(ids[batch[0]])
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [b, s]
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # [b, s, 2]
            for i, score in zip(batch, torch.softmax(logits[:, 0, :].float(), dim=-1)[:, 1].tolist()):
                scores[i] = score
        return scores


def load(path: str | Path, batch_size: int = 8, device: str = "auto") -> HHEM:
    """HHEM-2.1-open from a local directory laid out as the module docstring says, in float32."""
    from tokenizers import Tokenizer
    from transformers import T5Config, T5ForTokenClassification

    from smoothkd.models import resolve_device_dtype

    path = Path(path)
    if not path.is_dir():
        raise SmoothkdError(f"{path}: no such directory; HHEM needs a local copy of {HUB_ID} (it is not "
                            f"downloaded at run time): {_fetch_hhem(path)}")
    config = read_config(path)
    foundation = path / FOUNDATION
    for name in ("config.json", "tokenizer.json"):
        if not (foundation / name).is_file():
            raise SmoothkdError(f"{foundation / name}: missing; {_fetch_foundation(path, config['foundation'])}")
    try:
        t5_json = json.loads((foundation / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmoothkdError(f"{foundation / 'config.json'}: not valid JSON ({e})") from e
    if not isinstance(t5_json, dict) or t5_json.get("model_type") != "t5":
        found = t5_json.get("model_type") if isinstance(t5_json, dict) else None
        raise SmoothkdError(f"{foundation / 'config.json'}: model_type {found!r}, expected 't5' "
                            f"(HHEM-2.1-open's foundation is {config['foundation']})")
    t5_config = T5Config.from_dict(t5_json)
    try:
        tokenizer = Tokenizer.from_file(str(foundation / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
        raise SmoothkdError(f"{foundation / 'tokenizer.json'}: not a tokenizers file ({e})") from e
    if tokenizer.token_to_id("<pad>") is None or tokenizer.get_vocab_size() > t5_config.vocab_size:
        raise SmoothkdError(f"{foundation / 'tokenizer.json'}: not a T5 tokenizer for this config (no <pad> token, "
                            f"or {tokenizer.get_vocab_size()} tokens for an embedding of {t5_config.vocab_size})")
    # HHEM calls its tokenizer with padding=True and no truncation; padding is done per batch here.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    device, _ = resolve_device_dtype(device, "float32")
    model = T5ForTokenClassification(t5_config)
    model.load_state_dict(_weights(path, model), strict=True)
    return HHEM(model.to(device), tokenizer, config["prompt"], batch_size)
