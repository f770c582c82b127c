"""Tiny random Hugging Face image models saved with save_pretrained (config -> AutoModel.from_config ->
save_pretrained), with their image processors: what ``hf:FOLDER`` reads. No network."""

from __future__ import annotations

from pathlib import Path

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8)


def make(kind: str, folder: Path) -> Path:
    import torch
    import transformers as t

    configs = {
        "vit": (t.ViTConfig(**VIT), t.ViTImageProcessor(size={"height": 32, "width": 32})),
        "dinov2": (t.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                                  image_size=32, patch_size=8),
                   t.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        "clip": (t.CLIPVisionConfig(**VIT),
                 t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip": (t.SiglipVisionConfig(**VIT), t.SiglipImageProcessor(size={"height": 32, "width": 32})),
        "convnext": (t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                     t.ConvNextImageProcessor(size={"shortest_edge": 32})),
    }
    config, processor = configs[kind]
    torch.manual_seed(0)
    model = t.AutoModel.from_config(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
