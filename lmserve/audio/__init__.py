"""Audio input for speech models: files decoded to 16 kHz mono float32 samples."""
