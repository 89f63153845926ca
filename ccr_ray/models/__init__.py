"""Plain PyTorch models (no Ray): open_clip backbone, multilingual embedding, MLA / DASD adapters."""
