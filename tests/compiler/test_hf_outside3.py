"""Hugging Face heads and attention variants neither the zoo nor the two earlier outside-in files
have (ninth round), built tiny from configs (random weights, no downloads): BigBird's block-sparse
attention, Falcon's new decoder architecture with ALiBi, OPT with a projected embedding and labels,
DeBERTa-v2 masked LM, ELECTRA's discriminator, XLM-RoBERTa multiple choice (3-D inputs), Segformer
semantic segmentation, a Gemma sequence classifier with labels, Pegasus with labels. Each: E1 bit
for bit (at the example and at another batch size), a few training steps, contract into the user's
own Parameters (C1). A cache handed in as ``past_key_values`` is refused, typed, saying what to
pass instead.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tf = pytest.importorskip("transformers")

import torch  # noqa: E402

import morphc  # noqa: E402
from tests.compiler.test_hf_outside2 import Case, _ids, check_extends_and_contracts  # noqa: E402

V, H = 99, 32
_ENC = dict(vocab_size=V, hidden_size=H, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)


def _text(b=2, s=9, **more):
    return {"input_ids": _ids(b, s), "attention_mask": torch.ones(b, s, dtype=torch.long),
            **more}


def _choices(b=2, s=9):
    return {"input_ids": _ids(b, s).unsqueeze(1).expand(b, 3, s).contiguous()}


CASES = {
    "bigbird_block_sparse": Case(lambda: tf.BigBirdModel(tf.BigBirdConfig(
        **_ENC, attention_type="block_sparse", block_size=2, num_random_blocks=1)),
        lambda: _text(2, 16), alt=lambda: _text(3, 16)),        # 16 > (5 + 2 r) · block size
    "falcon_new_architecture_alibi": Case(lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        new_decoder_architecture=True, num_kv_heads=2)), lambda: _text(use_cache=False),
        alt=lambda: _text(3, 11, use_cache=False)),
    "opt_projected_embeddings_labels": Case(lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16)),
        lambda: _text(labels=_ids(2, 9), use_cache=False),
        alt=lambda: _text(3, 11, labels=_ids(3, 11), use_cache=False)),
    "deberta_v2_masked_lm": Case(lambda: tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
        **_ENC, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"])), lambda: {"input_ids": _ids(2, 9)},
        alt=lambda: {"input_ids": _ids(3, 11)}),
    "electra_discriminator": Case(lambda: tf.ElectraForPreTraining(tf.ElectraConfig(
        **_ENC, embedding_size=16)), lambda: {"input_ids": _ids(2, 9)},
        alt=lambda: {"input_ids": _ids(3, 11)}),
    "xlm_roberta_multiple_choice": Case(lambda: tf.XLMRobertaForMultipleChoice(
        tf.XLMRobertaConfig(**_ENC, pad_token_id=1)), _choices,
        alt=lambda: _choices(3, 11)),
    "segformer_semantic_segmentation": Case(lambda: tf.SegformerForSemanticSegmentation(
        tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                           hidden_sizes=[8, 16], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                           strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
                           num_labels=3)),
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        alt=lambda: {"pixel_values": torch.randn(3, 3, 32, 32)}),
    "gemma_sequence_classification_labels": Case(lambda: tf.GemmaForSequenceClassification(
        tf.GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=3,
                       pad_token_id=0)),
        lambda: _text(labels=torch.tensor([0, 2]), use_cache=False),
        alt=lambda: _text(3, 11, labels=torch.tensor([0, 1, 2]), use_cache=False)),
    "pegasus_labels": Case(lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(
        vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
        max_position_embeddings=64)), lambda: _text(labels=_ids(2, 5, 1), use_cache=False),
        alt=lambda: _text(3, 11, labels=_ids(3, 6, 1), use_cache=False)),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c.slow else n
                                  for n, c in CASES.items()])
def test_outside_hf_head_extends_exactly_and_contracts_into_its_own_parameters(name):
    check_extends_and_contracts(CASES[name])


def test_a_cache_given_as_past_key_values_is_refused_saying_what_to_pass():
    """GPT-2 extended at a generation step (one new token, the prompt's DynamicCache as
    ``past_key_values``): the TraceError quoted torch.export's 'Unsupported input type' and then
    advised rewriting data-dependent control flow, which the model does not have."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4,
                                             n_positions=64, bos_token_id=0, eos_token_id=0))
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=_ids(2, 5), use_cache=True).past_key_values
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.TraceError, match=r"past_key_values is a DynamicCache.*whole "
                       r"forward.*no past_key_values, use_cache=False") as info:
        morphc.extend(model, (), kwargs={"input_ids": _ids(2, 1, 1), "past_key_values": cache})
    assert "control flow" not in str(info.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ext = morphc.extend(model, (), kwargs={"input_ids": _ids(2, 6), "use_cache": False},
                        sites="all")                                 # what the message advises
    with torch.no_grad():
        assert torch.equal(ext(input_ids=_ids(2, 6)).logits, model(input_ids=_ids(2, 6),
                                                                   use_cache=False).logits)
