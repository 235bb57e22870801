"""Hugging Face architectures the zoo (``morphc.bench.hf_zoo``) does not have, built tiny from
configs (random weights, no downloads): rotary decoders, soft-capped logits, mixture-of-experts
routing, unpadded/alternating attention, pooling encoders, relative position biases, heads
called with ``labels=`` (a loss in the output), an encoder-decoder, a model in ``train()`` with
dropout. Each goes through extend → E1 (``torch.equal``, at the example and at another batch
size and sequence length: dynamic shapes) → a few training steps → ``set_homotopy(0)`` →
contract into the user's own Parameters (C1); models no frontend can take are refused, typed,
untouched.
"""

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tf = pytest.importorskip("transformers")

import torch  # noqa: E402

import morphc  # noqa: E402
from tests.helpers import _floating_leaves, max_rel, train_extension  # noqa: E402
from tests.ir.test_sites import linear_operator_weights  # noqa: E402

V, H = 99, 32
_DEC = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
_GPTJ = dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)
_VIS = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            patch_size=8, image_size=32)
_MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)


def _ids(b, s, seed=0):
    return torch.randint(3, V, (b, s), generator=torch.Generator().manual_seed(seed + 7 * s))


def _mask(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, -2:] = 0                     # padding in the first row
    return mask


def _text(b, s):
    return {"input_ids": _ids(b, s), "attention_mask": _mask(b, s)}


def _lm(b, s):
    return {**_text(b, s), "use_cache": False}


def _image(b, s):
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))}


@dataclass
class Case:
    make: object
    inputs: object
    alt: tuple = ((3, 13),)              # another batch size and sequence length
    exact: bool = True                   # E1 bit-for-bit against eager (see BEiT below)
    train: bool = False                  # the model stays in train() mode (dropout > 0)
    slow: bool = False


CASES = {
    "gpt_neox": Case(lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_DEC)), _lm, slow=True),
    "gptj": Case(lambda: tf.GPTJForCausalLM(tf.GPTJConfig(**_GPTJ)), _lm, slow=True),
    "codegen": Case(lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(**_GPTJ)), _lm, slow=True),
    "falcon": Case(lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4)), _lm),
    "phi3": Case(lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
        **_DEC, num_key_value_heads=2, pad_token_id=0)), _lm),
    "gemma2_softcap": Case(lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **_DEC, num_key_value_heads=2, head_dim=8, sliding_window=4,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)), _lm),
    "starcoder2": Case(lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
        **_DEC, num_key_value_heads=2)), _lm),
    "olmo": Case(lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**_DEC, pad_token_id=0)), _lm),
    "qwen2_moe": Case(lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **_DEC, **_MOE, num_experts=4, moe_intermediate_size=16,
        shared_expert_intermediate_size=16)), _lm),
    "mixtral_batched_mm": Case(lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        **_DEC, **_MOE, num_local_experts=4, experts_implementation="batched_mm")), _lm),
    "modernbert": Case(lambda: tf.ModernBertModel(tf.ModernBertConfig(
        **_DEC, pad_token_id=0, global_attn_every_n_layers=2, local_attention=8)), _text),
    "funnel": Case(lambda: tf.FunnelModel(tf.FunnelConfig(
        vocab_size=V, d_model=H, n_head=4, d_head=8, d_inner=37, block_sizes=[1, 1],
        num_decoder_layers=1)), _text, slow=True),
    "bigbird_full": Case(lambda: tf.BigBirdModel(tf.BigBirdConfig(
        **_DEC, attention_type="original_full")), _text),
    "bert_seqcls_labels": Case(lambda: tf.BertForSequenceClassification(tf.BertConfig(
        **_DEC, num_labels=3)), lambda b, s: {**_text(b, s), "labels": torch.arange(b) % 3}),
    "roberta_tokcls_labels": Case(lambda: tf.RobertaForTokenClassification(tf.RobertaConfig(
        **_DEC, num_labels=3, pad_token_id=1)),
        lambda b, s: {**_text(b, s), "labels": _ids(b, s, 1) % 3}),
    "bert_train_dropout": Case(lambda: tf.BertForSequenceClassification(tf.BertConfig(
        **_DEC, num_labels=3, hidden_dropout_prob=0.1)), _text, train=True),
    "mbart_seq2seq": Case(lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(
        vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
        max_position_embeddings=64)),
        lambda b, s: {**_lm(b, s), "decoder_input_ids": _ids(b, s - 2, 2)}),
    "dinov2": Case(lambda: tf.Dinov2Model(tf.Dinov2Config(**_VIS)), _image, alt=((3, 0),)),
    "data2vec_vision": Case(lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**_VIS)),
                            _image, alt=((3, 0),)),
    "siglip_vision": Case(lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**_VIS)), _image,
                          alt=((3, 0),)),
    # Traced, transformers builds an all-True boolean attention mask that BEiT adds to its
    # relative position bias (+1 on every logit); eager passes None. Softmax does not see the
    # shift, float rounding does: the graph is the model's own traced path, not morphc's.
    "beit_relpos": Case(lambda: tf.BeitModel(tf.BeitConfig(
        **_VIS, use_relative_position_bias=True)), _image, alt=((3, 0),), exact=False),
}


def _build(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make()
    model.train(case.train)
    return case, model, case.inputs(2, 9)


def _run(module, kwargs, seed=5):
    torch.manual_seed(seed)              # dropout draws the same masks in both (train mode)
    with torch.no_grad():
        return _floating_leaves(module(**kwargs))


def _expert_weights(model):
    """3-D expert weights (``experts.gate_up_proj`` …) that module types do not reveal."""
    return {n for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c.slow else n
                                  for n, c in CASES.items()])
def test_outside_model_extends_exactly_and_contracts_into_its_own_parameters(name):
    case, model, kwargs = _build(name)
    shapes = [kwargs] + [case.inputs(b, s) for b, s in case.alt]
    before = [_run(model, kw) for kw in shapes]
    params = dict(model.named_parameters())
    ext = morphc.extend(model, (), kwargs=kwargs, sites="all", width=3, seed=1)
    missing = (linear_operator_weights(model) | _expert_weights(model)) - \
        ext.site_table.covered()
    assert not missing, f"linear weights neither sites nor listed exclusions: {missing}"
    for kw, expected in zip(shapes, before, strict=True):                      # E1
        got = _run(ext, kw)
        if case.exact:
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        else:
            assert max(max_rel(a, b) for a, b in zip(expected, got, strict=True)) <= 1e-6
    train_extension(ext, (), steps=3, kwargs=kwargs)
    assert any(b.B.abs().max() > 0 for b in ext.branches.values())
    ext.set_homotopy(0.0)
    assert ext.constraint_residual() == 0.0
    folded = [_run(ext, kw) for kw in shapes]
    assert max_rel(before[0][0], folded[0][0]) > 1e-4        # training moved the function
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    for kw, expected in zip(shapes, folded, strict=True):                      # C1
        got = _run(model, kw)
        assert max(max_rel(a, b) for a, b in zip(expected, got, strict=True)) <= 1e-5


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral_batched_mm"])
def test_expert_weights_are_listed_exclusions_with_their_reason(name):
    _, model, kwargs = _build(name)
    table = morphc.extend(model, (), kwargs=kwargs, sites="all", width=2).site_table
    experts = _expert_weights(model)
    assert experts and experts <= set(table.exclusions)
    assert all("mixture of experts" in table.exclusions[n] for n in experts)
    assert any(".mlp.gate" in s for s in table)              # the router itself is a site


@pytest.mark.parametrize("name", ["gpt_neox", "qwen2_moe", "funnel", "dinov2"])
def test_inspect_lists_sites_at_the_example_shapes(name):
    _, model, kwargs = _build(name)
    report = morphc.inspect(model, (), kwargs=kwargs)
    first = report.rows[0]
    assert first.input_shape[:2] == ([2, 3] if name == "dinov2" else [2, 9]), first
    assert all(-1 not in (r.input_shape or []) for r in report.rows)
    if name == "qwen2_moe":
        assert "not a site: model.layers.0.mlp.experts.gate_up_proj" in str(report)


def _longformer():
    return tf.LongformerModel(tf.LongformerConfig(**_DEC, attention_window=4, pad_token_id=1))


def _mixtral_eager():
    return tf.MixtralForCausalLM(tf.MixtralConfig(
        **_DEC, **_MOE, num_local_experts=4, experts_implementation="eager"))


@pytest.mark.parametrize("make,inputs", [(_longformer, _text), (_mixtral_eager, _lm)],
                         ids=["longformer", "mixtral_eager_experts"])
def test_data_dependent_model_is_refused_typed_and_left_untouched(make, inputs):
    torch.manual_seed(0)
    model = make().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.TraceError, match="data-dependent"):
        morphc.extend(model, (), kwargs=inputs(2, 9), sites="all")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
