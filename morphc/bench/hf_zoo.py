"""A zoo of tiny Hugging Face architectures built from configs (random weights, no downloads).

Shared by the tests (``tests/compiler/test_hf_zoo.py``: E1 and exact contraction on every entry)
and ``morphc bench`` (``morphc.bench.zoo_times``: trace, extend and contract times per entry).
``transformers`` is imported on first use of a model factory, not when this module is imported:
``available()`` says whether it is installed (``pip install morphc[hf]``).

Pins verified: torch 2.13.0+cpu, transformers 5.23.0 (lightning 2.6.6, accelerate 1.15.0).
Adapted from the issue-10 study: each entry also says what its other image/audio size should do
(``alt_size``: "ok", "model" when the model itself refuses that size, "graph" when torch.export
fixed or guarded the size the eager model would take, so the extended model traces the model
again at that size) and may carry a ``dynamic_shapes`` spec (Swin: its window partitioning under
symbolic H, W takes ~60 s to export, batch-only takes ~2 s) and other ``extend`` options.

Each entry is a ``ZooEntry``:
  * ``build()``                -> (model, args, kwargs) at the default batch/size
  * ``inputs(batch, size)``    -> (args, kwargs) at another batch size and another
                                  sequence length / image side / audio length
  * ``alt``                    -> (batch, size) to try as "another shape"
  * ``size_kind``              -> "seq" | "image" | "audio" | "fixed"

Usage:
    from morphc.bench.hf_zoo import ZOO
    model, args, kwargs = ZOO["bert"].build()
    args2, kwargs2 = ZOO["bert"].inputs(3, 11)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


def available() -> bool:
    """Whether ``transformers`` is installed (without importing it)."""
    return importlib.util.find_spec("transformers") is not None


class _Transformers:
    """``transformers``, imported (offline) on the first attribute looked up: the factories below
    read ``tf.BertModel`` etc. only when a model is built."""

    def __getattr__(self, name: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers

        return getattr(transformers, name)


tf = _Transformers()

VOCAB = 99
H = 32          # hidden size
L = 2           # layers
NH = 4          # heads
FF = 37         # intermediate size
MAXPOS = 64

_TXT = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
            intermediate_size=FF, max_position_embeddings=MAXPOS)


def _ids(b, s, *, g):
    return torch.randint(3, VOCAB, (b, s), generator=g)


def _mask(b, s):
    m = torch.ones(b, s, dtype=torch.long)
    if s > 2:
        m[0, -2:] = 0   # some padding, so masks are not all-ones
    return m


def text_inputs(names=("input_ids", "attention_mask"), extra=None):
    def make(b, s):
        g = torch.Generator().manual_seed(b * 1000 + s)
        kw = {}
        for n in names:
            if n == "input_ids":
                kw[n] = _ids(b, s, g=g)
            elif n == "attention_mask":
                kw[n] = _mask(b, s)
            elif n == "token_type_ids":
                kw[n] = torch.zeros(b, s, dtype=torch.long)
            elif n == "decoder_input_ids":
                kw[n] = _ids(b, max(1, s - 2), g=g)
        kw.update(extra or {})
        return (), kw
    return make


def image_inputs(channels=3, extra=None):
    def make(b, s):
        g = torch.Generator().manual_seed(b * 1000 + s)
        return (), {"pixel_values": torch.randn(b, channels, s, s, generator=g), **(extra or {})}
    return make


def audio_inputs(b, s):
    g = torch.Generator().manual_seed(b * 1000 + s)
    return (), {"input_values": torch.randn(b, s, generator=g)}


@dataclass
class ZooEntry:
    name: str
    family: str            # encoder | decoder | enc-dec | vision | audio
    make_model: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], tuple[tuple, dict]]
    default: tuple[int, int]
    alt: tuple[int, int]
    size_kind: str = "seq"
    note: str = ""
    alt_size: str = "ok"          # ok | model (eager refuses it) | graph (export fixed it)
    dynamic_shapes: object = None
    slow: bool = False
    options: dict | None = None   # more morphc.extend options

    def build(self):
        torch.manual_seed(0)
        model = self.make_model().eval()
        args, kwargs = self.inputs(*self.default)
        return model, args, kwargs


ZOO: dict[str, ZooEntry] = {}


def entry(name, family, make_model, inputs, default=(2, 9), alt=(3, 13), size_kind="seq", note="",
          **more):
    ZOO[name] = ZooEntry(name, family, make_model, inputs, default, alt, size_kind, note, **more)


NOCACHE = {"use_cache": False}

# ---------------------------------------------------------------- text encoders
entry("bert", "encoder", lambda: tf.BertModel(tf.BertConfig(**_TXT)),
      text_inputs(("input_ids", "attention_mask", "token_type_ids")))
entry("roberta", "encoder",
      lambda: tf.RobertaModel(tf.RobertaConfig(**_TXT, pad_token_id=1)), text_inputs())
entry("xlm_roberta", "encoder",
      lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**_TXT, pad_token_id=1)), text_inputs())
entry("distilbert", "encoder", lambda: tf.DistilBertModel(tf.DistilBertConfig(
    vocab_size=VOCAB, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF,
    max_position_embeddings=MAXPOS)), text_inputs())
entry("albert", "encoder", lambda: tf.AlbertModel(tf.AlbertConfig(**_TXT, embedding_size=16)),
      text_inputs(("input_ids", "attention_mask", "token_type_ids")))
entry("electra", "encoder",
      lambda: tf.ElectraModel(tf.ElectraConfig(**_TXT, embedding_size=16)), text_inputs())
entry("deberta_v2", "encoder", lambda: tf.DebertaV2Model(tf.DebertaV2Config(
    **_TXT, relative_attention=True, position_buckets=8, max_relative_positions=16,
    pos_att_type=["p2c", "c2p"])), text_inputs())
entry("mpnet", "encoder", lambda: tf.MPNetModel(tf.MPNetConfig(**_TXT)), text_inputs())
entry("bert_cls", "encoder",
      lambda: tf.BertForSequenceClassification(tf.BertConfig(**_TXT, num_labels=3)),
      text_inputs(("input_ids", "attention_mask")))
entry("clip_text", "encoder", lambda: tf.CLIPTextModel(tf.CLIPTextConfig(
    vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
    num_attention_heads=NH, max_position_embeddings=MAXPOS, projection_dim=16,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)), text_inputs())

# ---------------------------------------------------------------- decoder LMs
_DEC = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
            num_attention_heads=NH, max_position_embeddings=MAXPOS)
entry("gpt2", "decoder", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
    vocab_size=VOCAB, n_embd=H, n_layer=L, n_head=NH, n_positions=MAXPOS,
    bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)),
      text_inputs(extra=NOCACHE))
entry("gpt2_cache", "decoder", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
    vocab_size=VOCAB, n_embd=H, n_layer=L, n_head=NH, n_positions=MAXPOS,
    bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)),
      text_inputs(), note="use_cache left at default (True)")
entry("gpt_neo", "decoder", lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
    vocab_size=VOCAB, hidden_size=H, num_layers=L, num_heads=NH, intermediate_size=FF,
    max_position_embeddings=MAXPOS, attention_types=[[["global", "local"], 1]], window_size=4)),
      text_inputs(extra=NOCACHE))
entry("opt", "decoder", lambda: tf.OPTForCausalLM(tf.OPTConfig(
    vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L, ffn_dim=FF, num_attention_heads=NH,
    max_position_embeddings=MAXPOS, word_embed_proj_dim=H)), text_inputs(extra=NOCACHE))
entry("llama", "decoder",
      lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC, num_key_value_heads=2)),
      text_inputs(extra=NOCACHE))
entry("llama_cache", "decoder",
      lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC, num_key_value_heads=2)),
      text_inputs(), note="use_cache left at default (True)")
entry("llama_cfg_nocache", "decoder",
      lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC, num_key_value_heads=2, use_cache=False)),
      text_inputs(), note="config.use_cache=False, no kwarg")
entry("mistral", "decoder", lambda: tf.MistralForCausalLM(tf.MistralConfig(
    **_DEC, num_key_value_heads=2, sliding_window=4)), text_inputs(extra=NOCACHE))
entry("qwen2", "decoder",
      lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DEC, num_key_value_heads=2)),
      text_inputs(extra=NOCACHE))
entry("qwen3", "decoder", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
    **_DEC, num_key_value_heads=2, head_dim=8)), text_inputs(extra=NOCACHE))
entry("phi", "decoder", lambda: tf.PhiForCausalLM(tf.PhiConfig(**_DEC, partial_rotary_factor=0.5)),
      text_inputs(extra=NOCACHE))
entry("gemma", "decoder", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(
    **_DEC, num_key_value_heads=2, head_dim=8)), text_inputs(extra=NOCACHE))
entry("bloom", "decoder", lambda: tf.BloomForCausalLM(tf.BloomConfig(
    vocab_size=VOCAB, hidden_size=H, n_layer=L, n_head=NH)), text_inputs(extra=NOCACHE))

# ---------------------------------------------------------------- encoder-decoders
entry("t5", "enc-dec", lambda: tf.T5Model(tf.T5Config(
    vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=FF, num_layers=L, num_heads=NH,
    decoder_start_token_id=0, relative_attention_num_buckets=8)),
      text_inputs(("input_ids", "attention_mask", "decoder_input_ids"), extra=NOCACHE))
_BART = dict(vocab_size=VOCAB, d_model=H, encoder_layers=L, decoder_layers=L,
             encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
             decoder_ffn_dim=FF, max_position_embeddings=MAXPOS)
entry("bart", "enc-dec", lambda: tf.BartModel(tf.BartConfig(**_BART)),
      text_inputs(("input_ids", "attention_mask", "decoder_input_ids"), extra=NOCACHE))
entry("marian", "enc-dec", lambda: tf.MarianMTModel(tf.MarianConfig(**_BART, pad_token_id=0,
                                                                     decoder_start_token_id=0)),
      text_inputs(("input_ids", "attention_mask", "decoder_input_ids"), extra=NOCACHE))
entry("pegasus", "enc-dec", lambda: tf.PegasusModel(tf.PegasusConfig(**_BART)),
      text_inputs(("input_ids", "attention_mask", "decoder_input_ids"), extra=NOCACHE))

# ---------------------------------------------------------------- vision
_VIT = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
            patch_size=8, image_size=32)
entry("vit", "vision", lambda: tf.ViTModel(tf.ViTConfig(**_VIT)), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image", note="no interpolate_pos_encoding",
      alt_size="model")
entry("vit_interp", "vision", lambda: tf.ViTModel(tf.ViTConfig(**_VIT)),
      image_inputs(extra={"interpolate_pos_encoding": True}),
      default=(2, 32), alt=(3, 48), size_kind="image", note="interpolate_pos_encoding=True",
      alt_size="graph")
entry("deit", "vision", lambda: tf.DeiTModel(tf.DeiTConfig(**_VIT)), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image", alt_size="model")
entry("clip_vision", "vision", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(
    hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
    image_size=32, patch_size=8, projection_dim=16)), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image", alt_size="model")
def _swin():
    return tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                      num_heads=[2, 2], window_size=4, mlp_ratio=2.0))


entry("swin", "vision", _swin, image_inputs(), default=(2, 32), alt=(3, 48), size_kind="image",
      alt_size="graph", note="batch-only dynamic_shapes: a 2 s export instead of 60 s; other "
      "sizes by tracing again (opted in: with a user spec morphc does not by default)",
      dynamic_shapes={"pixel_values": {0: torch.export.Dim.AUTO}}, options={"max_retraces": 4})
entry("swin_dynamic", "vision", _swin, image_inputs(), default=(2, 32), alt=(3, 48),
      size_kind="image", alt_size="graph", slow=True,
      note="every dim Dim.AUTO: ~60 s export; guards still refuse 48x48")
entry("convnext", "vision", lambda: tf.ConvNextModel(tf.ConvNextConfig(
    hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image")
entry("resnet", "vision", lambda: tf.ResNetModel(tf.ResNetConfig(
    embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image")
entry("resnet_cls", "vision", lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
    embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
    num_labels=5)), image_inputs(), default=(2, 32), alt=(3, 48), size_kind="image")
entry("mobilenet_v2", "vision", lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(
    image_size=32, depth_multiplier=0.25, min_depth=4)), image_inputs(),
      default=(2, 32), alt=(3, 48), size_kind="image", alt_size="graph",
      note="apply_tf_padding fixes H = W = 32 under export")
entry("segformer", "vision", lambda: tf.SegformerModel(tf.SegformerConfig(
    num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
    num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
    decoder_hidden_size=16)), image_inputs(), default=(2, 32), alt=(3, 48), size_kind="image")

# ---------------------------------------------------------------- audio
entry("wav2vec2", "audio", lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(
    hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2, do_stable_layer_norm=False)), audio_inputs,
      default=(2, 400), alt=(3, 560), size_kind="audio", note="pos_conv_embed uses weight_norm")
entry("hubert", "audio", lambda: tf.HubertModel(tf.HubertConfig(
    hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2)), audio_inputs,
      default=(2, 400), alt=(3, 560), size_kind="audio")


def _whisper_encoder():
    config = tf.WhisperConfig(                # first: imports transformers offline
        d_model=H, encoder_layers=L, encoder_attention_heads=NH, encoder_ffn_dim=FF,
        num_mel_bins=16, max_source_positions=30, decoder_layers=L, decoder_attention_heads=NH,
        decoder_ffn_dim=FF, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperEncoder(config)


def _whisper_inputs(b, s):
    g = torch.Generator().manual_seed(b * 1000 + s)
    return (), {"input_features": torch.randn(b, 16, s, generator=g)}


entry("whisper_encoder", "audio", _whisper_encoder, _whisper_inputs, default=(2, 60),
      alt=(3, 80), size_kind="audio", alt_size="model",
      note="WhisperEncoder requires input length == 2*max_source_positions (60)")
