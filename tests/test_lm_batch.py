"""The causal-LM batch helper and loss (dilated_compile.training) in one process, no process group.

Across processes (a 2 x 2 and a 1 x 4 mesh) they are checked by the
"batch-helper" case of tests/fsdp_ring_worker.py and by training itself.
"""

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import causal_lm_loss, shard_causal_lm_batch
from dilated_compile.training import shift_labels


def test_exports():
    for name in ("shard_causal_lm_batch", "causal_lm_loss"):
        assert name in dilated_compile.__all__ and hasattr(dilated_compile, name)


def test_shift_labels_moves_targets_left_and_ignores_the_end():
    labels = torch.tensor([[1, 2, 3, 4], [5, -100, 7, 8]])
    assert shift_labels(labels).tolist() == [[2, 3, 4, -100], [-100, 7, 8, -100]]
    assert shift_labels(labels, ignore_index=-1).tolist() == [[2, 3, 4, -1], [-100, 7, 8, -1]]


def test_batch_without_process_group_is_whole_and_shifted():
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.ones(2, 6, 3)
    batch = shard_causal_lm_batch(ids, layout="zigzag", loss_mask=mask)
    assert set(batch) == {"input_ids", "labels", "position_ids", "loss_mask"}
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["loss_mask"], mask)
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5, -100], [7, 8, 9, 10, 11, -100]]
    assert batch["position_ids"].tolist() == [list(range(6))] * 2


def test_batch_errors_name_the_shapes():
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        shard_causal_lm_batch(ids[0])
    with pytest.raises(ValueError, match=r"loss_mask must be \(batch, seq, ...\) = \(2, 6, ...\)"):
        shard_causal_lm_batch(ids, loss_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        shard_causal_lm_batch(ids, torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="layout='ring'"):
        shard_causal_lm_batch(ids, layout="ring")


def test_loss_equals_an_hf_models_own_loss():
    """World size 1: the helper's loss is what an HF model computes from labels= (which shifts them
    itself), ignored labels included; the gradient is grad_divide_factor times the mean's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    labels = ids.clone()
    labels[0, 3:7] = -100
    out = model(input_ids=ids, labels=labels)
    batch = shard_causal_lm_batch(ids, labels)
    logits = out.logits.detach().requires_grad_()
    loss = causal_lm_loss(logits, batch["labels"])
    torch.testing.assert_close(loss, out.loss.detach())
    loss.backward()
    scaled = logits.detach().requires_grad_()
    (3 * causal_lm_loss(scaled, batch["labels"])).backward()
    tripled = logits.detach().requires_grad_()
    causal_lm_loss(tripled, batch["labels"], grad_divide_factor=3).backward()
    torch.testing.assert_close(tripled.grad, scaled.grad)
    torch.testing.assert_close(logits.grad * 3, tripled.grad)


def test_loss_value_is_the_mean_and_shapes_are_checked():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, -100], [0, 6, 6, -100, -100]])
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels, grad_divide_factor=4), want)
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and labels \(2, 4\) do not match"):
        causal_lm_loss(logits, labels[:, :4])
    with pytest.raises(ValueError, match="the DeviceMesh has 2 dimensions"):
        from dilated_compile.training import _as_group

        class TwoDim:  # stands for a 2-D DeviceMesh (the real one needs a process group)
            ndim = 2

            def get_group(self):
                raise AssertionError("not reached")

        _as_group(TwoDim())
