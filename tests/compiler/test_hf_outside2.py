"""Hugging Face architectures and call styles neither the zoo nor ``test_hf_outside`` has (eighth
round), built tiny from configs (random weights, no downloads): heads called with ``labels=``
(T5, BART, Llama with left padding, ALBERT, DistilBERT QA, ViT), ``return_dict=False``,
``output_hidden_states`` / ``output_attentions``, a state-space model (Mamba, whose convolution
weight reaches ``F.conv1d`` through ``squeeze(1).unsqueeze(1)``), FFT mixing (FNet), grouped
and separable convolutions (SqueezeBERT, ConvBERT), bottlenecks (MobileBERT), CLIP text + vision
with its contrastive loss, Whisper with labels, multi-query attention, ALiBi, RWKV, inputs_embeds,
gradient checkpointing in train(), bfloat16 weights, T5 encoder alone, a BERT2BERT EncoderDecoder.
Each: E1 bit for bit, a few training steps, ``set_homotopy(0)``, contract into the user's own
Parameters (C1). A loss whose code is data-dependent is refused, typed, naming the model's line.
"""

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tf = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import morphc  # noqa: E402
from tests.helpers import _floating_leaves, max_rel, train_extension  # noqa: E402
from tests.ir.test_sites import linear_operator_weights  # noqa: E402

V, H = 99, 32
_DEC = dict(vocab_size=V, hidden_size=H, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
_BART = dict(vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
             decoder_ffn_dim=37, max_position_embeddings=64)
_T5 = dict(vocab_size=V, d_model=H, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
           decoder_start_token_id=0, relative_attention_num_buckets=8)
_VIT = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            patch_size=8, image_size=32)
_W2V = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=V,
            pad_token_id=0, feat_extract_norm="layer", do_stable_layer_norm=True)


def _ids(b, s, seed=0):
    return torch.randint(3, V, (b, s), generator=torch.Generator().manual_seed(seed + 7 * s))


def _mask(b, s, left=False):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, slice(None, 2) if left else slice(-2, None)] = 0
    return mask


def _text(b=2, s=9, **more):
    return {"input_ids": _ids(b, s), "attention_mask": _mask(b, s), **more}


def _pixels(b=2):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


@dataclass
class Case:
    make: object
    inputs: object
    slow: bool = True
    alt: object = None                 # inputs at another batch size and length
    uncalled: tuple = ()               # weights of heads these inputs never call
    train: bool = False                # stays in train() mode
    tolerance: float = 1e-5            # C1, relative (bfloat16: its rounding)


CASES = {
    "mamba_ssm": Case(lambda: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=V, hidden_size=H, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=4)), lambda: {"input_ids": _ids(2, 9), "use_cache": False}, slow=False,
        alt=lambda: {"input_ids": _ids(3, 9), "use_cache": False}),   # its scan fixes the length
    "bart_labels_hidden_states": Case(lambda: tf.BartForConditionalGeneration(
        tf.BartConfig(**_BART)), lambda: _text(labels=_ids(2, 5, 1), use_cache=False,
                                               output_hidden_states=True), slow=False),
    "gpt2_labels_tuple_output": Case(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64)),
        lambda: _text(labels=_ids(2, 9), use_cache=False, return_dict=False), slow=False,
        alt=lambda: _text(3, 11, labels=_ids(3, 11), use_cache=False, return_dict=False)),
    "mistral_attentions_hidden_states": Case(lambda: tf.MistralForCausalLM(tf.MistralConfig(
        **_DEC, num_key_value_heads=2, attn_implementation="eager")),
        lambda: _text(use_cache=False, output_attentions=True, output_hidden_states=True),
        slow=False),
    "deit_distilled_head": Case(lambda: tf.DeiTForImageClassificationWithTeacher(
        tf.DeiTConfig(**_VIT, num_labels=3)), lambda: {"pixel_values": _pixels()}, slow=False),
    "mobilebert_bottleneck": Case(lambda: tf.MobileBertModel(tf.MobileBertConfig(
        **_DEC, embedding_size=16, intra_bottleneck_size=16, num_feedforward_networks=2)),
        _text, slow=False),
    "t5_labels": Case(lambda: tf.T5ForConditionalGeneration(tf.T5Config(**_T5)),
                      lambda: _text(labels=_ids(2, 5, 1), use_cache=False)),
    "t5_gated_untied_tuple_output": Case(lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        **_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
        lambda: _text(decoder_input_ids=_ids(2, 5, 1), use_cache=False, return_dict=False)),
    "llama_gqa1_left_padding_labels": Case(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **_DEC, num_key_value_heads=1)), lambda: {"input_ids": _ids(2, 9),
                                                   "attention_mask": _mask(2, 9, left=True),
                                                   "labels": _ids(2, 9), "use_cache": False}),
    "qwen2_sequence_classification": Case(lambda: tf.Qwen2ForSequenceClassification(
        tf.Qwen2Config(**_DEC, num_key_value_heads=2, num_labels=3, pad_token_id=0)),
        lambda: _text(use_cache=False)),
    "albert_mlm_labels": Case(lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(
        **_DEC, embedding_size=16)), lambda: _text(labels=_ids(2, 9))),
    "distilbert_qa_positions": Case(lambda: tf.DistilBertForQuestionAnswering(
        tf.DistilBertConfig(vocab_size=V, dim=H, n_layers=2, n_heads=4, hidden_dim=37,
                            max_position_embeddings=64)),
        lambda: _text(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))),
    "squeezebert_grouped_conv1d": Case(lambda: tf.SqueezeBertModel(tf.SqueezeBertConfig(
        **{**_DEC, "intermediate_size": 32}, embedding_size=H, q_groups=2, k_groups=2,
        v_groups=2, post_attention_groups=2, intermediate_groups=4, output_groups=4)), _text),
    "convbert_separable_conv": Case(lambda: tf.ConvBertModel(tf.ConvBertConfig(
        **_DEC, embedding_size=16, conv_kernel_size=3, head_ratio=2)), _text),
    "fnet_fourier": Case(lambda: tf.FNetModel(tf.FNetConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, intermediate_size=37,
        max_position_embeddings=64)), lambda: {"input_ids": _ids(2, 9)}),
    "vit_labels": Case(lambda: tf.ViTForImageClassification(tf.ViTConfig(**_VIT, num_labels=3)),
                       lambda: {"pixel_values": _pixels(), "labels": torch.tensor([0, 2])}),
    "swin_classifier_hidden_states": Case(lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=3)),
        lambda: {"pixel_values": _pixels(), "output_hidden_states": True}),
    "convnextv2": Case(lambda: tf.ConvNextV2Model(tf.ConvNextV2Config(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)),
        lambda: {"pixel_values": _pixels()}),
    "clip_text_and_vision_loss": Case(lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=H, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=H, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)), lambda: _text(pixel_values=_pixels(), return_loss=True)),
    "whisper_labels": Case(lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        d_model=H, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=37,
        num_mel_bins=16, max_source_positions=30, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=37, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, max_target_positions=32)),
        lambda: {"input_features": torch.randn(2, 16, 60), "labels": _ids(2, 5, 1),
                 "use_cache": False}),
    "wav2vec2_ctc_padded_audio": Case(lambda: tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(**_W2V)),
                                      lambda: {"input_values": torch.randn(2, 400),
                                               "attention_mask": _audio_mask()}),
    "gpt_bigcode_multi_query": Case(lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(
        vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
        lambda: _text(use_cache=False)),
    "esm_rotary": Case(lambda: tf.EsmModel(tf.EsmConfig(
        **_DEC, pad_token_id=1, position_embedding_type="rotary")), _text,
        uncalled=("contact_head.regression.weight",)),       # return_contacts=True only
    "mpt_alibi": Case(lambda: tf.MptForCausalLM(tf.MptConfig(
        vocab_size=V, d_model=H, n_layers=2, n_heads=4, max_seq_len=64)),
        lambda: _text(use_cache=False)),
    "rwkv": Case(lambda: tf.RwkvForCausalLM(tf.RwkvConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, attention_hidden_size=H,
        intermediate_size=37, context_length=64)), lambda: {"input_ids": _ids(2, 9),
                                                            "use_cache": False}),
    "llama_inputs_embeds": Case(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **_DEC, num_key_value_heads=2)), lambda: {
            "inputs_embeds": torch.randn(2, 9, H, generator=torch.Generator().manual_seed(1)),
            "attention_mask": _mask(2, 9), "use_cache": False}),
    "llama_gradient_checkpointing_train": Case(lambda: _checkpointed_llama(),
                                               lambda: _text(use_cache=False), train=True),
    "bert_bfloat16": Case(lambda: tf.BertModel(tf.BertConfig(**_DEC)).to(torch.bfloat16), _text,
                          tolerance=2e-2),
    "t5_encoder_only": Case(lambda: tf.T5EncoderModel(tf.T5Config(**_T5)), _text),
    "bert2bert_encoder_decoder": Case(lambda: _bert2bert(), lambda: _text(
        decoder_input_ids=_ids(2, 5, 1), use_cache=False)),
}


def _checkpointed_llama():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC, num_key_value_heads=2))
    model.gradient_checkpointing_enable()
    return model


def _bert2bert():
    config = tf.EncoderDecoderConfig.from_encoder_decoder_configs(
        tf.BertConfig(**_DEC), tf.BertConfig(**_DEC, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    return tf.EncoderDecoderModel(config=config)


def _audio_mask():
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 350:] = 0
    return mask


def _run(module, kwargs):
    with torch.no_grad():
        return _floating_leaves(module(**kwargs))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c.slow else n
                                  for n, c in CASES.items()])
def test_outside_hf_model_extends_exactly_and_contracts_into_its_own_parameters(name):
    check_extends_and_contracts(CASES[name])


def check_extends_and_contracts(case: Case) -> None:
    """E1 at the example inputs (and ``case.alt``), a few training steps, ``set_homotopy(0)``,
    C1 into the user's own Parameters: what each outside-in Hugging Face file runs per case."""
    torch.manual_seed(0)
    model, kwargs = case.make().train(case.train), case.inputs()
    shapes = [kwargs] + ([case.alt()] if case.alt else [])
    before = [_run(model, kw) for kw in shapes]
    params = dict(model.named_parameters())
    ext = morphc.extend(model, (), kwargs=kwargs, sites="all", width=3, seed=1)
    missing = linear_operator_weights(model) - ext.site_table.covered() - set(case.uncalled)
    assert not missing, f"linear weights neither sites nor listed exclusions: {missing}"
    for kw, expected in zip(shapes, before, strict=True):                      # E1
        assert all(torch.equal(a, b) for a, b in zip(expected, _run(ext, kw), strict=True))
    train_extension(ext, (), steps=3, kwargs=kwargs)
    ext.set_homotopy(0.0)
    folded = [_run(ext, kw) for kw in shapes]
    assert max(max_rel(a, b) for a, b in zip(before[0], folded[0], strict=True)) > 1e-4
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    for kw, expected in zip(shapes, folded, strict=True):                      # C1
        got = _run(model, kw)
        assert max(max_rel(a, b) for a, b in zip(expected, got, strict=True)) <= case.tolerance


def test_mambas_convolutions_are_sites_not_exclusions():
    """Its depthwise conv1d reads ``conv1d.weight.squeeze(1).unsqueeze(1)``: the parameter
    itself, so it gets a branch (was: excluded as 'computed by other code')."""
    torch.manual_seed(0)
    case = CASES["mamba_ssm"]
    table = morphc.extend(case.make().eval(), (), kwargs=case.inputs(), sites="all").site_table
    assert {"backbone.layers.0.mixer.conv1d", "backbone.layers.1.mixer.conv1d"} <= set(table)
    assert table["backbone.layers.0.mixer.conv1d"].kind == "conv"
    assert not table.exclusions


@pytest.mark.slow
def test_xlnets_three_d_einsum_weights_are_listed_exclusions_with_their_reason():
    torch.manual_seed(0)
    model = tf.XLNetModel(tf.XLNetConfig(vocab_size=V, d_model=H, n_layer=1, n_head=4,
                                         d_inner=37)).eval()
    table = morphc.extend(model, (), kwargs=_text(use_mems=False), sites="all").site_table
    assert "3-D parameter" in table.exclusions["layer.0.rel_attn.q"]
    assert {"layer.0.ff.layer_1", "layer.0.ff.layer_2"} <= set(table)


def test_a_loss_with_data_dependent_label_checks_is_refused_naming_the_line_and_labels():
    """Wav2Vec2ForCTC checks ``labels.max() >= vocab_size`` in Python; without labels= the same
    model extends (the case above)."""
    torch.manual_seed(0)
    model = tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(**_W2V)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.TraceError, match=r"(?s)modeling_wav2vec2\.py:\d+ in forward: "
                       r"if labels is not None and labels\.max\(\).*own loss \(labels=\)"):
        morphc.extend(model, (), kwargs={"input_values": torch.randn(2, 400),
                                         "labels": _ids(2, 4)}, sites="all")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_a_forced_bypass_cycle_on_a_labelled_hf_model_returns_the_users_own_model():
    torch.manual_seed(0)
    case = CASES["gpt2_labels_tuple_output"]
    model, kwargs = case.make().eval(), case.inputs()
    params = dict(model.named_parameters())
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
                       trigger=morphc.Schedule(at=[1]), bypass_steps=2, return_steps=2,
                       sites="all", width=2, verbose=False, accept="always")
    losses = [float(bp.step(lambda m: m(**kwargs)[0])) for _ in range(7)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(e["event"] == "contract" for e in bp.history)
    assert bp.finish() is model
    assert all(p is params[n] for n, p in model.named_parameters())
    assert F.cross_entropy(model(**{**kwargs, "labels": None})[0][:, :-1].reshape(-1, V),
                           kwargs["input_ids"][:, 1:].reshape(-1)) < losses[0]
