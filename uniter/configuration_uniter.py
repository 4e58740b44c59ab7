"""UniterConfig: BertConfig's fields plus the image side; presets `base`, `large`, `debug`."""

from __future__ import annotations

from transformers import PretrainedConfig


class UniterConfig(PretrainedConfig):
    model_type = "uniter"

    def __init__(
        self,
        vocab_size: int = 28996,  # bert-base-cased WordPiece, as UNITER
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,  # row 0 text, row 1 image
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        img_dim: int = 2048,  # region feature size
        img_pos_dim: int = 7,  # x1, y1, x2, y2, w, h, w·h (normalized)
        img_label_dim: int = 1601,  # detector classes incl. background (column 0)
        pad_token_id: int = 0,
        num_answers: int = 3129,  # VQA head
        vqa_loss: str = "bce",  # VQA loss: bce (the reference's) or softmax (soft-target cross-entropy)
        nlvr2_head: str = "pair-biattn",  # NLVR2 head: pair or pair-biattn
        tie_word_embeddings: bool = True,  # MLM decoder = word embeddings; MRFR output = image input Linear
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}): "
                f"each head gets hidden_size / num_attention_heads dimensions"
            )
        if hidden_act not in ("gelu", "relu", "gelu_new"):
            raise ValueError(f"hidden_act {hidden_act!r}: expected gelu (BERT's exact erf GELU), gelu_new or relu")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.img_dim = img_dim
        self.img_pos_dim = img_pos_dim
        self.img_label_dim = img_label_dim
        if vqa_loss not in ("bce", "softmax"):
            raise ValueError(f"vqa_loss {vqa_loss!r}: expected bce or softmax")
        self.num_answers = num_answers
        self.vqa_loss = vqa_loss
        self.nlvr2_head = nlvr2_head


def base(**overrides) -> UniterConfig:
    """UNITER-base: 12 layers, hidden 768, 12 heads (86M parameters)."""
    return UniterConfig(**overrides)


def large(**overrides) -> UniterConfig:
    """UNITER-large: 24 layers, hidden 1024, 16 heads (303M parameters)."""
    return UniterConfig(
        **{
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            **overrides,
        }
    )


def debug(**overrides) -> UniterConfig:
    """2 layers, hidden 64: for tests and the demo."""
    return UniterConfig(
        **{
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
            **overrides,
        }
    )


PRESETS = {"base": base, "large": large, "debug": debug}
