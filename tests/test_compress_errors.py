"""compress's errors name the problem and the fix (issue 15, defect 10).

Each test builds the smallest model that shows the problem and checks the
message's figures by hand (a nothing-prunable model keeps 100.0% of its FLOPs).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.passes.curvature import CalibrationError


def _compress(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown-module warnings are expected on these models
        return oba_fx.compress(*args, progress=False, **kwargs)


class RecurrentText(nn.Module):
    def __init__(self, cell=nn.LSTM, vocab=20, E=8, H=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        self.rnn = cell(E, H, batch_first=True)
        self.head = nn.Linear(H, classes)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


class EncoderText(nn.Module):
    def __init__(self, vocab=20, E=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        layer = nn.TransformerEncoderLayer(E, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(E, classes)

    def forward(self, tokens, mask):
        return self.head(self.encoder(self.emb(tokens), src_key_padding_mask=mask).mean(1))


def _tokens(n=4, T=6, vocab=20, classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_text_model_says_recurrent_layers_are_not_supported(cell):
    tok, y = _tokens()
    with pytest.raises(ValueError) as err:
        _compress(RecurrentText(cell), tok, [(tok, y)])
    msg = str(err.value)
    # nothing is removable, so the floor is the whole model: 100.0%, not the old 19300.0%
    assert "leaves 100.0% of the original flops" in msg, msg
    assert f"'rnn' (nn.{cell.__name__})" in msg and "not yet supported for pruning" in msg, msg
    assert "ignore=" in msg and "frozen groups:" in msg, msg


def test_transformer_encoder_with_padding_mask_is_a_clear_error_not_a_meta_crash():
    torch.manual_seed(0)
    tok, y = _tokens()
    mask = torch.zeros(tok.shape, dtype=torch.bool)
    mask[:, -2:] = True  # padded tail: the nested-tensor fast path would fire in eval mode
    with pytest.raises(ValueError) as err:
        _compress(EncoderText().eval(), (tok, mask), [((tok, mask), y)])
    msg = str(err.value)
    assert "'encoder' (nn.TransformerEncoder)" in msg and "not yet supported for pruning" in msg, msg
    assert "leaves 100.0% of the original flops" in msg and "ignore=" in msg, msg


class AttendThenClassify(nn.Module):
    """Parameter-free attention over the input, then a head: no group can shrink, most FLOPs are in SDPA."""

    def __init__(self, E=16, classes=3):
        super().__init__()
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        return self.head(nn.functional.scaled_dot_product_attention(x, x, x).mean(1))


@pytest.mark.parametrize("model,shape", [(nn.Sequential(nn.Linear(5, 3)), (4, 5)), (AttendThenClassify(), (4, 6, 16))],
                         ids=["linear", "sdpa"])
def test_nothing_prunable_quotes_the_true_percentage_and_the_frozen_reasons(model, shape):
    # the only layer reads the input and feeds the output; the base and the floor must come from one counter
    # (the old CPU counter missed SDPA in the base and saw it in the floor)
    x = torch.randn(*shape)
    with pytest.raises(ValueError) as err:
        _compress(model, x, [(x, torch.zeros(4, dtype=torch.long))])
    msg = str(err.value)
    assert "leaves 100.0% of the original flops, above the step-1 goal 50.0%" in msg, msg
    assert "0 of 2 groups are prunable" in msg and "reaches the model output" in msg, msg
    assert "Fix: a higher target" in msg, msg


def test_unreachable_target_lists_frozen_groups_and_the_reachable_floor():
    # hidden width 16, at most 90% removable: the floor is 2·B·(5·2 + 2·3) of 2·B·(5·16 + 16·3)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 5)
    with pytest.raises(ValueError) as err:
        _compress(model, x, [(x, torch.zeros(4, dtype=torch.long))], target_flops=0.05)
    msg = str(err.value)
    floor = (5 * 2 + 2 * 3) / (5 * 16 + 16 * 3)
    assert f"leaves {floor:.1%} of the original flops" in msg, msg
    assert "frozen groups:" in msg and "reaches the model input" in msg and "reaches the model output" in msg, msg


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_out_of_range_labels_name_the_valid_class_range(criterion):
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 7])
    with pytest.raises(CalibrationError, match=r"target classes must lie in \[0, 2\].*got values in \[0, 7\]"):
        _compress(model, x, [(x, y)], criterion=criterion)


def test_list_example_inputs_work_like_tuples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    as_list = _compress(model, [x], [([x], y)])
    as_tuple = _compress(model, (x,), [((x,), y)])
    assert as_list.report["flops"] == as_tuple.report["flops"]
    assert as_list.report["widths"]["after"] == as_tuple.report["widths"]["after"]
    assert torch.equal(as_list.model(x), as_tuple.model(x))


def test_example_inputs_list_of_samples_is_explained():
    # a list of two samples is two positional arguments, not a batch
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(2, 5), torch.randint(0, 3, (2,))
    with pytest.raises(TypeError, match=r"list of 2 element.*2 positional argument.*Sequential\.forward\(input\)"
                                        r".*one stacked tensor"):
        _compress(model, [x[0], x[1]], [(x, y)])
