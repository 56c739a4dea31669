"""trimformer's own plain-PyTorch Transformer classifier, for users without Hugging Face.

Saved as a folder: ``model.safetensors`` (weights), ``trimformer_model.json`` (the config below)
and ``tokenizer.json``. Built on ``torch.nn.TransformerEncoder`` (post-norm, GELU) with learned
positions and mean pooling over real tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.fsutil import hash_files
from trimformer.sources.attention import packed_qkv_attention
from trimformer.sources.base import LoadedSource, SourceIO

__all__ = ["PLAIN_CONFIG_FILE", "PlainConfig", "PlainTransformerClassifier", "is_plain_folder", "load_plain"]

PLAIN_CONFIG_FILE = "trimformer_model.json"


@dataclass
class PlainConfig:
    vocab_size: int
    hidden_size: int = 128
    num_heads: int = 4
    num_layers: int = 2
    ffn_size: int = 512
    max_length: int = 128
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    pad_token_id: int = 0
    dropout: float = 0.1

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 1 or not self.labels:
            raise UserError("a plain model needs at least one layer and one label")


class PlainTransformerClassifier(nn.Module):
    """Embeddings -> nn.TransformerEncoder -> masked mean pooling -> linear classifier."""

    def __init__(self, config: PlainConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_length, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size)
        layer = nn.TransformerEncoderLayer(
            d_model=config.hidden_size,
            nhead=config.num_heads,
            dim_feedforward=config.ffn_size,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
        )
        # No nested tensors: the fast path changes numerics between eager and exported graphs.
        self.encoder = nn.TransformerEncoder(layer, num_layers=config.num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(config.hidden_size, len(config.labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden, additive = self.embed_inputs(input_ids, attention_mask)
        for layer in self.encoder.layers:
            hidden = self.layer_forward(layer, hidden, additive)
        return self.classify(hidden, attention_mask)

    def embed_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's input and the additive attention mask every layer reads."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.embed_norm(self.embed(input_ids) + self.positions(positions))
        # An additive float mask exports to the same pattern as BERT's and avoids the bool fast path.
        additive = (1.0 - attention_mask.to(hidden.dtype)) * -10000.0
        return hidden, additive

    def layer_forward(
        self, layer: nn.TransformerEncoderLayer, hidden: torch.Tensor, additive: torch.Tensor
    ) -> torch.Tensor:
        return self.layer_with_attention(layer, hidden, additive)[0]

    def layer_with_attention(
        self, layer: nn.TransformerEncoderLayer, hidden: torch.Tensor, additive: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's output and its attention probabilities (None when every head was pruned)."""
        # The layer's own slow path, spelled out: TransformerEncoderLayer.forward switches to a
        # fused kernel in eval mode that neither the ONNX exporter nor autograd can follow.
        head_dim = self.config.hidden_size // self.config.num_heads
        attended = packed_qkv_attention(layer.self_attn, hidden, additive, head_dim, self.training)
        hidden = layer.norm1(hidden + layer.dropout1(attended.output))
        return layer.norm2(hidden + layer._ff_block(hidden)), attended.probs

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output: mean over the real tokens, then the classifier."""
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return self.classifier(pooled)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / PLAIN_CONFIG_FILE).write_text(
            json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8"
        )


def is_plain_folder(folder: Path) -> bool:
    return (folder / PLAIN_CONFIG_FILE).is_file()


def read_plain_config(folder: Path) -> PlainConfig:
    try:
        raw = json.loads((folder / PLAIN_CONFIG_FILE).read_text(encoding="utf-8"))
        return PlainConfig(**raw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{folder / PLAIN_CONFIG_FILE} is not a valid plain-model config: {exc}") from exc


def load_plain(folder: Path) -> LoadedSource:
    config = read_plain_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has {PLAIN_CONFIG_FILE} but no model.safetensors")
    model = PlainTransformerClassifier(config)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise UserError(
            f"weights in {weights} do not match {PLAIN_CONFIG_FILE}: {str(exc).splitlines()[0]}"
        ) from exc
    model.eval()
    return LoadedSource(
        kind="plain",
        folder=folder,
        architecture="plain-transformer",
        task="sequence-classification",
        model=model,
        module=model,
        io=SourceIO(
            input_names=("input_ids", "attention_mask"),
            output_names=("logits",),
            output_axes={"logits": ("batch", len(config.labels))},
        ),
        tokenizer=load_tokenizer(folder),
        labels=list(config.labels),
        max_length=config.max_length,
        pad_token_id=config.pad_token_id,
        config={**asdict(config), "model_type": "plain-transformer"},
        files_hash="sha256:" + hash_files([weights, folder / PLAIN_CONFIG_FILE], folder),
    )
