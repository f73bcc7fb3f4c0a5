"""Configuration of the MM-SeR captioner: LLaVA-1.5 with OPT-125M plus a SeR-Connector.

`MMSeRConfig` extends transformers' `LlavaConfig` (CLIP vision config + OPT text config +
projector settings) with the SeR-Connector and saliency settings. With `refine=False` it
describes the single-pass "simple model" (no connector weights).

The hub is not reachable everywhere this runs, so the real component configs
(CLIP ViT-L/14-336, OPT-125M) are also written out here from their published
hyper-parameters: `real_config()` builds the full-size architecture without downloading.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, LlavaConfig, OPTConfig

from captioner.errors import CaptionerError
from captioner.vision_layers import layer_index


def clip_vit_l14_336_config() -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14-336's vision tower (303.5M params)."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=336,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def opt_125m_config() -> OPTConfig:
    """facebook/opt-125m (125.2M params, embeddings tied to the LM head)."""
    return OPTConfig(
        vocab_size=50272,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        word_embed_proj_dim=768,
        activation_function="relu",
        enable_bias=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


@strict
class MMSeRConfig(LlavaConfig):
    """LLaVA-1.5 (CLIP + 2-layer MLP projector + OPT) and the SeR-Connector.

    Connector fields (our reconstruction; the paper publishes no code):
      connector_layers: CLIP hidden-state indices (0 = patch embeddings, -1 = last layer)
        whose patch features the connector fuses; null = 4 layers spread up to
        `vision_feature_layer`.
      connector_hidden_size / _num_layers / _num_heads / _mlp_ratio: the cross-attention
        stack (768 / 4 / 12 / 4 gives ~50M params at real dimensions).
      num_refine_tokens: K, the refinement visual tokens the connector writes for the LM.
      saliency_layers: OPT layers whose attention (caption tokens -> image tokens) makes
        the saliency map; null = the last 4 layers.

    Prompts a trained checkpoint was trained with (`mmser train` writes them; the
    captioner then uses them instead of the config's, since the model learned those):
      caption_prompt: the caption instruction after the image tokens.
      refine_prompt: the instruction after the refinement tokens.
    """

    model_type = "mmser"

    refine: bool = True
    connector_layers: list[int] | None = None
    connector_hidden_size: int = 768
    connector_num_layers: int = 4
    connector_num_heads: int = 12
    connector_mlp_ratio: int = 4
    num_refine_tokens: int = 64
    saliency_layers: list[int] | None = None
    caption_prompt: str | None = None
    refine_prompt: str | None = None

    def __post_init__(self, **kwargs):
        # Defaults are the paper's components (LlavaConfig's would be CLIP + Llama).
        if self.vision_config is None:
            self.vision_config = clip_vit_l14_336_config()
        if self.text_config is None:
            self.text_config = opt_125m_config()
        elif isinstance(self.text_config, dict):
            self.text_config.setdefault("model_type", "opt")
        super().__post_init__(**kwargs)
        n_vision = self.vision_config.num_hidden_layers
        n_text = self.text_config.num_hidden_layers
        if self.text_config.model_type != "opt":
            # The saliency map recomputes OPT's attention from cached keys; that is exact
            # only for absolute position embeddings (OPT), not for rotary ones.
            raise CaptionerError(
                f"MMSeRConfig: text_config.model_type must be 'opt', got "
                f"{self.text_config.model_type!r}"
            )
        if not isinstance(self.vision_feature_layer, int):
            raise CaptionerError(
                "MMSeRConfig: vision_feature_layer must be one int (LLaVA-1.5 uses -2); "
                "multi-layer features belong in connector_layers"
            )
        last = layer_index(self.vision_feature_layer, n_vision, "MMSeRConfig: vision_feature_layer")
        if self.connector_layers is None:
            step = max(1, last // 4)
            self.connector_layers = sorted({max(1, last - i * step) for i in range(4)})
        bad = [i for i in self.connector_layers if not -(n_vision + 1) <= i <= n_vision]
        if bad:
            raise CaptionerError(
                f"MMSeRConfig: connector_layers {bad} out of range for a vision tower with "
                f"{n_vision} layers (allowed {-(n_vision + 1)}..{n_vision})"
            )
        if self.saliency_layers is None:
            self.saliency_layers = list(range(max(0, n_text - 4), n_text))
        bad = [i for i in self.saliency_layers if not 0 <= i < n_text]
        if bad:
            raise CaptionerError(
                f"MMSeRConfig: saliency_layers {bad} out of range 0..{n_text - 1}"
            )
        if self.connector_hidden_size % self.connector_num_heads:
            raise CaptionerError(
                f"MMSeRConfig: connector_hidden_size {self.connector_hidden_size} is not "
                f"divisible by connector_num_heads {self.connector_num_heads}"
            )
        if self.num_refine_tokens < 1:
            raise CaptionerError(
                f"MMSeRConfig: num_refine_tokens must be >= 1, got {self.num_refine_tokens}"
            )


def real_config(refine: bool = True, image_token_index: int = 50265) -> MMSeRConfig:
    """The paper's sizes: CLIP ViT-L/14-336 + OPT-125M (+ a ~50M SeR-Connector).

    `image_token_index` 50265 is the first of OPT's unused embedding rows (50265-50271).
    """
    return MMSeRConfig(
        vision_config=clip_vit_l14_336_config(),
        text_config=opt_125m_config(),
        image_token_index=image_token_index,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        refine=refine,
        connector_layers=[6, 12, 18, 23],
    )


__all__ = ["MMSeRConfig", "clip_vit_l14_336_config", "opt_125m_config", "real_config"]
