"""PACE in the trainers people already use. Each module imports its framework when it is imported, never
`import pace`: `pace.integrations.transformers` (Hugging Face Trainer)."""
