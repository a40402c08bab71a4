"""Model definitions for pretraining (ViTa Stage I encoder / MAE)."""
