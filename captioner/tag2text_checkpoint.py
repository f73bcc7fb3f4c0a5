"""Loading the official Tag2Text checkpoint (`tag2text_swin_14m.pth`) and its tag list.

The official file is a `torch.save`d dict whose weights sit under "model" (next to the
training state); its key names are those of the recognize-anything reference modules.
`map_official_state_dict` is the one place that turns them into this project's modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from captioner.errors import CaptionerError
from captioner.tag2text_model import Tag2TextModel

# Official buffers recomputed by our modules (Swin's relative position index and shifted
# window masks; BERT's position ids): dropped, never loaded.
_DERIVED_BUFFER = re.compile(r"(relative_position_index|attn_mask|embeddings\.position_ids)$")

_SWIN_PREFIX = "visual_encoder."
# Swin block parameter names: official (Microsoft Swin, as vendored by the reference) ->
# transformers SwinModel. The fused `attn.qkv` is split separately.
_SWIN_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "attn.relative_position_bias_table": (
        "attention.relative_position_bias.relative_position_bias_table"
    ),
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Tag2Text checkpoint file: unwraps {"model": ...}, checks types."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Tag2Text checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not loadable"
        raise CaptionerError(
            f"Tag2Text checkpoint {path}: not a loadable torch checkpoint ({exc})"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CaptionerError(
            f"Tag2Text checkpoint {path}: expected a state dict (or {{'model': state dict}}), "
            f"got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CaptionerError(f"Tag2Text checkpoint {path}: non-tensor entries {bad[:10]}")
    return obj


def _map_swin_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One official visual_encoder key (without the prefix) -> SwinModel key(s); None for a
    key that is not part of the Swin layout."""
    if key.startswith("patch_embed.proj."):
        return {"embeddings.patch_embeddings.projection." + key.split(".")[-1]: value}
    if key.startswith("patch_embed.norm."):
        return {"embeddings.norm." + key.split(".")[-1]: value}
    if key.startswith("norm."):
        return {"layernorm." + key.split(".")[-1]: value}
    match = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
    if match:
        return {f"encoder.layers.{match[1]}.downsample.{match[2]}": value}
    match = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if match:
        prefix = f"encoder.layers.{match[1]}.blocks.{match[2]}."
        rest = match[3]
        if rest.startswith("attn.qkv."):
            # Fused (3C, C) / (3C,) -> query, key, value in that order.
            q, k, v = value.chunk(3, dim=0)
            kind = rest.split(".")[-1]
            return {
                f"{prefix}attention.q_proj.{kind}": q,
                f"{prefix}attention.k_proj.{kind}": k,
                f"{prefix}attention.v_proj.{kind}": v,
            }
        for old, new in _SWIN_BLOCK_RENAMES.items():
            if rest == old or rest.startswith(old + "."):
                return {prefix + new + rest[len(old):]: value}
    return None


def map_official_state_dict(
    official: dict[str, torch.Tensor], model: Tag2TextModel
) -> dict[str, torch.Tensor]:
    """Official Tag2Text key names -> this project's `Tag2TextModel` key names.

    Every difference between the two layouts is handled here and only here:
    1. Derived buffers (Swin `relative_position_index`, `attn_mask`; BERT `position_ids`)
       are dropped: our modules compute them.
    2. Old checkpoints call the tagging head `vision_multi`: renamed to `tagging_head`.
    3. `visual_encoder.*`: Microsoft Swin names -> transformers SwinModel names, the fused
       `attn.qkv` split into q/k/v projections (`_map_swin_key`).
    4. BERT token-type embeddings, which the reference does not have, are added as zeros
       (so they add nothing), for tag_encoder and text_decoder.
    5. `text_decoder.cls.predictions.decoder.bias` is the same tensor as
       `...predictions.bias` in both layouts; filled from it when a file lacks one of them.
    Other keys keep their names (tag_encoder, text_decoder, tagging_head, label_embed, fc
    match the reference's module names). Missing/unexpected keys are the caller's check.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        if _DERIVED_BUFFER.search(key):
            continue
        if key.startswith("vision_multi."):
            key = "tagging_head." + key[len("vision_multi."):]
        swin = None
        if key.startswith(_SWIN_PREFIX):
            swin = _map_swin_key(key[len(_SWIN_PREFIX):], value)
        if swin is None:
            mapped[key] = value  # unknown visual_encoder keys stay, to be reported unexpected
        else:
            mapped.update({_SWIN_PREFIX + k: v for k, v in swin.items()})
    own = model.state_dict()
    for prefix in ("tag_encoder.embeddings.", "text_decoder.bert.embeddings."):
        key = prefix + "token_type_embeddings.weight"
        if key in own and key not in mapped and prefix + "word_embeddings.weight" in mapped:
            mapped[key] = torch.zeros_like(own[key], device="cpu")
    bias = "text_decoder.cls.predictions.bias"
    dec_bias = "text_decoder.cls.predictions.decoder.bias"
    if bias in mapped and dec_bias not in mapped:
        mapped[dec_bias] = mapped[bias]
    elif dec_bias in mapped and bias not in mapped:
        mapped[bias] = mapped[dec_bias]
    return mapped


def _short_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_into(model: Tag2TextModel, official: dict[str, torch.Tensor], source: str) -> None:
    """Map `official` onto `model` and copy it in; raise CaptionerError listing missing,
    unexpected and wrongly shaped keys (nothing is loaded unless all match)."""
    mapped = map_official_state_dict(official, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong_shape = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(mapped))
        if tuple(mapped[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): "
            f"{_short_list(unexpected)}"
        )
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {_short_list(wrong_shape, 5)}")
    if problems:
        raise CaptionerError(
            f"Tag2Text checkpoint {source} does not match the Tag2Text architecture "
            f"(image_size={model.arch.image_size}, {model.arch.num_tags} tags): "
            + "; ".join(problems)
        )
    model.load_state_dict(mapped, strict=True)


def read_tag_list(path: str | Path) -> list[str]:
    """One tag per line (the official list has 3429); blank lines are an error."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(
            f"Tag2Text tag list {path}: file not found (set captioner.tag2text.tag_list; the "
            f"official list is recognize-anything's tag2text_ori_tag_list.txt, 3429 tags)"
        )
    tags = path.read_text(encoding="utf-8").splitlines()
    blank = [i for i, tag in enumerate(tags) if not tag.strip()]
    if not tags or blank:
        raise CaptionerError(f"Tag2Text tag list {path}: empty, or blank lines at {blank[:10]}")
    return tags

