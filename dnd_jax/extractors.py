"""Prompt extractors from files: config `encoder.*` -> (frozen Flax module, tokenizer).

`load_extractor(config.encoder)` is the one entry point used by training, generation and the
experiment; dnd_jax/models/ holds only the modules and their math. The types (`encoder.type`):

  sentence_bert  BERT last hidden states (models/encoder.py; the paper's default, all-MiniLM-L6-v2 here).
  decoder_lm     hidden states after `encoder.num_layers` decoder layers of a Llama/Qwen2 LM, no final norm
                 (models/decoder_lm.py; the paper's Qwen2.5-7B-Instruct ablation, SmolLM2-135M-Instruct here).
                 Tokenized by the LM's own tokenizer, right-padded.
  static         context-free word vectors (models/static.py; the paper's GloVe ablation): the table is the
                 Sentence-BERT's input word-piece embeddings, tokens without [CLS]/[SEP] (no GloVe offline).

Each module is called as `module(ids [..., L], mask [..., L], key=None, mask_padding=False, chunk=None,
key_length=None) -> [..., L, D]` with D = `module.cfg.hidden_size`, which must equal the generator's
`model.features[0][2]`. The tokenizer is called like a transformers tokenizer (`tokenize_prompts` in models/encoder.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import safetensors_io
from dnd_jax.errors import DndError
from dnd_jax.models.decoder_lm import DecoderConfig, DecoderLM
from dnd_jax.models.encoder import BertConfig, BertEncoder
from dnd_jax.models.static import StaticConfig, StaticEmbedding

TYPES = ("sentence_bert", "decoder_lm", "static")


def load_extractor(encoder, dtype=None):
    """The frozen extractor module and its tokenizer for a config's `encoder` fields.

    Args:
      encoder: ConfigDict with `path` (built-in name or directory, dnd_jax/assets.py), `dtype`, and optionally
        `type` (default "sentence_bert") and `num_layers` (decoder_lm; 0 = 15/28 of the layers, the paper's).
      dtype: compute dtype overriding `encoder.dtype` (parameters stay float32).

    Returns:
      (module, tokenizer).
    """
    from dnd_jax.assets import resolve_model

    kind = encoder.get("type", "sentence_bert")
    if kind not in TYPES:
        raise DndError(f"config field encoder.type: {kind!r} is not one of {', '.join(TYPES)}")
    path = resolve_model(encoder.path)
    dtype = jnp.dtype(encoder.dtype if dtype is None else dtype)
    if kind == "sentence_bert":
        return load_bert(path, dtype), load_tokenizer(path)
    if kind == "decoder_lm":
        return load_decoder_lm(path, encoder.get("num_layers", 0), dtype), load_tokenizer(path, right_pad=True)
    tok = load_tokenizer(path)
    return load_static(path, dtype, tok), WordPieces(tok)


class WordPieces:
    """A tokenizer without its special tokens ([CLS], [SEP]): only the text's own pieces (static type)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, **kwargs):
        return self.tokenizer(texts, add_special_tokens=False, **kwargs)


class TextTokenizer:
    """A checkpoint's tokenizer.json run by the `tokenizers` library alone, called like a transformers tokenizer for
    what the extractors ask (`tokenize_prompts`, `WordPieces`): padding to max_length, truncation, special tokens or
    not, numpy arrays. The same ids as transformers' fast tokenizer (tests/extractors_test.py checks it), without
    importing transformers and torch (2.6 s to load MiniLM's that way on 2 EPYC cores, 0.02 s this way)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfgs = [json.loads(p.read_text()) for p in (path / "tokenizer_config.json", path / "special_tokens_map.json")
                if p.is_file()]  # fmt: skip

        def named(key):  # "[PAD]", or an AddedToken's dict {"content": "[PAD]", ...}; the first file that has it
            for cfg in cfgs:
                v = cfg.get(key)
                if isinstance(v, dict | str):
                    return v.get("content") if isinstance(v, dict) else v
            return None

        self.pad_token, self.unk_token = named("pad_token"), named("unk_token")
        if self.pad_token is None and self._tok.padding:  # tokenizer.json's own padding setting
            self.pad_token = self._tok.padding.get("pad_token")
        self.pad_token_id = None if self.pad_token is None else self._tok.token_to_id(self.pad_token)
        self.unk_token_id = None if self.unk_token is None else self._tok.token_to_id(self.unk_token)

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None,
                 add_special_tokens=True):  # fmt: skip
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        tok = self._tok
        if truncation and max_length is not None:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        if padding == "max_length":
            if max_length is None or self.pad_token_id is None:
                raise DndError("padding to max_length needs max_length and a pad token in tokenizer_config.json")
            tok.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        elif padding in (False, None, "do_not_pad"):
            tok.no_padding()
        else:
            raise ValueError(f"TextTokenizer: padding={padding!r} (expected False or 'max_length')")
        enc = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc]}
        if return_tensors == "np":
            return {k: np.asarray(v, np.int64) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"TextTokenizer: return_tensors={return_tensors!r} (expected None or 'np')")
        return {k: v[0] for k, v in out.items()} if single else out


def load_tokenizer(path: str | Path, right_pad: bool = False):
    """The checkpoint's own fast tokenizer; a missing tokenizer file is a clear error.

    Args:
      path: model directory.
      right_pad: pad on the right and give a tokenizer without a pad token the EOS token (decoder LMs): a
        transformers tokenizer (chat templates and all). Otherwise a `TextTokenizer` where the directory has a
        tokenizer.json (the prompt extractors' inputs), a transformers tokenizer where it has only vocab.txt.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise DndError(f"{path}: no tokenizer file (tokenizer.json or vocab.txt)")
    if not right_pad and (path / "tokenizer.json").is_file():
        try:
            return TextTokenizer(path)
        except Exception as e:  # noqa: BLE001 (tokenizers raises its own exception types)
            raise DndError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as e:
        raise DndError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if right_pad:
        tok.padding_side = "right"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok


def _config(path: Path) -> tuple[dict, str]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise DndError(f"{path}: no config.json; not a model directory")
    return json.loads(cfg_path.read_text()), str(cfg_path)


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory (model.safetensors, sharded *.safetensors or pytorch_model.bin), mmapped."""
    shards = sorted(path.glob("model*.safetensors"))
    if shards:
        sd = {}
        for shard in shards:
            sd.update(safetensors_io.load(shard)[0])
        return sd
    if (path / "pytorch_model.bin").is_file():
        from converters.peft_to_jax import read_state_dict as read_bin

        return read_bin(path / "pytorch_model.bin")[0]
    raise DndError(f"{path}: no model.safetensors or pytorch_model.bin")


def _taker(sd: dict, path: Path, what: str):
    def take(key: str, shape) -> np.ndarray:
        if key not in sd:
            raise DndError(f"{path}: weight {key!r} missing; not a {what} checkpoint")
        v = np.asarray(sd[key], np.float32)
        if v.shape != tuple(shape):
            raise DndError(f"{path}: weight {key!r} has shape {list(v.shape)}, expected {list(shape)}")
        return v

    return take


def abstract_module(make):
    """The module `make()` builds, its variables abstract (shapes and dtypes): no random init and no device work,
    which `_fill` and `_set` then replace from a checkpoint (`check_filled` says if one was left out). Loading this
    way runs no JAX op, so a fresh process compiles nothing to load a model: MiniLM 3.1 -> 0.2 s, SmolLM2 as a
    causal LM 8.3 -> 4.1 s (2 EPYC cores)."""
    return nnx.eval_shape(make)


def _set(var, value: np.ndarray) -> None:
    var.set_value(jnp.asarray(value, var.dtype))


def check_filled(model, path: Path) -> None:
    """Every variable of `model` holds an array (none left abstract by a loader)."""
    left = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
            if isinstance(v, jax.ShapeDtypeStruct)]  # fmt: skip
    if left:
        raise DndError(f"{path}: no checkpoint weight for {', '.join(left[:3])}")


def _fill(mod, hf: str, take) -> None:
    """Copies the HF weights named `hf`.* into an Embed, LayerNorm, our RMSNorm or a Linear."""
    if isinstance(mod, nnx.Embed):
        _set(mod.embedding, take(f"{hf}.weight", mod.embedding.shape))
    elif isinstance(mod, nnx.LayerNorm):
        _set(mod.scale, take(f"{hf}.weight", mod.scale.shape))
        _set(mod.bias, take(f"{hf}.bias", mod.bias.shape))
    elif isinstance(mod, nnx.Linear):  # torch [out, in] -> kernel [in, out]
        _set(mod.kernel, take(f"{hf}.weight", mod.kernel.shape[::-1]).T)
        if mod.bias is not None:
            _set(mod.bias, take(f"{hf}.bias", mod.bias.shape))
    else:  # RMSNorm
        _set(mod.weight, take(f"{hf}.weight", mod.weight.shape))


_BERT = {  # our path -> HF key (relative to a layer for the layer fields)
    "word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm",
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
}  # fmt: skip


def _bert_state_dict(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in read_state_dict(path).items():
        k = k.removeprefix("bert.").removeprefix("0.auto_model.")
        out[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v
    return out


def load_bert(path: str | Path, dtype=jnp.float32) -> BertEncoder:
    """Loads a local BERT-family checkpoint directory (HF or sentence-transformers) into BertEncoder.

    Args:
      path: directory with config.json and model.safetensors (or pytorch_model.bin).
      dtype: compute dtype (parameters stay float32).
    """
    path = Path(path)
    cfg = BertConfig.from_hf(*_config(path))
    take = _taker(_bert_state_dict(path), path, "BERT")
    model = abstract_module(lambda: BertEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    for name in ("word", "position", "token_type", "emb_norm"):
        _fill(getattr(model, name), _BERT[name], take)
    for i, layer in enumerate(model.layers):
        for name in ("query", "key", "value", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm"):
            _fill(getattr(layer, name), f"encoder.layer.{i}.{_BERT[name]}", take)
    check_filled(model, path)
    return model


_DECODER = {  # our layer field -> HF key relative to layers.<i>
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
}  # fmt: skip


def load_decoder_lm(path: str | Path, num_layers: int = 0, dtype=jnp.float32) -> DecoderLM:
    """Loads the embedding and the first `num_layers` layers of a Llama/Qwen2 checkpoint into DecoderLM.

    Args:
      path: directory with config.json and safetensors (a CausalLM or a bare model; sharded files too).
      num_layers: decoder layers to run (0: `decoder_lm.default_num_layers`, the paper's 15/28).
      dtype: compute dtype (parameters stay float32).
    """
    path = Path(path)
    cfg = DecoderConfig.from_hf(*_config(path), num_layers=num_layers)
    model = abstract_module(lambda: DecoderLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    fill_decoder_lm(model, decoder_state_dict(path), path)
    check_filled(model, path)
    return model


def decoder_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A Llama/Qwen2 directory's tensors without the CausalLM's "model." prefix (a bare model's keys as they are)."""
    return {k.removeprefix("model."): v for k, v in read_state_dict(path).items()}


def fill_decoder_lm(model: DecoderLM, sd: dict, path: Path) -> None:
    """Sets a DecoderLM's embedding and layers from `decoder_state_dict(path)`."""
    take = _taker(sd, path, "Llama/Qwen2")
    _fill(model.embed, "embed_tokens", take)
    for i, layer in enumerate(model.layers):
        for name, hf in _DECODER.items():
            _fill(getattr(layer, name), f"layers.{i}.{hf}", take)


def load_static(path: str | Path, dtype=jnp.float32, tokenizer=None) -> StaticEmbedding:
    """The word-piece embedding table of a BERT checkpoint as StaticEmbedding (its unknown token -> ones).

    Args:
      path: BERT-family directory (config.json, weights, tokenizer).
      dtype: compute dtype (the table stays float32).
      tokenizer: the checkpoint's tokenizer (loaded from `path` when None), for its unknown-token id.
    """
    path = Path(path)
    bert = BertConfig.from_hf(*_config(path))
    unk = (tokenizer or load_tokenizer(path)).unk_token_id
    cfg = StaticConfig(vocab_size=bert.vocab_size, hidden_size=bert.hidden_size, oov_id=-1 if unk is None else unk)
    model = abstract_module(lambda: StaticEmbedding(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _fill(model.table, _BERT["word"], _taker(_bert_state_dict(path), path, "BERT"))
    check_filled(model, path)
    return model
