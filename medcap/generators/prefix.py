"""ClipCap-style prefix captioner: image embedding → mapper → prefix embeddings → causal LM.

One model definition serves training and prediction. The mapper turns a D-dim image embedding
(the retrieval encoder's cached vectors) into ``prefix_length`` vectors of the LM's input space;
the LM reads ``[prefix] [prompt tokens] [caption tokens] [eos]`` and is trained (or only its
mapper is, the LM frozen) to continue with the caption. Loss covers caption tokens and the final
eos only; prefix, prompt and padding positions carry the label -100.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medcap.config import PrefixConfig

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_PROMPT = " Caption:"  # a short fixed text between prefix and caption, so the LM knows what follows


@dataclass
class PrefixModelConfig:
    """Everything ``PrefixCaptioner.load`` needs to rebuild a saved model (its ``config.json``)."""

    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    embed_dim: int = 512  # D: the image embedding size
    focal_gamma: float = 0.0  # > 0: token-level focal loss (1-p)^gamma * CE
    prompt: str = DEFAULT_PROMPT
    max_caption_tokens: int = 64

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> PrefixModelConfig:
        return cls(**{**row, "prefix": PrefixConfig(**row.get("prefix", {}))})


class MlpMapper(nn.Module):
    """ClipCap's MLP: D → (H·P)/2 → H·P with tanh."""

    def __init__(self, dim: int, hidden: int, length: int):
        super().__init__()
        self.length, self.hidden = length, hidden
        mid = max(1, hidden * length // 2)
        self.net = nn.Sequential(nn.Linear(dim, mid), nn.Tanh(), nn.Linear(mid, hidden * length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.length, self.hidden)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: linear to P tokens, learned constant tokens, a small encoder."""

    def __init__(self, dim: int, hidden: int, length: int, layers: int):
        super().__init__()
        self.length, self.hidden = length, hidden
        self.linear = nn.Linear(dim, hidden * length)
        self.const = nn.Parameter(torch.randn(length, hidden) * 0.02)
        heads = next(h for h in (8, 4, 2, 1) if hidden % h == 0)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(x.shape[0], self.length, self.hidden)
        const = self.const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.encoder(torch.cat([tokens, const], dim=1))[:, self.length :]


def build_mapper(cfg: PrefixConfig, dim: int, hidden: int) -> nn.Module:
    if cfg.mapper == "mlp":
        return MlpMapper(dim, hidden, cfg.prefix_length)
    if cfg.mapper == "transformer":
        return TransformerMapper(dim, hidden, cfg.prefix_length, cfg.mapper_layers)
    raise ValueError(f"unknown prefix mapper {cfg.mapper!r}; use mlp | transformer")


def focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Mean token-level (1-p)^gamma · CE over labels != -100 (gamma 0: plain cross-entropy)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(logits[keep], dim=-1).gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    loss = -logp
    if gamma > 0:
        loss = (1.0 - logp.exp()).pow(gamma) * loss
    return loss.mean()


class PrefixCaptioner(nn.Module):
    """A trainable mapper in front of a (by default frozen) causal LM."""

    def __init__(self, config: PrefixModelConfig, lm: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.lm = lm
        self.tokenizer = tokenizer
        hidden = lm.get_input_embeddings().embedding_dim
        self.mapper = build_mapper(config.prefix, config.embed_dim, hidden)
        self.mapper.to(next(lm.parameters()).device)
        self.lm.requires_grad_(config.prefix.train_lm)
        prompt = tokenizer(config.prompt, add_special_tokens=False)["input_ids"] if config.prompt else []
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def train(self, mode: bool = True) -> PrefixCaptioner:
        super().train(mode)
        if not self.config.prefix.train_lm:
            self.lm.eval()  # a frozen LM keeps its dropout off
        return self

    # ------------------------------------------------------------------ inputs

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded caption token IDs ending in eos (at most ``max_caption_tokens``) and their mask."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        rows = []
        for text in captions:
            ids = tok(text, add_special_tokens=False)["input_ids"][: self.config.max_caption_tokens - 1]
            rows.append([*ids, eos])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return input_ids, mask

    def prefix(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[B, P + prompt, H]``: the mapped prefix followed by the prompt's token embeddings."""
        embeds = embeds.to(self.device, torch.float32)
        emb = self.lm.get_input_embeddings()
        prefix = self.mapper(embeds).to(emb.weight.dtype)
        prompt = emb(self.prompt_ids.to(self.device)).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prefix, prompt], dim=1)

    def build_inputs(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LM's ``inputs_embeds``, ``attention_mask`` and ``labels`` (-100 on prefix, prompt, padding)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        head = self.prefix(embeds)
        b, n = head.shape[:2]
        tokens = self.lm.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([head, tokens], dim=1)
        mask = torch.cat([torch.ones(b, n, dtype=attention_mask.dtype, device=self.device), attention_mask], dim=1)
        if labels is None:
            labels = input_ids
        labels = labels.to(self.device).masked_fill(attention_mask == 0, IGNORE)
        full = torch.cat([torch.full((b, n), IGNORE, dtype=torch.long, device=self.device), labels], dim=1)
        return inputs_embeds, mask, full

    # ------------------------------------------------------------------ training and generation

    def forward(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "logits", "labels"}``; the loss is (focal) cross-entropy on caption tokens."""
        inputs_embeds, mask, full = self.build_inputs(embeds, input_ids, attention_mask, labels)
        logits = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask).logits
        loss = focal_cross_entropy(logits[:, :-1], full[:, 1:], self.config.focal_gamma)
        return {"loss": loss, "logits": logits, "labels": full}

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int = 64, num_beams: int = 1, **kwargs: Any) -> list[str]:
        """One caption per embedding, decoded by the LM from the prefix (greedy or beam search)."""
        was_training = self.training
        self.eval()
        head = self.prefix(torch.as_tensor(embeds))
        mask = torch.ones(head.shape[:2], dtype=torch.long, device=self.device)
        tok = self.tokenizer
        out = self.lm.generate(
            inputs_embeds=head,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )
        self.train(was_training)
        # With only inputs_embeds, decoder-only generate returns just the new tokens.
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: Path) -> Path:
        """``config.json`` + ``mapper.safetensors`` (+ ``lm/`` when the LM was trained)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        save_file(state, str(out_dir / "mapper.safetensors"))
        if self.config.prefix.train_lm:
            self.lm.save_pretrained(out_dir / "lm")
            self.tokenizer.save_pretrained(out_dir / "lm")
        (out_dir / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        return out_dir

    @classmethod
    def build(cls, config: PrefixModelConfig, *, dtype: str = "auto", device: str = "auto") -> PrefixCaptioner:
        """A fresh model: the LM loaded by name (``medcap.models.lms.load_causal_lm``), a random mapper."""
        from medcap.models.lms import load_causal_lm

        lm, tokenizer = load_causal_lm(config.prefix.lm, dtype=dtype, device=device)
        return cls(config, lm, tokenizer)

    @classmethod
    def load(cls, model_dir: Path, *, dtype: str = "auto", device: str = "auto") -> PrefixCaptioner:
        """A model saved by ``save``."""
        from safetensors.torch import load_file

        from medcap.models.lms import load_causal_lm

        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            from medcap.models.hub import ModelNotFoundError

            raise ModelNotFoundError(f"no prefix captioner in {model_dir} (missing config.json); train one first")
        config = PrefixModelConfig.from_json(json.loads(path.read_text()))
        lm_name = str(model_dir / "lm") if config.prefix.train_lm else config.prefix.lm
        lm, tokenizer = load_causal_lm(lm_name, dtype=dtype, device=device)
        model = cls(config, lm, tokenizer)
        model.mapper.load_state_dict(load_file(str(model_dir / "mapper.safetensors"), device=str(model.device)))
        model.eval()
        return model
