"""Training: timm ViT backbone, AdaViT-style head policy, TopK SAE (see the modules)."""
__all__: list[str] = []
