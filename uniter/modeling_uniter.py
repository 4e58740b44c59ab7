"""UNITER, one file, top to bottom: embeddings → encoder → pooler → model → pretraining and downstream heads.

Submodule names are BERT's (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
`pooler.dense`, `cls.predictions.*`), so a BERT checkpoint loads by name (`uniter.` for `bert.`).
Text and regions are packed `[CLS] text [SEP] regions` with no gap between them (`gather_index`);
padding sits at the end and is hidden by a key-padding mask.

Shapes: B batch, T text length (with CLS/SEP), N regions, L packed length, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PreTrainedModel
from transformers.utils import ModelOutput

# relative imports: a saved model's folder holds copies of this file and these two (auto_map), and
# loads from them with trust_remote_code, this project installed or not
from .configuration_uniter import UniterConfig
from .ot import optimal_transport_distance

ACT = {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}


# --- embeddings -------------------------------------------------------------------------------


class UniterTextEmbeddings(nn.Module):
    """BERT's: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids=None, token_type_ids=None):  # (B, T) → (B, T, H)
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class UniterImageEmbeddings(nn.Module):
    """LN(W_f·f) + LN(W_p·p) + type embedding (row 1 of the text table), then LN and dropout.

    Regions have no sequence position: the 7-d box is their only location signal. A masked
    region's feature arrives zeroed; the learned row 1 of `mask_embedding` is added to it."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(config.img_pos_dim, config.hidden_size)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mask_embedding = nn.Embedding(2, config.img_dim)  # row 0 unused: "not masked" adds nothing
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):  # (B, N, 2048), (B, N, 7) → (B, N, H)
        if img_masks is not None:
            img_feat = img_feat + img_masks.unsqueeze(-1).to(img_feat.dtype) * self.mask_embedding.weight[1]
        x = (
            self.img_layer_norm(self.img_linear(img_feat))
            + self.pos_layer_norm(self.pos_linear(img_pos_feat))
            + type_embeddings
        )
        return self.dropout(self.LayerNorm(x))


# --- encoder (post-LN BERT layers on scaled-dot-product attention) ------------------------------


class UniterSelfAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, key_mask):  # (B, L, H), (B, 1, 1, L) bool → (B, L, H)
        b, length, h = x.shape

        def heads(t):  # (B, L, H) → (B, heads, L, head_dim)
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            attn_mask=key_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out.transpose(1, 2).reshape(b, length, h)


class UniterSelfOutput(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class UniterAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = UniterSelfAttention(config)
        self.output = UniterSelfOutput(config)

    def forward(self, x, key_mask):
        return self.output(self.self(x, key_mask), x)


class UniterIntermediate(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class UniterOutput(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class UniterLayer(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = UniterAttention(config)
        self.intermediate = UniterIntermediate(config)
        self.output = UniterOutput(config)

    def forward(self, x, key_mask):
        attended = self.attention(x, key_mask)
        return self.output(self.intermediate(attended), attended)


class UniterEncoder(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList(UniterLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attention_mask):  # (B, L, H), (B, L) 1 = real
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys only
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class UniterPooler(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):  # (B, L, H) → (B, H): tanh(W·h_[CLS])
        return torch.tanh(self.dense(x[:, 0]))


# --- the model --------------------------------------------------------------------------------


class UniterPreTrainedModel(PreTrainedModel):
    config_class = UniterConfig
    base_model_prefix = "uniter"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)


@dataclass
class UniterModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # (B, L, H), packed [text | regions | padding]
    # NOTE: always set; typed as required although HF's ModelOutput lets only its first field go without a default
    pooler_output: torch.Tensor = None  # type: ignore[assignment]  # (B, H)


class UniterModel(UniterPreTrainedModel):
    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = UniterPooler(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        img_feat=None,
        img_pos_feat=None,
        attention_mask=None,
        gather_index=None,
        img_masks=None,
        txt_type_ids=None,
        img_type_ids=None,
    ) -> UniterModelOutput:
        parts = []
        if input_ids is not None:
            parts.append(self.embeddings(input_ids, position_ids, txt_type_ids))  # (B, T, H)
        if img_feat is not None:
            if img_type_ids is None:
                img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
            type_emb = self.embeddings.token_type_embeddings(img_type_ids)
            parts.append(self.img_embeddings(img_feat, img_pos_feat, type_emb, img_masks))  # (B, N, H)
        x = torch.cat(parts, dim=1)  # (B, T + N, H)
        if gather_index is not None:  # pack each row as [text_i | regions_i | padding]
            x = torch.gather(x, 1, gather_index.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # (B, L, H)
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        hidden = self.encoder(x, attention_mask)
        return UniterModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))

    def encode(self, batch: dict) -> UniterModelOutput:
        """`forward` on a packed batch as `uniter.batch.pack` builds it (masks and type ids when present)."""
        return self(
            input_ids=batch["input_ids"],
            position_ids=batch.get("position_ids"),
            img_feat=batch["img_feat"],
            img_pos_feat=batch["img_pos_feat"],
            attention_mask=batch["attn_masks"],
            gather_index=batch["gather_index"],
            img_masks=batch.get("img_masks"),
            img_type_ids=batch.get("img_type_ids"),
        )


# --- pretraining heads ------------------------------------------------------------------------


class UniterPredictionHeadTransform(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class UniterLMPredictionHead(nn.Module):
    """BERT's MLM head; the decoder's weight is the word embedding matrix (tied)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.transform = UniterPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):  # (M, H) → (M, V)
        return self.decoder(self.transform(x)) + self.bias


class UniterOnlyMLMHead(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.predictions = UniterLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class RegionFeatureRegression(nn.Module):
    """MRFR: back to the 2048-d feature through the image input Linear's weight (tied, transposed)."""

    def __init__(self, config: UniterConfig, img_linear_weight: torch.Tensor):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            ACT[config.hidden_act],
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        )
        self.weight = img_linear_weight  # (H, 2048): shared with UniterImageEmbeddings.img_linear
        # NOTE: not named `bias`: transformers' tying resizes an output layer's `bias` to weight.shape[0]
        # (right for an MLM decoder), and this layer's weight is used transposed.
        self.feat_bias = nn.Parameter(torch.zeros(config.img_dim))

    def forward(self, x):  # (M, H) → (M, 2048)
        return F.linear(self.net(x), self.weight.t(), self.feat_bias)


class RegionClassification(nn.Module):
    """MRC / MRC-kl: logits over the detector's classes (background in column 0)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            ACT[config.hidden_act],
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            nn.Linear(config.hidden_size, config.img_label_dim),
        )

    def forward(self, x):
        return self.net(x)


@dataclass
class UniterPretrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None  # scalar, the task's loss (ITM includes the weighted WRA term)
    logits: torch.Tensor | None = None  # task predictions at the scored positions
    targets: torch.Tensor | None = None  # what they were scored against
    ot_distance: torch.Tensor | None = None  # (B,) WRA distances of the ITM batch, when computed


TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


class UniterForPretraining(UniterPreTrainedModel):
    """The four task families; `forward(batch, task)` computes one task's loss (conditional masking:
    the collate function decides what is masked)."""

    # target → source (transformers ties them at init and after from_pretrained; only the source is saved)
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",
        "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",
    }

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        self.cls = UniterOnlyMLMHead(config)
        self.feat_regress = RegionFeatureRegression(config, self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def get_input_embeddings(self):
        return self.uniter.embeddings.word_embeddings

    def forward(self, batch: dict, task: str, ot_lambda: float = 0.0) -> UniterPretrainingOutput:
        out = self.uniter.encode(batch)
        hidden = out.last_hidden_state  # (B, L, H)
        if task == "mlm":
            text = hidden[:, : batch["input_ids"].size(1)]  # text comes first in every packed row
            logits = self.cls(text[batch["txt_labels"] != -1])  # (M, V)
            targets = batch["txt_labels"][batch["txt_labels"] != -1]
            return UniterPretrainingOutput(F.cross_entropy(logits, targets), logits, targets)
        if task in ("mrfr", "mrc", "mrckl"):
            masked = hidden[batch["img_mask_packed"]]  # (M, H): masked regions, in packed order
            if task == "mrfr":
                pred = self.feat_regress(masked)
                return UniterPretrainingOutput(
                    F.mse_loss(pred, batch["feat_targets"].float()), pred, batch["feat_targets"]
                )
            logits = self.region_classifier(masked)  # (M, 1601)
            soft = batch["label_targets"].float()  # (M, 1601), background column 0
            if task == "mrc":  # the detector's most likely object class, background excluded
                targets = soft[:, 1:].argmax(dim=1) + 1
                return UniterPretrainingOutput(F.cross_entropy(logits, targets), logits, targets)
            # NOTE: elementwise mean over regions × 1601, as the reference (not batchmean).
            loss = F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="none").mean()
            return UniterPretrainingOutput(loss, logits, soft)
        if task == "itm":
            logits = self.itm_output(out.pooler_output)  # (B, 2)
            loss = F.cross_entropy(logits, batch["targets"])
            distance = None
            if ot_lambda > 0:
                distance = self.wra_distance(hidden, batch)
                pos, neg = distance[batch["targets"] == 1], distance[batch["targets"] == 0]
                loss = loss + ot_lambda * (pos.sum() - neg.sum()) / distance.numel()
            return UniterPretrainingOutput(loss, logits, batch["targets"], distance)
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")

    def wra_distance(self, hidden, batch) -> torch.Tensor:
        """Word-region alignment: OT distance between each pair's text and region outputs (fp32)."""
        txt = torch.gather(hidden, 1, batch["ot_txt_index"].unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        img = torch.gather(hidden, 1, batch["ot_img_index"].unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return optimal_transport_distance(txt.float(), img.float(), batch["ot_txt_pad"], batch["ot_img_pad"])


# --- downstream heads -------------------------------------------------------------------------
# Each loads a pretraining checkpoint with `from_pretrained` (the `uniter.` weights by name; the
# new head is initialised) and computes its loss in `forward` when targets are in the batch.


@dataclass
class UniterDownstreamOutput(ModelOutput):
    loss: torch.Tensor | None = None  # scalar, when the batch carries targets
    logits: torch.Tensor | None = None  # VQA (B, answers); NLVR2 (B, 2); retrieval (B,); RE (B, N)


class UniterForVqa(UniterPreTrainedModel):
    """Pooled [CLS] → Linear(H, 2H) → GELU → LN → Linear(2H, answers); BCE on soft scores × answers,
    or (config.vqa_loss "softmax") cross-entropy against the scores normalized to a distribution."""

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        h = config.hidden_size
        self.vqa_output = nn.Sequential(
            nn.Linear(h, 2 * h),
            nn.GELU(),
            nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
            nn.Linear(2 * h, config.num_answers),
        )
        self.post_init()

    def forward(self, batch: dict) -> UniterDownstreamOutput:
        logits = self.vqa_output(self.uniter.encode(batch).pooler_output)  # (B, answers)
        loss = None
        if "targets" in batch and self.config.vqa_loss == "softmax":  # the scores as a distribution
            targets = batch["targets"]
            total = targets.sum(-1, keepdim=True)
            per_row = -(targets / total.clamp(min=1e-6) * F.log_softmax(logits.float(), -1)).sum(-1)
            loss = per_row.sum() / (total.squeeze(-1) > 0).sum().clamp(min=1)  # rows without an answer add 0
        elif "targets" in batch:  # (B, answers) soft scores; the reference's instance-level scale
            loss = F.binary_cross_entropy_with_logits(logits, batch["targets"]) * logits.size(1)
        return UniterDownstreamOutput(loss, logits)


class AttentionPool(nn.Module):
    """Attention pooling over a sequence, as the reference's NLVR2 head: a ReLU'd score per
    position (Linear(H, 1) → ReLU), padding pushed to -1e4, softmax, dropout on the weights."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        score = self.fc(hidden).squeeze(-1) + (~mask).to(hidden.dtype) * -1e4  # (S, L)
        weights = self.dropout(score.softmax(-1))
        return torch.einsum("sl,slh->sh", weights, hidden)  # (S, H)


class UniterForNlvr2(UniterPreTrainedModel):
    """Rows 2i and 2i+1 of the batch are statement i's text with its left and right image (type
    ids 1 and 2). Both heads are the reference's (model/nlvr2.py), layer for layer:
    `pair`: the two [CLS] outputs concatenated → Linear(2H, 2). `pair-biattn`: the left sequence
    attends to the right (attn1) and the right to the left (attn2); each side's [attention output;
    own output] → fc (Linear(2H, H), ReLU, dropout) → attention pooling; both pooled → Linear(2H, 2)."""

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        h = config.hidden_size
        if config.nlvr2_head == "pair-biattn":
            heads, drop = config.num_attention_heads, config.attention_probs_dropout_prob
            self.attn1 = nn.MultiheadAttention(h, heads, dropout=drop, batch_first=True)
            self.attn2 = nn.MultiheadAttention(h, heads, dropout=drop, batch_first=True)
            self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob))
            self.attn_pool = AttentionPool(h, drop)
        elif config.nlvr2_head != "pair":
            raise ValueError(f"nlvr2_head {config.nlvr2_head!r}: expected pair or pair-biattn")
        self.nlvr2_output = nn.Linear(2 * h, 2)
        self.post_init()

    def grow_type_embeddings(self) -> None:
        """A third token type for the right image, copied from the image type (as the reference)."""
        old = self.uniter.embeddings.token_type_embeddings
        if old.num_embeddings >= 3:
            return
        new = nn.Embedding(3, old.embedding_dim).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[:2] = old.weight
            new.weight[2] = old.weight[1]
        self.uniter.embeddings.token_type_embeddings = new
        self.config.type_vocab_size = 3

    def forward(self, batch: dict) -> UniterDownstreamOutput:
        out = self.uniter.encode(batch)
        if self.config.nlvr2_head == "pair":
            pooled = out.pooler_output.view(-1, 2 * self.config.hidden_size)  # (B/2, 2H)
            logits = self.nlvr2_output(pooled)
        else:
            hidden = out.last_hidden_state  # (2S, L, H)
            mask = batch["attn_masks"].bool()
            left, right = hidden[0::2], hidden[1::2]
            lmask, rmask = mask[0::2], mask[1::2]
            l2r, _ = self.attn1(left, right, right, key_padding_mask=~rmask, need_weights=False)
            r2l, _ = self.attn2(right, left, left, key_padding_mask=~lmask, need_weights=False)
            left = self.attn_pool(self.fc(torch.cat([l2r, left], dim=-1)), lmask)  # (S, H)
            right = self.attn_pool(self.fc(torch.cat([r2l, right], dim=-1)), rmask)
            logits = self.nlvr2_output(torch.cat([left, right], dim=-1))  # (S, 2)
        loss = F.cross_entropy(logits, batch["targets"]) if "targets" in batch else None
        return UniterDownstreamOutput(loss, logits)


class UniterForImageTextRetrieval(UniterPreTrainedModel):
    """A score per (text, image) pair: Linear(H, 1) on the pooled output, initialised from the
    pretrained ITM head's "match" row. Batches are groups of 1 positive + K negatives; the loss is
    the hinge mean(max(0, margin + σ(s_neg) − σ(s_pos)))."""

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        self.itm_output = nn.Linear(config.hidden_size, 2)  # loaded from pretraining, read once
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def init_rank_from_itm(self) -> None:
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:2])
            self.rank_output.bias.copy_(self.itm_output.bias[1:2])

    def forward(self, batch: dict, margin: float = 0.2) -> UniterDownstreamOutput:
        scores = self.rank_output(self.uniter.encode(batch).pooler_output).squeeze(-1)  # (B,)
        loss = None
        if "group_size" in batch:  # rows [pos, neg × K] per query
            grouped = torch.sigmoid(scores).view(-1, int(batch["group_size"]))
            loss = (margin + grouped[:, 1:] - grouped[:, :1]).clamp(min=0).mean()
        return UniterDownstreamOutput(loss, scores)


class UniterForReferringExpression(UniterPreTrainedModel):
    """A score per region: MLP (Linear, GELU, LN, Linear → 1) over the region outputs; positions that
    are not regions get −1e4; cross-entropy against the referred region's index."""

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        h = config.hidden_size
        self.re_output = nn.Sequential(
            nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps), nn.Linear(h, 1)
        )
        self.post_init()

    def forward(self, batch: dict) -> UniterDownstreamOutput:
        hidden = self.uniter.encode(batch).last_hidden_state  # (B, L, H)
        regions = torch.gather(
            hidden, 1, batch["region_index"].unsqueeze(-1).expand(-1, -1, hidden.size(-1))
        )  # (B, N, H)
        logits = self.re_output(regions).squeeze(-1).masked_fill(batch["region_pad"], -1e4)  # (B, N)
        loss = F.cross_entropy(logits, batch["targets"]) if "targets" in batch else None
        return UniterDownstreamOutput(loss, logits)


# --- Auto classes ----------------------------------------------------------------------------------
# In a process that imported this module, AutoConfig / AutoModel / AutoModelForPreTraining know
# "uniter". Every saved model's config.json also gets an auto_map naming its own class for AutoModel
# (and UniterConfig for AutoConfig), with this file, configuration_uniter.py and ot.py copied beside
# the weights: `AutoModel.from_pretrained(folder, trust_remote_code=True)` in a fresh Python gives
# back the class that was saved (a VQA model, not a bare encoder).
AutoConfig.register("uniter", UniterConfig, exist_ok=True)
AutoModel.register(UniterConfig, UniterModel, exist_ok=True)
AutoModelForPreTraining.register(UniterConfig, UniterForPretraining, exist_ok=True)
UniterConfig.register_for_auto_class()
for _saved in (
    UniterModel,
    UniterForPretraining,
    UniterForVqa,
    UniterForNlvr2,
    UniterForImageTextRetrieval,
    UniterForReferringExpression,
):
    _saved.register_for_auto_class("AutoModel")
