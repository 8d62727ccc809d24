"""Cache of frozen-encoder embeddings, so that after the first pass only the head costs time.

Keyed by the SHA-256 of the exact encoder input (which covers image content, preprocessing and
augmentation) plus the base weights' hash and any encoder LoRA state. In memory, optionally mirrored to
a folder of safetensors files that later runs reuse.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    def __init__(self, encoder_id: str, folder: str | Path | None = None):
        self.encoder_id = encoder_id
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def key(self, encoder_input: torch.Tensor) -> str:
        digest = hashlib.sha256(self.encoder_id.encode())
        digest.update(str(tuple(encoder_input.shape)).encode())
        digest.update(encoder_input.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        if self.folder and (self.folder / f"{key}.safetensors").is_file():
            self.hits += 1
            tensor = load_file(str(self.folder / f"{key}.safetensors"))["embedding"]
            self._memory[key] = tensor
            return tensor
        self.misses += 1
        return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        embedding = embedding.detach().to("cpu", torch.float32).contiguous()  # heads train in fp32
        self._memory[key] = embedding
        if self.folder:
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            os.close(fd)
            save_file({"embedding": embedding}, tmp)
            os.replace(tmp, self.folder / f"{key}.safetensors")

    def encode(self, encoder: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings for a batch (B,3,S,S), computing only the ones not cached yet."""
        keys = [self.key(x) for x in inputs]
        found = [self.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            with torch.no_grad():
                fresh = encoder(inputs[todo])
            for i, emb in zip(todo, fresh):
                self.put(keys[i], emb)
                found[i] = self._memory[keys[i]]
        return torch.stack([f for f in found]).to(inputs.device)

    def __len__(self) -> int:
        return len(self._memory)
