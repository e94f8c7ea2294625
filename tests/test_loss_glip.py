"""GLIPLoss / ATSSAssigner against the original GLIP training losses recorded in the reference fixture."""

import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from modeling_glip.box_coder import BoxCoder
from modeling_glip.loss_glip import ATSSAssigner, GLIPLoss, box_iou_legacy

LEVELS = ("p3", "p4", "p5", "p6", "p7")
LOSS_KEYS = ("loss_reg", "loss_centerness", "loss_dot_product_token")


def _head_inputs(fixture_tensors):
    """The recorded head outputs flattened as the model hands them to GLIPLoss (fresh leaf tensors)."""
    f = fixture_tensors
    logits = torch.cat([f[f"head.dot_product_logits.{lvl}"] for lvl in LEVELS], dim=1)
    box_regression = torch.cat([f[f"head.bbox_reg.{lvl}"].permute(0, 2, 3, 1).reshape(1, -1, 4) for lvl in LEVELS], dim=1)
    centerness = torch.cat([f[f"head.centerness.{lvl}"].reshape(1, -1) for lvl in LEVELS], dim=1)
    anchors = torch.cat([f[f"anchors.{lvl}"] for lvl in LEVELS])
    num_anchors_per_level = [f[f"anchors.{lvl}"].shape[0] for lvl in LEVELS]
    return {
        "logits": logits.clone().requires_grad_(),
        "box_regression": box_regression.clone().requires_grad_(),
        "centerness": centerness.clone().requires_grad_(),
        "anchors": anchors,
        "num_anchors_per_level": num_anchors_per_level,
        "attention_mask": f["input.attention_mask"].clone(),
        "targets": [{"boxes": f["loss.gt_boxes_xyxy_resized"], "positive_map": f["loss.positive_map"]}],
    }


def _glip_giou_loss(pred, target):
    """Literal transcription of the formula of the original GIoULoss (glip_architecture.md section 8), per box."""
    px1, py1, px2, py2 = pred.unbind(-1)
    px2, py2 = torch.max(px1, px2), torch.max(py1, py2)
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    inter_w, inter_h = torch.min(px2, tx2) - torch.max(px1, tx1), torch.min(py2, ty2) - torch.max(py1, ty1)
    inter = torch.where((inter_w > 0) & (inter_h > 0), inter_w * inter_h, torch.zeros_like(inter_w))
    enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) - torch.min(py1, ty1)) + 1e-7
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-7
    return 1 - (inter / union - (enclosing - union) / enclosing)


@pytest.fixture(scope="module")
def loss_fn():
    return GLIPLoss(BoxCoder())


def test_parity_with_original_losses(fixture_tensors, manifest, loss_fn):
    out = loss_fn(**_head_inputs(fixture_tensors))
    assert set(out) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        expected = fixture_tensors[f"loss.{key}"]
        diff = (out[key].detach() - expected).abs().item()
        print(f"{key}: port {out[key].item():.7f} original {expected.item():.7f} |diff| {diff:.3e}")
        assert out[key].dim() == 0
        assert diff <= 1e-6
        assert out[key].item() == pytest.approx(manifest["loss"]["runs"][0][key], abs=1e-6)


def test_gradients_match_original(fixture_tensors, reference_dir, loss_fn):
    from safetensors.torch import load_file

    state = load_file(str(reference_dir / "tiny_glip_original.safetensors"))
    inputs = _head_inputs(fixture_tensors)
    sum(loss_fn(**inputs).values()).backward()
    g_logits, g_reg, g_ctr = inputs["logits"].grad, inputs["box_regression"].grad, inputs["centerness"].grad
    assert torch.all(g_logits[..., inputs["attention_mask"][0] == 0] == 0)  # padded tokens get no gradient

    # logits = (Q @ P^T) / exp(log_scale) + e @ bias_lang + bias0, e = L2-normalised final language hidden (section 5.5)
    e = F.normalize(fixture_tensors["head.tower.04.BertEncoderLayer.lang_hidden"][0], p=2, dim=-1)  # (256, D)
    bias_t = e @ state["rpn.head.bias_lang"] + state["rpn.head.bias0"]
    p3_reg = fixture_tensors["head.bbox_reg.p3"].permute(0, 2, 3, 1).reshape(1, -1, 4)  # bbox_pred(x) * scales[0]
    num_p3 = p3_reg.shape[1]
    grads = {
        "rpn.head.bias0": g_logits.sum().reshape(1),
        "rpn.head.centerness.bias": g_ctr.sum().reshape(1),
        "rpn.head.bias_lang": (g_logits[0].sum(0) @ e),
        "rpn.head.log_scale": -(g_logits[0] * (inputs["logits"].detach()[0] - bias_t)).sum().reshape(1),
        "rpn.head.scales.0.scale": (g_reg[:, :num_p3] * p3_reg).sum().reshape(1) / state["rpn.head.scales.0.scale"],
    }
    for name, grad in grads.items():
        expected = fixture_tensors[f"loss.grad.{name}"]
        diff = (grad - expected).abs().max().item()
        print(f"grad {name}: |diff| {diff:.3e}")
        assert diff <= 1e-4


def test_unpadded_prompt_gives_identical_losses(fixture_tensors, loss_fn):
    padded = loss_fn(**_head_inputs(fixture_tensors))
    inputs = _head_inputs(fixture_tensors)
    num_valid = int(inputs["attention_mask"].sum())
    assert num_valid == 13
    inputs["logits"] = inputs["logits"].detach()[..., :num_valid].requires_grad_()
    inputs["attention_mask"] = inputs["attention_mask"][:, :num_valid]
    inputs["targets"] = [{**inputs["targets"][0], "positive_map": inputs["targets"][0]["positive_map"][:, :num_valid]}]
    unpadded = loss_fn(**inputs)
    for key in LOSS_KEYS:
        torch.testing.assert_close(unpadded[key], padded[key], rtol=0, atol=1e-7)


def test_giou_matches_original_formula(fixture_tensors):
    """torchvision's GIoU loss (eps on the denominators) equals GLIP's (eps on union / enclosing area) bitwise here."""
    inputs = _head_inputs(fixture_tensors)
    anchors, coder = inputs["anchors"], BoxCoder()
    gt = inputs["targets"][0]["boxes"]
    matched = ATSSAssigner(9)(anchors, inputs["num_anchors_per_level"], gt)
    pos = matched >= 0
    assert pos.sum() > 0
    pred = coder.decode(inputs["box_regression"].detach()[0][pos], anchors[pos])
    target = coder.decode(coder.encode(gt[matched[pos]], anchors[pos]), anchors[pos])
    pred_clamped = torch.cat((pred[:, :2], torch.max(pred[:, :2], pred[:, 2:])), dim=1)
    torch.testing.assert_close(generalized_box_iou_loss(pred_clamped, target), _glip_giou_loss(pred, target), rtol=0, atol=0)

    # also random boxes, including inverted predictions and disjoint pairs
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 300
    pred = torch.cat((xy, xy + torch.randn(500, 2, generator=g) * 40), dim=1)
    xy = torch.rand(500, 2, generator=g) * 300
    target = torch.cat((xy, xy + 2 + torch.rand(500, 2, generator=g) * 80), dim=1)
    pred_clamped = torch.cat((pred[:, :2], torch.max(pred[:, :2], pred[:, 2:])), dim=1)
    torch.testing.assert_close(generalized_box_iou_loss(pred_clamped, target), _glip_giou_loss(pred, target), rtol=0, atol=1e-6)


def test_torchvision_focal_loss_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 9, generator=g, dtype=torch.float64) * 4
    targets = (torch.rand(4, 7, 9, generator=g) > 0.7).to(torch.float64)
    alpha, gamma = 0.25, 2.0
    p = logits.sigmoid()
    expected = torch.where(
        targets == 1, -alpha * (1 - p) ** gamma * torch.log(p), -(1 - alpha) * p**gamma * torch.log(1 - p)
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma), expected)


def test_image_without_boxes(fixture_tensors, loss_fn):
    inputs = _head_inputs(fixture_tensors)
    inputs["targets"] = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 256)}]
    out = loss_fn(**inputs)
    sum(out.values()).backward()
    assert out["loss_reg"].item() == 0 and out["loss_centerness"].item() == 0
    assert torch.all(inputs["box_regression"].grad == 0) and torch.all(inputs["centerness"].grad == 0)
    # num_pos = 1; every valid (anchor, token) is a negative (the [NoObj] token 255 is padding here)
    mask = inputs["attention_mask"][0] > 0
    logits = inputs["logits"].detach()[0][:, mask]
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    torch.testing.assert_close(out["loss_dot_product_token"], expected)


def test_no_object_token_only_when_prompt_fills_max_text_len(fixture_tensors, loss_fn):
    inputs = _head_inputs(fixture_tensors)
    logits = inputs["logits"].detach()[0]
    boxes = torch.zeros(0, 4)
    full_mask = torch.ones(1, 256, dtype=torch.long)
    out = loss_fn(logits[None], inputs["box_regression"], inputs["centerness"], inputs["anchors"],
                  inputs["num_anchors_per_level"], full_mask, [{"boxes": boxes, "positive_map": torch.zeros(0, 256)}])
    targets = torch.zeros_like(logits)
    targets[:, 255] = 1  # "[NoObj]" (section 8)
    torch.testing.assert_close(out["loss_dot_product_token"], sigmoid_focal_loss(logits, targets, reduction="sum"))

    short = logits[:, :20]
    out = loss_fn(short[None], inputs["box_regression"], inputs["centerness"], inputs["anchors"],
                  inputs["num_anchors_per_level"], full_mask[:, :20], [{"boxes": boxes, "positive_map": torch.zeros(0, 20)}])
    torch.testing.assert_close(out["loss_dot_product_token"], sigmoid_focal_loss(short, torch.zeros_like(short), reduction="sum"))


def _positives_and_centerness_sum(loss_fn, inputs, target):
    matched = loss_fn.assigner(inputs["anchors"], inputs["num_anchors_per_level"], target["boxes"])
    pos = matched >= 0
    anchors = inputs["anchors"][pos]
    boxes = loss_fn.box_coder.decode(loss_fn.box_coder.encode(target["boxes"][matched[pos]], anchors), anchors)
    return int(pos.sum()), loss_fn.centerness_targets(boxes, anchors).sum()


def test_batch_of_two_images(fixture_tensors, loss_fn):
    """Batch losses are normalised over the whole batch: combine two single-image results by their normalisers."""
    base = _head_inputs(fixture_tensors)
    second_target = {"boxes": torch.tensor([[100.0, 60.0, 220.0, 200.0]]), "positive_map": base["targets"][0]["positive_map"][1:2]}
    g = torch.Generator().manual_seed(0)
    second = {key: base[key].detach() + 0.5 * torch.randn(base[key].shape, generator=g) for key in ("logits", "box_regression", "centerness")}
    singles = [loss_fn(**base), loss_fn(**{**base, **second, "targets": [second_target]})]
    stats = [_positives_and_centerness_sum(loss_fn, base, t) for t in (base["targets"][0], second_target)]
    (pos_a, ctr_a), (pos_b, ctr_b) = stats
    assert pos_a > 0 and pos_b > 0

    batch = loss_fn(
        torch.cat((base["logits"], second["logits"])),
        torch.cat((base["box_regression"], second["box_regression"])),
        torch.cat((base["centerness"], second["centerness"])),
        base["anchors"],
        base["num_anchors_per_level"],
        base["attention_mask"].expand(2, -1),
        [base["targets"][0], second_target],
    )
    for key in ("loss_centerness", "loss_dot_product_token"):
        expected = (singles[0][key] * pos_a + singles[1][key] * pos_b) / (pos_a + pos_b)
        torch.testing.assert_close(batch[key], expected)
    expected_reg = (singles[0]["loss_reg"] * ctr_a + singles[1]["loss_reg"] * ctr_b) / (ctr_a + ctr_b)
    torch.testing.assert_close(batch["loss_reg"], expected_reg)


def test_atss_assignment_rules():
    """Two levels (4x4 and 2x2 grids): threshold = mean + std, centre inside the gt, highest IoU wins."""
    anchors = []
    for stride, size in ((8, 16), (16, 32)):
        for y in range(32 // stride):
            for x in range(32 // stride):
                cx, cy = x * stride + stride / 2, y * stride + stride / 2
                anchors.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    anchors = torch.tensor(anchors)
    gts = torch.tensor([[8.0, 4.0, 16.0, 27.0], [0.0, 4.0, 18.0, 25.0]])
    assigner = ATSSAssigner(topk=3)
    matched = assigner(anchors, [16, 4], gts)

    ious = box_iou_legacy(anchors, gts)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.full((20,), -1)
    best = torch.full((20,), -1.0)
    for j, gt in enumerate(gts):
        dist = (centers - (gt[:2] + gt[2:]) / 2).norm(dim=1)
        cand = torch.cat([dist[:16].topk(3, largest=False).indices, 16 + dist[16:].topk(3, largest=False).indices])
        thr = ious[cand, j].mean() + ious[cand, j].std()
        for i in cand.tolist():
            inside = min(centers[i, 0] - gt[0], centers[i, 1] - gt[1], gt[2] - centers[i, 0], gt[3] - centers[i, 1]) > 0.01
            if ious[i, j] >= thr and inside and ious[i, j] > best[i]:
                best[i], expected[i] = ious[i, j], j
    assert torch.equal(matched, expected)
    # anchor 5 is positive for both gts and goes to gt 1 (IoU 0.564 > 0.435); anchor 9 only for gt 0
    assert matched.tolist() == [-1] * 5 + [1, -1, -1, -1, 0] + [-1] * 10
    assert torch.equal(assigner(anchors, [16, 4], torch.zeros(0, 4)), torch.full((20,), -1))


def test_legacy_iou():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    others = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0], [10.0, 10.0, 20.0, 20.0]])
    torch.testing.assert_close(box_iou_legacy(boxes, others), torch.tensor([[1.0, 50.0 / 150.0, 0.0]]))


def test_differentiable_wrt_all_inputs():
    torch.manual_seed(0)
    anchors = torch.tensor([[x, y, x + 15.0, y + 15.0] for y in range(0, 32, 8) for x in range(0, 32, 8)] + [[0.0, 0.0, 31.0, 31.0]], dtype=torch.float64)
    logits = torch.randn(1, 17, 6, dtype=torch.float64, requires_grad=True)
    box_regression = (0.1 * torch.randn(1, 17, 4, dtype=torch.float64)).requires_grad_()
    centerness = torch.randn(1, 17, dtype=torch.float64, requires_grad=True)
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 22.0]], dtype=torch.float64), "positive_map": torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])}]
    loss_fn = GLIPLoss(BoxCoder(), topk=3)

    def total(lg, br, ct):
        return sum(loss_fn(lg, br, ct, anchors, [16, 1], attention_mask, targets).values())

    assert torch.autograd.gradcheck(total, (logits, box_regression, centerness))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_normalisers_single_process(fixture_tensors, loss_fn, tmp_path):
    """With an initialised process group (world size 1) the all-reduce path gives the same losses."""
    import torch.distributed as dist

    local = loss_fn(**_head_inputs(fixture_tensors))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed = loss_fn(**_head_inputs(fixture_tensors))
    finally:
        dist.destroy_process_group()
    for key in LOSS_KEYS:
        torch.testing.assert_close(distributed[key], local[key], rtol=0, atol=0)
