"""The paper configuration's encoders: `transformers` WavLM and CLIP loaded from local directories
(never downloaded), and a stand-in for a frozen encoder whose tokens were computed once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.encoders import lengths_to_mask, masked_standardise

# CLIP's pixel statistics (openai/clip-vit-*), applied inside the paper graph.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WavLMEncoder(nn.Module):
    """transformers WavLM from a local directory; conv feature encoder frozen, the rest trainable."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import WavLMModel

        self.wavlm = WavLMModel.from_pretrained(model_dir, local_files_only=True)
        self.wavlm.freeze_feature_encoder()
        # Large checkpoints (layer-norm feature extractor) take an attention mask; base ones must not.
        self.use_mask = self.wavlm.config.feat_extract_norm == "layer"
        self.dim = self.wavlm.config.hidden_size

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        valid = lengths_to_mask(audio_len, audio.shape[1])
        v = valid.to(audio.dtype)
        x = masked_standardise(audio, v, 1, 1e-7) * v  # what Wav2Vec2FeatureExtractor(do_normalize) does
        out = self.wavlm(x, attention_mask=valid.long() if self.use_mask else None).last_hidden_state
        token_len = self.wavlm._get_feat_extract_output_lengths(audio_len).clamp(0, out.shape[1])
        return out, lengths_to_mask(token_len, out.shape[1])


class CLIPFrameEncoder(nn.Module):
    """Frozen transformers CLIP image tower and its projection, one embedding per whole RGB frame:
    CLIP's projected image embedding (`image_embeds`, 768-d for ViT-L/14), as the released Foal-Net
    used. Frames arrive resized (shortest side) and centre-cropped by the service (frame_mode
    "clip_crop"); other sizes are resized here. CLIP's pixel normalisation runs in the graph."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection.from_pretrained(model_dir, local_files_only=True)
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.size = self.clip.config.image_size
        self.dim = self.clip.config.projection_dim
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPFrameEncoder:
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode
        return self

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 [N, H, W, 3] -> [N, dim]; also what the trainers call to embed frames once."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.clip(pixel_values=(x - self.mean) / self.std).image_embeds

    def forward(self, frames: Tensor, frames_len: Tensor) -> tuple[Tensor, Tensor]:
        b, f = frames.shape[:2]
        return self.embed_images(frames.flatten(0, 1)).reshape(b, f, -1), lengths_to_mask(frames_len, f)


class PrecomputedTokens(nn.Module):
    """Stands in for a frozen encoder whose tokens were computed once: its input is the token tensor
    [B, T, d] itself and its length the valid count (the trainers embed CLIP frames once, not per epoch)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return tokens, lengths_to_mask(lengths, tokens.shape[1])
