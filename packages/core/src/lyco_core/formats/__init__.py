"""Adapter file formats: safetensors reading/writing with validation, and Lyco's versioned metadata schema."""
