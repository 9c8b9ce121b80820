"""Reading and writing model files: Orbax training checkpoints, GGUF and Hugging Face
(safetensors) pretrained models, their tokenizers, and the registry behind `hpllm pull`."""


class ModelError(ValueError):
    """A model that cannot be loaded (missing, malformed, unsupported); the message says why."""
