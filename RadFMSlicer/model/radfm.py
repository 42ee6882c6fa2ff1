"""The RadFM multimodal model: vision encoder -> resampler -> projection, merged into LLaMA.

Attribute names (``embedding_layer``, ``lang_model``) match the released state dict. The
official code mixes image tokens into the text by a one-hot matmul over the extended
vocabulary; here they are gathered by index, which gives the same embeddings exactly.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import CheckpointError, PromptError
from .resampler import PerceiverResampler
from .vision import VisionTransformer3d

# Architecture constants of RadFM that cannot be read off tensor shapes (only products of
# them can); widths and depths are read off the checkpoint.
PATCH_SIZE = 32
FRAME_PATCH_SIZE = 4
ATTENTION_HEADS = 8  # ViT and resampler; head width = inner width / 8


@dataclass(frozen=True)
class RadFMDims:
    """Every size of a RadFM checkpoint, as read off its tensor shapes."""

    vocab_size: int
    llm_dim: int
    llm_layers: int
    llm_intermediate: int
    vision_dim: int
    vision_layers: int
    vision_inner: int
    vision_mlp: int
    h_patches: int
    w_patches: int
    d_patches: int
    perceiver_layers: int
    perceiver_inner: int
    perceiver_ff: int
    num_latents: int

    @property
    def image_start_id(self) -> int:
        return self.vocab_size

    @property
    def image_end_id(self) -> int:
        return self.vocab_size + 1

    @property
    def first_image_token_id(self) -> int:
        return self.vocab_size + 2

    @property
    def max_height(self) -> int:
        return self.h_patches * PATCH_SIZE

    @property
    def max_width(self) -> int:
        return self.w_patches * PATCH_SIZE

    @property
    def max_depth(self) -> int:
        return self.d_patches * FRAME_PATCH_SIZE

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "RadFMDims":
        """Read the sizes off ``{key: shape}`` of an official state dict."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"checkpoint is missing the key {key!r}: not a RadFM checkpoint?")
            return shapes[key]

        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

        vit = "embedding_layer.vision_encoder."
        per = "embedding_layer.perceiver."
        vocab_size, llm_dim = shape("lang_model.model.embed_tokens.weight")
        vision_dim, patch_dim = shape(vit + "to_patch_embedding.2.weight")
        if patch_dim != 3 * PATCH_SIZE * PATCH_SIZE * FRAME_PATCH_SIZE:
            raise CheckpointError(
                f"{vit}to_patch_embedding.2.weight has patch width {patch_dim}; RadFM uses "
                f"3x{PATCH_SIZE}x{PATCH_SIZE}x{FRAME_PATCH_SIZE} = {3 * PATCH_SIZE * PATCH_SIZE * FRAME_PATCH_SIZE}"
            )
        return cls(
            vocab_size=vocab_size,
            llm_dim=llm_dim,
            llm_layers=count("lang_model.model.layers."),
            llm_intermediate=shape("lang_model.model.layers.0.mlp.gate_proj.weight")[0],
            vision_dim=vision_dim,
            vision_layers=count(vit + "transformer.layers."),
            vision_inner=shape(vit + "transformer.layers.0.0.fn.to_qkv.weight")[0] // 3,
            vision_mlp=shape(vit + "transformer.layers.0.1.fn.net.0.weight")[0],
            h_patches=shape(vit + "pos_embedding.row_embed.weight")[0],
            w_patches=shape(vit + "pos_embedding.col_embed.weight")[0],
            d_patches=shape(vit + "pos_embedding.dep_embed.weight")[0],
            perceiver_layers=count(per + "layers."),
            perceiver_inner=shape(per + "layers.0.0.to_q.weight")[0],
            perceiver_ff=shape(per + "layers.0.1.1.weight")[0],
            num_latents=shape(per + "latents")[0],
        )


class RadFMEmbedding(nn.Module):
    """Everything that turns images into LLM-width tokens (``embedding_layer.*``)."""

    def __init__(self, dims: RadFMDims):
        super().__init__()
        self.figure_token_weight = nn.Parameter(torch.empty(2, dims.llm_dim))
        self.vision_encoder = VisionTransformer3d(
            dim=dims.vision_dim,
            depth=dims.vision_layers,
            heads=ATTENTION_HEADS,
            dim_head=dims.vision_inner // ATTENTION_HEADS,
            mlp_dim=dims.vision_mlp,
            patch_size=PATCH_SIZE,
            frame_patch_size=FRAME_PATCH_SIZE,
            h_patches=dims.h_patches,
            w_patches=dims.w_patches,
            d_patches=dims.d_patches,
        )
        self.perceiver = PerceiverResampler(
            dim=dims.vision_dim,
            depth=dims.perceiver_layers,
            heads=ATTENTION_HEADS,
            dim_head=dims.perceiver_inner // ATTENTION_HEADS,
            num_latents=dims.num_latents,
            ff_dim=dims.perceiver_ff,
        )
        self.fc = nn.Linear(dims.vision_dim, dims.llm_dim)


class RadFMModel(nn.Module):
    """RadFM at inference: ``encode_images`` once, then ``embed`` prompts for ``lang_model``."""

    def __init__(self, dims: RadFMDims, llama_config: LlamaConfig):
        super().__init__()
        self.dims = dims
        self.embedding_layer = RadFMEmbedding(dims)
        self.lang_model = LlamaForCausalLM(llama_config)

    def encode_images(self, images: torch.Tensor, return_attention: bool = False):
        """``[N, 3, H, W, D]`` in [0, 1] -> ``[N, num_latents, llm_dim]`` image tokens.

        ``return_attention``: also the resampler's attention on the patch grid,
        ``[layers, N, H/32, W/32, D/4]`` (see :class:`~.resampler.PerceiverResampler`).
        """
        emb = self.embedding_layer
        features = emb.vision_encoder(images)
        if not return_attention:
            return emb.fc(emb.perceiver(features))
        latents, maps = emb.perceiver(features, return_attention=True)
        _, _, height, width, depth = images.shape
        grid = (height // PATCH_SIZE, width // PATCH_SIZE, depth // FRAME_PATCH_SIZE)  # patch order (h w f)
        return emb.fc(latents), maps.reshape(maps.shape[0], maps.shape[1], *grid)

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Text and image embeddings for ``input_ids [1, L]``; ``image_tokens [N*latents, llm_dim]``.

        Id ``vocab`` / ``vocab+1`` are ``<image>`` / ``</image>``; id ``vocab + 2 + t`` is the
        t-th image token (image k's j-th token is ``t = latents*k + j``).
        """
        d = self.dims
        text_table = self.lang_model.get_input_embeddings().weight
        ids = input_ids[0]
        out = torch.empty(ids.shape[0], d.llm_dim, dtype=text_table.dtype, device=text_table.device)
        is_text = ids < d.vocab_size
        is_figure = (ids == d.image_start_id) | (ids == d.image_end_id)
        is_image = ids >= d.first_image_token_id

        def put(mask, table, rows):
            """``out[mask] = table[rows]`` as row copies: masked indexing would cost a parallel
            region per assignment (tens of ms on a busy CPU) for a few kB of rows."""
            out.index_copy_(0, mask.nonzero().squeeze(1), table.index_select(0, rows).to(out.dtype))

        put(is_text, text_table, ids[is_text])
        put(is_figure, self.embedding_layer.figure_token_weight, ids[is_figure] - d.image_start_id)
        if is_image.any():
            slots = ids[is_image] - d.first_image_token_id
            available = 0 if image_tokens is None else image_tokens.shape[0]
            if int(slots.max()) >= available:
                raise PromptError(
                    f"the prompt refers to image {int(slots.max()) // d.num_latents + 1} but only "
                    f"{available // d.num_latents} image(s) were given"
                )
            put(is_image, image_tokens, slots)
        if bool((ids < 0).any()):
            raise PromptError("token ids must be non-negative")
        return out.unsqueeze(0)
