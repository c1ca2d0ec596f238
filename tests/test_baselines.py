"""Baseline MIL networks and the adaptive SMILE: packed-bag contract, invariances, gradients, and learning on MUSK1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scripts.networks import MIL_NETWORKS, build_mil_network
from scripts.networks.segment_ops import pack_bags, segment_sum

NETWORKS = [
    "mean_pool", "max_pool", "abmil", "abmil_gated", "clam_sb", "clam_mb",
    "transmil", "dsmil", "dtfd", "acmil", "smile_adaptive",
]
WITH_ATTENTION = set(NETWORKS) - {"mean_pool", "max_pool", "transmil"}
NOT_PERMUTATION_INVARIANT = {"transmil"}  # PPEG convolutions and square padding see the token order
SIZES = (1, 3, 17, 40, 12)
DIM = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _bags(seed=0, dim=DIM, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in sizes]


def _net(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_mil_network(name, in_dim=kw.pop("in_dim", DIM), **kw)


def _eval_out(net, bags):
    x, bi = pack_bags(bags)
    net.eval()
    with torch.no_grad():
        return net.forward_packed(x, bi, len(bags)), bi


def test_all_networks_registered():
    missing = [n for n in NETWORKS if n not in MIL_NETWORKS]
    assert not missing, f"not registered: {missing}"


@pytest.mark.parametrize("name", NETWORKS)
def test_default_in_dim_768_and_input_forms(name):
    net = build_mil_network(name)
    net.eval()
    bag = torch.randn(30, 768)
    with torch.no_grad():
        one = net(bag)
        batch = net(torch.stack([bag, bag.flip(0)]))
    assert one.shape == (1,) and batch.shape == (2,)
    assert torch.isfinite(one).all() and torch.isfinite(batch).all()
    torch.testing.assert_close(batch[0:1], one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="in_dim=166"):
        net(torch.randn(5, 166))


@pytest.mark.parametrize("name", NETWORKS)
def test_packed_forward_shapes_and_attention(name):
    net = _net(name)
    bags = _bags()
    for mode in ("train", "eval"):
        net.train(mode == "train")
        x, bi = pack_bags(bags)
        with torch.no_grad():
            out = net.forward_packed(x, bi, len(bags))
        assert out["logits"].shape == (len(bags),)
        assert torch.isfinite(out["logits"]).all()
        if name in WITH_ATTENTION:
            att = out["attention"]
            assert att.shape == (x.shape[0],) and (att >= 0).all()
            torch.testing.assert_close(segment_sum(att, bi, len(bags)), torch.ones(len(bags)), rtol=0, atol=1e-5)
        else:
            assert "attention" not in out


@pytest.mark.parametrize("name", NETWORKS)
def test_batch_independence_and_packing_order(name):
    """Eval mode: a bag's logit is the same alone, packed with others, and with bags interleaved."""
    net = _net(name)
    bags = _bags(1)
    packed, _ = _eval_out(net, bags)
    alone = torch.cat([_eval_out(net, [b])[0]["logits"] for b in bags])
    torch.testing.assert_close(packed["logits"], alone, rtol=1e-4, atol=1e-5)
    # interleave the bags' instances round-robin (each bag keeps its own instance order)
    x, bi = pack_bags(bags)
    within = torch.cat([torch.arange(len(b)) for b in bags])
    rr = torch.tensor(sorted(range(x.shape[0]), key=lambda i: (int(within[i]), int(bi[i]))))
    assert not torch.equal(bi[rr], bi)
    with torch.no_grad():
        out = net.forward_packed(x[rr], bi[rr], len(bags))
    torch.testing.assert_close(out["logits"], packed["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_permutation_within_bag(name):
    net = _net(name)
    bags = _bags(2)
    ref, _ = _eval_out(net, bags)
    g = torch.Generator().manual_seed(3)
    shuffled = [b[torch.randperm(len(b), generator=g)] for b in bags]
    again, _ = _eval_out(net, bags)
    torch.testing.assert_close(again["logits"], ref["logits"], rtol=0, atol=0)  # deterministic in eval
    out, _ = _eval_out(net, shuffled)
    if name in NOT_PERMUTATION_INVARIANT:
        # what holds for TransMIL: one-instance bags are trivially invariant, and order does matter otherwise
        assert torch.allclose(out["logits"][0], ref["logits"][0], atol=1e-5)
        assert not torch.allclose(out["logits"][1:], ref["logits"][1:], atol=1e-6)
    else:
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_gradients_reach_every_parameter(name):
    net = _net(name)
    net.train()
    bags = _bags(4)
    x, bi = pack_bags(bags)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    out = net.forward_packed(x, bi, len(bags))
    terms = net.training_loss_terms(out, x, bi, labels)
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    loss = F.binary_cross_entropy_with_logits(out["logits"], labels) + sum(terms.values())
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


# --- method-specific checks ------------------------------------------------------------------------


def test_acmil_masks_a_random_share_of_the_top_k():
    net = _net("acmil", n_masked=10, mask_drop=0.6)
    scores = torch.randn(sum(SIZES), 5)
    bi = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    mask = net._stochastic_topk_mask(scores, bi, len(SIZES))
    for b, n in enumerate(SIZES):
        rows = bi == b
        for k in range(5):
            s, m = scores[rows, k], mask[rows, k]
            assert int(m.sum()) == int(min(10, n) * 0.6)
            if m.any():  # masked instances are among the top min(10, n)
                top = torch.topk(s, min(10, n)).indices
                assert set(torch.nonzero(m).view(-1).tolist()) <= set(top.tolist())


def test_clam_instance_loss_uses_true_class_classifier():
    net = _net("clam_sb", dropout=0.0)
    bags = _bags(5)
    x, bi = pack_bags(bags)
    out = net.forward_packed(x, bi, len(bags))
    # zero the positive-class instance classifier: bags labelled 1 then give CE = log 2 exactly
    with torch.no_grad():
        for p in net.instance_classifiers[1].parameters():
            p.zero_()
    loss = net.training_loss_terms(out, x, bi, torch.ones(len(bags)))["clam_instance"]
    assert loss.item() == pytest.approx(net.instance_weight * np.log(2), rel=1e-6)


def test_transmil_pinv_and_nystrom_path():
    from scripts.networks.transmil import iterative_pinv

    a = torch.softmax(torch.randn(2, 16, 16), -1).double()
    z = iterative_pinv(a, iterations=20)
    torch.testing.assert_close(a @ z @ a, a, rtol=1e-4, atol=1e-6)
    net = _net("transmil", dim=32, heads=4, num_landmarks=8)  # 40-instance bag -> 49 + 1 tokens > 8 landmarks
    out, _ = _eval_out(net, _bags(6))
    assert torch.isfinite(out["logits"]).all()


def test_smile_adaptive_starts_at_smile_hard_rule():
    net = _net("smile_adaptive", temperature=1e-4)
    bags = _bags(7, sizes=(6, 9))
    out, bi = _eval_out(net, bags)
    torch.testing.assert_close(out["threshold"], torch.full((2,), 0.5))
    torch.testing.assert_close(out["factor"], torch.full((2,), 0.3))
    ref = []
    for b in bags:
        with torch.no_grad():
            h = net.fc(b)
            l = net.attention_score(net.attention_a(h) * net.attention_b(h)).squeeze(-1)
            s = (l - l.min()) / (l.max() - l.min())
            l = torch.where(s > 0.5, l * 0.3, l)  # SMILE: scale logits whose normalised score exceeds 0.5
            w = torch.softmax(l, 0)
            ref.append(w)
    torch.testing.assert_close(out["attention"], torch.cat(ref), rtol=1e-4, atol=1e-5)


# --- learning on MUSK1 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def musk1(shared_mil):
    data = np.load(shared_mil / "musk1.npz")
    x, bag, y = data["X"], data["bag"], data["bag_y"].astype(np.float32)
    rng = np.random.default_rng(0)
    pos, neg = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
    test = np.r_[pos[:14], neg[:14]]  # fixed stratified held-out split: 28 of 92 bags
    train = np.setdiff1d(np.arange(len(y)), test)
    in_train = np.isin(bag, train)
    mu, sd = x[in_train].mean(0), x[in_train].std(0) + 1e-6  # standardise with training statistics only
    xs = torch.tensor((x - mu) / sd, dtype=torch.float32)
    bags = [xs[bag == i] for i in range(len(y))]
    return bags, y, train, test


def _pack(bags, y, ids):
    x, bi = pack_bags([bags[i] for i in ids])
    return x, bi, torch.tensor(y[ids])


def _predict(net, bags, y, ids):
    net.eval()
    x, bi, _ = _pack(bags, y, ids)
    with torch.no_grad():
        return net.forward_packed(x, bi, len(ids))["logits"].numpy()


def train_briefly(net, bags, y, train, epochs=25, batch=8, lr=5e-4, seed=0):
    """Tiny training loop: Adam, mini-batches of packed bags, bag BCE + the network's own extra terms."""
    torch.manual_seed(seed)
    order = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        perm = order.permutation(train)
        for start in range(0, len(perm), batch):
            ids = perm[start : start + batch]
            x, bi, target = _pack(bags, y, ids)
            out = net.forward_packed(x, bi, len(ids))
            loss = F.binary_cross_entropy_with_logits(out["logits"], target)
            loss = loss + sum(net.training_loss_terms(out, x, bi, target).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@pytest.mark.parametrize("name", NETWORKS)
def test_learns_musk1(name, musk1, record_property):
    bags, y, train, test = musk1
    net = train_briefly(_net(name, in_dim=166), bags, y, train)
    train_auc = roc_auc_score(y[train], _predict(net, bags, y, train))
    test_auc = roc_auc_score(y[test], _predict(net, bags, y, test))
    record_property("musk1_train_auc", round(train_auc, 3))
    record_property("musk1_heldout_auc", round(test_auc, 3))
    print(f"\n{name}: MUSK1 training AUC {train_auc:.3f}, held-out AUC {test_auc:.3f} (28 bags)")
    assert train_auc > 0.9, f"{name} did not learn MUSK1: training AUC {train_auc:.3f}"
